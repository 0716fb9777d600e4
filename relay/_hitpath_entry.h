/* A flow entry (relay.flow_entry.FlowEntry) read and counted from C, for relay/_hitpath.c
 * (included once there): its prefix and tunnel_dest, and packets_in/bytes_in += a datagram.
 *
 * FlowEntry's fields are members (relay._hitpath.FlowFields): their offsets are learned from
 * the first entry seen, and then read and written directly; at 50k flows the attribute
 * protocol (a type lookup and a descriptor call each, four a datagram) cost more than the
 * dict lookup. An entry of any other type takes the attribute protocol.
 */
#ifndef RTCRELAY_HITPATH_ENTRY_H
#define RTCRELAY_HITPATH_ENTRY_H

#include <Python.h>
#include <structmember.h>

#include "_slots.h"

/* The entry type's __slots__ as offsets (type NULL: not learned yet, or not slots). */
typedef struct {
    PyTypeObject *type;
    Py_ssize_t off_prefix, off_tunnel_dest, off_packets_in, off_bytes_in;
} EntryLayout;

static PyObject *s_prefix, *s_tunnel_dest, *s_packets_in, *s_bytes_in;

/* The attribute names, interned once (module init). -1 with an exception set. */
static int
intern_entry_names(void)
{
    return (s_prefix = PyUnicode_InternFromString("prefix")) == NULL
        || (s_tunnel_dest = PyUnicode_InternFromString("tunnel_dest")) == NULL
        || (s_packets_in = PyUnicode_InternFromString("packets_in")) == NULL
        || (s_bytes_in = PyUnicode_InternFromString("bytes_in")) == NULL ? -1 : 0;
}

/* entry.<name> += delta (a Python int attribute). */
static int
add_to_attr(PyObject *entry, PyObject *name, long long delta)
{
    PyObject *old = PyObject_GetAttr(entry, name);
    if (old == NULL)
        return -1;
    long long v = PyLong_AsLongLong(old);
    Py_DECREF(old);
    if (v == -1 && PyErr_Occurred())
        return -1;
    PyObject *value = PyLong_FromLongLong(v + delta);
    if (value == NULL)
        return -1;
    int r = PyObject_SetAttr(entry, name, value);
    Py_DECREF(value);
    return r;
}

/* Learn `type`'s slot offsets into `layout` (left unset if it lacks one of the slots). */
static void
learn_entry_type(EntryLayout *layout, PyTypeObject *type)
{
    Py_ssize_t p = slot_offset(type, s_prefix), d = slot_offset(type, s_tunnel_dest);
    Py_ssize_t i = int_member_offset(type, s_packets_in), b = int_member_offset(type, s_bytes_in);
    if (p < 0 || d < 0 || i < 0 || b < 0)
        return;
    Py_INCREF(type);
    Py_XSETREF(layout->type, type);
    layout->off_prefix = p;
    layout->off_tunnel_dest = d;
    layout->off_packets_in = i;
    layout->off_bytes_in = b;
}

/* The per-flow counters of a hit: packets_in += 1, bytes_in += length. */
static int
count_hit(const EntryLayout *layout, PyObject *entry, Py_ssize_t length)
{
    if (Py_TYPE(entry) == layout->type) {
        INT_FIELD(entry, layout->off_packets_in) += 1;
        INT_FIELD(entry, layout->off_bytes_in) += length;
        return 0;
    }
    return add_to_attr(entry, s_packets_in, 1) < 0 || add_to_attr(entry, s_bytes_in, length) < 0 ? -1 : 0;
}

#endif /* RTCRELAY_HITPATH_ENTRY_H */
