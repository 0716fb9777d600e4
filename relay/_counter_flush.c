/* relay._counter_flush: a worker's counter flush (relay.flows.LocalFlows.flush_counters_steps)
 * in C: the counters and last-seen time of the flows that moved, written to their shm slots.
 *
 * Why C: the flush writes every flow that moved once per pass (a pass per idle_timeout / 3
 * beyond 1,024 flows). In Python a write costs ~3 us (the journal image, the slot's seqlock,
 * the counters, the session's last_seen): at 50,000 flows that was 15 ms of every second of
 * the worker, in steps of ~100 us that the datagrams arriving meanwhile waited for, and it
 * was all of the relay's p99 above the C reference's at 20k pps (bench/relay.py: with no
 * housekeeping the relay's p99 was the reference's, 1.03x, against 3.1x).
 *
 * The write is shm.writer.PartitionWriter.flush_counters's, store for store (that one is the
 * reference; tests/test_counter_flush.py checks that both leave the same bytes): a flow of
 * this partition whose tag still has the handle's generation gets its image journaled, its
 * seq made odd, its last-seen time and counters written, its seq made even; then its
 * session's last_seen the same way when it gains touch_ms. Release fences keep the stores in
 * that order for readers on other CPUs (shm/reader.py checks the seq) and for a new owner
 * after a crash (shm/repair.py reads the journal).
 *
 * A flow that did not move is not written; one that did not move for idle_ms since a flush saw
 * it move is appended to the caller's list (the worker expires it: relay.flows.LocalFlows).
 *
 * The entries are relay.flow_entry.FlowEntry: an int object slot `handle`, and the 64-bit
 * integer members packets_in, bytes_in, packets_out, bytes_out, flushed_activity and flushed_ms
 * (relay._hitpath.FlowFields), read and written by offset (relay/_slots.h). A look at a flow
 * that did not move reads the entry's first two cache lines and nothing else (as int objects,
 * three more: at 50k flows each a cache miss).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#include "_slots.h"

#define SLOT_BYTES 128
#define W_TAG 1
#define W_SREF 2
#define W_LAST_SEEN 11 /* then packets in, bytes in, packets out, bytes out */
#define SW_LAST_SEEN 6
#define M32 0xffffffffULL

enum { F_HANDLE, F_PACKETS_IN, F_BYTES_IN, F_PACKETS_OUT, F_BYTES_OUT, F_FLUSHED, F_FLUSHED_MS, N_FIELDS };
static const char *const field_names[N_FIELDS] = {
    "handle", "packets_in", "bytes_in", "packets_out", "bytes_out", "flushed_activity", "flushed_ms",
};
static PyObject *field_strings[N_FIELDS];

typedef struct {
    PyObject_HEAD
    /* the partition's layout (shm.writer.PartitionWriter.flush_layout): word indexes into
     * the table, but jimg (a byte offset) */
    unsigned long long partition, fw, sw, fcap, smask, sshift, jw, jimg, slot_bits, part_mask, gen_shift, touch_ms;
    unsigned long long words_needed; /* the table's smallest size that holds all of the above */
    PyTypeObject *type;              /* the entries' type, learned from the first one */
    Py_ssize_t offsets[N_FIELDS];
} CounterFlush;

static int
CounterFlush_init(CounterFlush *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"partition", "fw", "sw", "fcap", "smask", "sshift", "jw", "jimg",
                             "slot_bits", "part_mask", "gen_shift", "touch_ms", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "$KKKKKKKKKKKK", kwlist, &self->partition, &self->fw,
                                     &self->sw, &self->fcap, &self->smask, &self->sshift, &self->jw, &self->jimg,
                                     &self->slot_bits, &self->part_mask, &self->gen_shift, &self->touch_ms))
        return -1;
    if (self->slot_bits >= 64 || self->gen_shift >= 64 || self->sshift >= 64 || self->jimg % 8) {
        PyErr_SetString(PyExc_ValueError, "CounterFlush: a shift of 64 or more, or an unaligned journal");
        return -1;
    }
    unsigned long long need = self->fw + self->fcap * 16;
    unsigned long long sessions = self->sw + (self->smask + 1) * 16;
    unsigned long long journal = self->jimg / 8 + SLOT_BYTES / 8;
    need = need > sessions ? need : sessions;
    need = need > journal ? need : journal;
    self->words_needed = need > self->jw + 1 ? need : self->jw + 1;
    return 0;
}

static void
CounterFlush_dealloc(CounterFlush *self)
{
    Py_XDECREF(self->type);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The entries' field offsets, from their type; -1 (TypeError) if it lacks one. */
static int
learn_type(CounterFlush *self, PyTypeObject *type)
{
    Py_ssize_t offsets[N_FIELDS];
    for (int f = 0; f < N_FIELDS; f++) {
        offsets[f] = f == F_HANDLE ? slot_offset(type, field_strings[f]) : int_member_offset(type, field_strings[f]);
        if (offsets[f] < 0) {
            PyErr_Format(PyExc_TypeError, "%s has no %s member %s", type->tp_name,
                         f == F_HANDLE ? "object" : "64-bit int", field_names[f]);
            return -1;
        }
    }
    Py_INCREF(type);
    Py_XSETREF(self->type, type);
    memcpy(self->offsets, offsets, sizeof offsets);
    return 0;
}

/* Journal the slot at word w (its image, then where it is), then make its seq odd. */
static inline void
begin_write(const CounterFlush *self, uint64_t *q, uint8_t *mm, uint64_t w)
{
    memcpy(mm + self->jimg, mm + (w << 3), SLOT_BYTES);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    q[self->jw] = w << 3;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    q[w] = q[w] + 1;
    __atomic_thread_fence(__ATOMIC_RELEASE);
}

/* The seq even again: the write is complete and visible. */
static inline void
end_write(uint64_t *q, uint64_t w)
{
    __atomic_thread_fence(__ATOMIC_RELEASE);
    q[w] = q[w] + 1;
}

/* PartitionWriter.flush_counters: the flow `handle`'s counters (packets in, bytes in, packets
 * out, bytes out) and last-seen time, unless the handle is stale or another partition's. */
static void
write_counters(const CounterFlush *self, uint64_t *q, uint8_t *mm, uint64_t handle, uint64_t last_seen,
               const uint64_t counters[4])
{
    if (((handle >> self->slot_bits) & self->part_mask) != self->partition)
        return;
    uint64_t i = handle & ((1ULL << self->slot_bits) - 1);
    if (i >= self->fcap)
        return;
    uint64_t w = self->fw + (i << 4);
    uint64_t tag = q[w + W_TAG];
    if (tag >> 32 != handle >> self->gen_shift || !(tag & M32))
        return;
    begin_write(self, q, mm, w);
    q[w + W_LAST_SEEN] = last_seen;
    memcpy(&q[w + W_LAST_SEEN + 1], counters, 4 * sizeof(uint64_t));
    end_write(q, w);
    /* the session's last_seen, at most once per touch_ms of progress */
    uint64_t sref = q[w + W_SREF];
    uint64_t j = sref >> self->sshift;
    for (uint64_t probes = 0; probes <= self->smask; probes++) {
        uint64_t sw_j = self->sw + (j << 4);
        uint64_t tj = q[sw_j + 1];
        if (tj == sref) {
            if (last_seen >= q[sw_j + SW_LAST_SEEN] + self->touch_ms) {
                begin_write(self, q, mm, sw_j);
                q[sw_j + SW_LAST_SEEN] = last_seen;
                end_write(q, sw_j);
            }
            return;
        }
        if (!tj)
            return;
        j = (j + 1) & self->smask;
    }
}

/* The entry's integer field f (a member). */
#define FIELD(self, entry, f) ((uint64_t)INT_FIELD(entry, (self)->offsets[f]))

/* One entry: 1 if it moved since its last flush (then written), 0 if not (appended to `idle`
 * when it has not moved for idle_ms), -1 on error. */
static int
flush_entry(CounterFlush *self, PyObject *entry, uint64_t *q, uint8_t *mm, uint64_t stamp, int64_t idle_ms,
            PyObject *idle)
{
    if (Py_TYPE(entry) != self->type && learn_type(self, Py_TYPE(entry)) < 0)
        return -1;
    uint64_t activity = FIELD(self, entry, F_PACKETS_IN) + FIELD(self, entry, F_PACKETS_OUT);
    if (activity == FIELD(self, entry, F_FLUSHED)) {
        if ((int64_t)(stamp - FIELD(self, entry, F_FLUSHED_MS)) > idle_ms && PyList_Append(idle, entry) < 0)
            return -1;
        return 0;
    }
    PyObject *handle_obj = SLOT(entry, self->offsets[F_HANDLE]);
    if (handle_obj == NULL || !PyLong_Check(handle_obj)) {
        PyErr_SetString(PyExc_TypeError, "a flow entry's handle must be an int");
        return -1;
    }
    uint64_t handle = PyLong_AsUnsignedLongLong(handle_obj);
    if (handle == (uint64_t)-1 && PyErr_Occurred())
        return -1;
    INT_FIELD(entry, self->offsets[F_FLUSHED]) = (long long)activity;
    INT_FIELD(entry, self->offsets[F_FLUSHED_MS]) = (long long)stamp;
    uint64_t counters[4] = {FIELD(self, entry, F_PACKETS_IN), FIELD(self, entry, F_BYTES_IN),
                            FIELD(self, entry, F_PACKETS_OUT), FIELD(self, entry, F_BYTES_OUT)};
    write_counters(self, q, mm, handle, stamp, counters);
    return 1;
}

PyDoc_STRVAR(flush_doc,
"flush(entries, cursor, max_written, max_looked, table, stamp, idle_ms, idle) -> (cursor, written, looked)\n\n"
"Round robin over the list `entries` from index `cursor` (wrapping): write the counters of\n"
"those that moved, with last-seen time `stamp` (ms), into `table` (the table's writable\n"
"buffer), until `max_written` were written or `max_looked` looked at. Those that did not\n"
"move for more than `idle_ms` are appended to the list `idle`.");

static PyObject *
CounterFlush_flush(CounterFlush *self, PyObject *args)
{
    PyObject *entries, *table, *idle;
    Py_ssize_t cursor, max_written, max_looked;
    unsigned long long stamp;
    long long idle_ms;
    if (!PyArg_ParseTuple(args, "O!nnnOKLO!", &PyList_Type, &entries, &cursor, &max_written, &max_looked, &table,
                          &stamp, &idle_ms, &PyList_Type, &idle))
        return NULL;
    if (stamp > (unsigned long long)INT64_MAX) {
        PyErr_SetString(PyExc_OverflowError, "stamp is past 2**63 ms");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(table, &view, PyBUF_WRITABLE) < 0)
        return NULL;
    if ((unsigned long long)view.len / 8 < self->words_needed || (uintptr_t)view.buf % 8) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "the table buffer is smaller than the partition's layout, or unaligned");
        return NULL;
    }
    uint8_t *mm = view.buf;
    uint64_t *q = view.buf;
    Py_ssize_t written = 0, looked = 0;
    while (looked < max_looked && written < max_written) {
        Py_ssize_t n = PyList_GET_SIZE(entries);
        if (n == 0)
            break;
        if (cursor >= n || cursor < 0)
            cursor = 0;
        /* borrowed: nothing here runs Python code (appending to `idle` runs none) */
        PyObject *entry = PyList_GET_ITEM(entries, cursor);
        cursor++;
        looked++;
        int moved = flush_entry(self, entry, q, mm, stamp, idle_ms, idle);
        if (moved < 0) {
            PyBuffer_Release(&view);
            return NULL;
        }
        written += moved;
    }
    PyBuffer_Release(&view);
    return Py_BuildValue("nnn", cursor, written, looked);
}

static PyMethodDef CounterFlush_methods[] = {
    {"flush", (PyCFunction)CounterFlush_flush, METH_VARARGS, flush_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject CounterFlush_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "relay._counter_flush.CounterFlush",
    .tp_basicsize = sizeof(CounterFlush),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A partition's counter flush (see the module's docstring).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)CounterFlush_init,
    .tp_dealloc = (destructor)CounterFlush_dealloc,
    .tp_methods = CounterFlush_methods,
};

static struct PyModuleDef counter_flush_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "relay._counter_flush",
    .m_doc = "A worker's counter flush to shm in C (relay/_counter_flush.c).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__counter_flush(void)
{
    for (int f = 0; f < N_FIELDS; f++)
        if ((field_strings[f] = PyUnicode_InternFromString(field_names[f])) == NULL)
            return NULL;
    if (PyType_Ready(&CounterFlush_Type) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&counter_flush_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "CounterFlush", (PyObject *)&CounterFlush_Type) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
