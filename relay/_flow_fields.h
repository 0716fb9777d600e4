/* relay._hitpath.FlowFields: the base of relay.flow_entry.FlowEntry, the fields the packet
 * path and the counter flush touch, as C fields (included once by relay/_hitpath.c).
 *
 * Why: as Python int slots, a flow's counters were an int object each. A hit replaced two of
 * them (an allocation, and a cache miss on the old one once a flow is past 256 packets), and a
 * flush's look at a flow read three (packets in and out, flushed_activity): at 50,000 flows
 * each is a cache miss. Here they are 64-bit integers inside the entry, next to the two
 * objects a hit reads (prefix, tunnel_dest): a hit touches the entry's first 64 bytes only.
 *
 * Python sees ordinary attributes (member descriptors: ints in, ints out; anything else is a
 * TypeError, after which CPython's setter has left -1 in the field). C finds them by
 * their descriptors (relay/_slots.h: int_member_offset, slot_offset), so relay._counter_flush
 * needs no link to this module.
 */
#ifndef RTCRELAY_FLOW_FIELDS_H
#define RTCRELAY_FLOW_FIELDS_H

#include <Python.h>
#include <structmember.h>

typedef struct {
    PyObject_HEAD
    long long packets_in, bytes_in;   /* a hit's: first, beside prefix and tunnel_dest */
    PyObject *prefix, *tunnel_dest;
    long long packets_out, bytes_out;
    long long flushed_activity;       /* packets_in + packets_out at the last flush */
    long long flushed_ms;             /* when a flush last saw it move: ms */
} FlowFields;

static PyMemberDef FlowFields_members[] = {
    {"packets_in", T_LONGLONG, offsetof(FlowFields, packets_in), 0, NULL},
    {"bytes_in", T_LONGLONG, offsetof(FlowFields, bytes_in), 0, NULL},
    {"prefix", T_OBJECT_EX, offsetof(FlowFields, prefix), 0, "what the hit path writes in front of a datagram"},
    {"tunnel_dest", T_OBJECT_EX, offsetof(FlowFields, tunnel_dest), 0, "the transceiver's tunnel sockaddr bytes"},
    {"packets_out", T_LONGLONG, offsetof(FlowFields, packets_out), 0, NULL},
    {"bytes_out", T_LONGLONG, offsetof(FlowFields, bytes_out), 0, NULL},
    {"flushed_activity", T_LONGLONG, offsetof(FlowFields, flushed_activity), 0, NULL},
    {"flushed_ms", T_LONGLONG, offsetof(FlowFields, flushed_ms), 0, NULL},
    {NULL},
};

static int
FlowFields_traverse(FlowFields *self, visitproc visit, void *arg)
{
    Py_VISIT(self->prefix);
    Py_VISIT(self->tunnel_dest);
    return 0;
}

static int
FlowFields_clear(FlowFields *self)
{
    Py_CLEAR(self->prefix);
    Py_CLEAR(self->tunnel_dest);
    return 0;
}

static void
FlowFields_dealloc(FlowFields *self)
{
    PyObject_GC_UnTrack(self);
    FlowFields_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject FlowFields_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "relay._hitpath.FlowFields",
    .tp_basicsize = sizeof(FlowFields),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C fields of a flow entry (relay/_flow_fields.h): counters as 64-bit ints, prefix, tunnel_dest.",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)FlowFields_dealloc,
    .tp_traverse = (traverseproc)FlowFields_traverse,
    .tp_clear = (inquiry)FlowFields_clear,
    .tp_members = FlowFields_members,
};

#endif /* RTCRELAY_FLOW_FIELDS_H */
