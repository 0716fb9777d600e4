/* A member of a flow entry's type read and written by offset, for the relay's C parts
 * (relay/_hitpath.c, relay/_counter_flush.c): at 50k flows the attribute protocol (a type
 * lookup and a descriptor call per access) cost more than the dict lookup of a hit. Objects
 * are __slots__ or T_OBJECT_EX members, integers the T_LONGLONG members of
 * relay._hitpath.FlowFields (relay/_flow_fields.h), found by their descriptors. */
#ifndef RTCRELAY_SLOTS_H
#define RTCRELAY_SLOTS_H

#include <Python.h>
#include <structmember.h>

/* The offset of a __slots__ member `name` of `type` that holds an object; -1 if it is none. */
static Py_ssize_t
slot_offset(PyTypeObject *type, PyObject *name)
{
    PyObject *descr = _PyType_Lookup(type, name); /* borrowed */
    if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type))
        return -1;
    PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
    return member->type == T_OBJECT_EX && !(member->flags & READONLY) ? member->offset : -1;
}

/* The offset of a writable 64-bit integer member `name` of `type`; -1 if it is none. */
static Py_ssize_t
int_member_offset(PyTypeObject *type, PyObject *name)
{
    PyObject *descr = _PyType_Lookup(type, name); /* borrowed */
    if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type))
        return -1;
    PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
    return member->type == T_LONGLONG && !(member->flags & READONLY) ? member->offset : -1;
}

#define SLOT(entry, off) (*(PyObject **)((char *)(entry) + (off)))
#define INT_FIELD(entry, off) (*(long long *)((char *)(entry) + (off)))

#endif /* RTCRELAY_SLOTS_H */
