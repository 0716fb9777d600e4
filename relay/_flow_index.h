/* relay._hitpath.FlowIndex: the worker's flows by client sockaddr bytes, for the C hit path
 * (included once by relay/_hitpath.c).
 *
 * Why not the by_key dict: at 50,000 flows a dict hit is three cache misses (its index, its
 * entry, the stored key object the bytes are compared with) plus a bytes object built from the
 * source address to look it up; in a drain at 50,000 flows _Py_dict_lookup alone was 8% of the
 * worker's samples and the relay drained 0.83x of the C reference (0.93x at 64 flows). Here a
 * lookup hashes the source sockaddr where recvmmsg put it and reads one 64-byte slot (a cache
 * line): an IPv4 key (8 bytes) is compared inline, a longer one (IPv6, 28) against the stored
 * bytes. The slot also keeps a copy of the entry's prefix (the frame header, 22-23 bytes for
 * an IPv4 client) with a reference to the bytes object it copied: while the entry's prefix is
 * that object the hit writes the copy, and the prefix object (one more miss) is not read. A
 * rehandle gives the entry a new prefix object: the next hit copies that one.
 *
 * Open addressing, linear probing, at most half full, deletion by backward shift (no
 * tombstones: a table that sees every call's flows come and go never degrades). The hash is
 * keyed with a per-index random seed: flows are only added after authentication, but their
 * source ports are the client's to choose.
 *
 * relay.flows.LocalFlows keeps it next to by_key (set in _add, discard in _remove): by_key stays
 * what Python reads; this is the hit path's copy.
 */
#ifndef RTCRELAY_FLOW_INDEX_H
#define RTCRELAY_FLOW_INDEX_H

#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#define INDEX_MIN_BITS 6
#define INDEX_MAX_KEY 63   /* a key's length is kept in the tag's low 6 bits */
#define INLINE_KEY 8       /* keys up to this long are compared without their bytes object */

#define PREFIX_COPY 23

typedef struct {
    uint64_t tag;       /* 0: empty; else the hash's high bits | 0x40 | length */
    uint64_t head;      /* the key's first 8 bytes, zero padded */
    PyObject *entry;    /* strong */
    PyObject *key;      /* strong: the bytes */
    PyObject *prefix;   /* strong, or NULL: the bytes object prefix_copy was copied from */
    uint8_t prefix_len;
    char prefix_copy[PREFIX_COPY];
} IndexSlot;            /* 64 bytes: the slots are cache-line aligned */
_Static_assert(sizeof(IndexSlot) == 64, "an index slot is one cache line");

typedef struct {
    PyObject_HEAD
    IndexSlot *slots;
    int bits;
    Py_ssize_t used;
    uint64_t seed;
} FlowIndex;

static inline uint64_t
mix64(uint64_t x) /* splitmix64's finaliser */
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static inline uint64_t
load_word(const unsigned char *p, Py_ssize_t n) /* up to 8 bytes, zero padded */
{
    uint64_t w = 0;
    memcpy(&w, p, (size_t)(n < 8 ? n : 8));
    return w;
}

static inline uint64_t
tag_of(const FlowIndex *self, const unsigned char *key, Py_ssize_t len)
{
    uint64_t h = self->seed ^ (uint64_t)len;
    for (Py_ssize_t off = 0; off < len; off += 8)
        h = mix64(h ^ load_word(key + off, len - off));
    return (h & ~(uint64_t)0x7F) | 0x40 | (uint64_t)len;
}

static inline size_t
home_of(uint64_t tag, int bits)
{
    return (size_t)(tag >> (64 - bits));
}

static inline int
slot_matches(const IndexSlot *s, uint64_t tag, uint64_t head, const unsigned char *key, Py_ssize_t len)
{
    if (s->tag != tag || s->head != head)
        return 0;
    if (len <= INLINE_KEY)
        return 1;
    return PyBytes_GET_SIZE(s->key) == len && memcmp(PyBytes_AS_STRING(s->key), key, (size_t)len) == 0;
}

/* The slot of `key`, or NULL. */
static inline IndexSlot *
index_find(const FlowIndex *self, const unsigned char *key, Py_ssize_t len)
{
    if (len > INDEX_MAX_KEY || self->slots == NULL)
        return NULL;
    uint64_t tag = tag_of(self, key, len), head = load_word(key, len);
    size_t mask = ((size_t)1 << self->bits) - 1;
    for (size_t i = home_of(tag, self->bits);; i = (i + 1) & mask) {
        IndexSlot *s = &self->slots[i];
        if (s->tag == 0)
            return NULL;
        if (slot_matches(s, tag, head, key, len))
            return s;
    }
}


/* Place a slot known to be absent (steals its references). */
static void
index_place(IndexSlot *slots, int bits, IndexSlot slot)
{
    size_t mask = ((size_t)1 << bits) - 1;
    size_t i = home_of(slot.tag, bits);
    while (slots[i].tag != 0)
        i = (i + 1) & mask;
    slots[i] = slot;
}

/* The prefix bytes to write for slot s whose entry's prefix is `prefix` (a bytes object): the
 * slot's copy, made now if it is of another object. */
static inline const char *
slot_prefix(IndexSlot *s, PyObject *prefix, Py_ssize_t *len)
{
    if (s->prefix == prefix) {
        *len = s->prefix_len;
        return s->prefix_copy;
    }
    *len = PyBytes_GET_SIZE(prefix);
    if (*len > PREFIX_COPY)
        return PyBytes_AS_STRING(prefix);
    memcpy(s->prefix_copy, PyBytes_AS_STRING(prefix), (size_t)*len);
    s->prefix_len = (uint8_t)*len;
    Py_XSETREF(s->prefix, Py_NewRef(prefix));
    return s->prefix_copy;
}

static void
slot_release(IndexSlot *s)
{
    Py_DECREF(s->entry);
    Py_DECREF(s->key);
    Py_XDECREF(s->prefix);
}

static int
index_grow(FlowIndex *self, int bits)
{
    size_t bytes = ((size_t)1 << bits) * sizeof(IndexSlot);
    IndexSlot *slots = NULL;
    if (posix_memalign((void **)&slots, 64, bytes) != 0) {
        PyErr_NoMemory();
        return -1;
    }
    memset(slots, 0, bytes);
    if (self->slots != NULL) {
        for (size_t i = 0; i < ((size_t)1 << self->bits); i++)
            if (self->slots[i].tag != 0)
                index_place(slots, bits, self->slots[i]);
        free(self->slots);
    }
    self->slots = slots;
    self->bits = bits;
    return 0;
}

/* Empty slot i, shifting back the slots after it that probed past it. */
static void
index_delete_at(FlowIndex *self, size_t i)
{
    size_t mask = ((size_t)1 << self->bits) - 1;
    IndexSlot *slots = self->slots;
    IndexSlot gone = slots[i];
    for (size_t j = (i + 1) & mask; slots[j].tag != 0; j = (j + 1) & mask) {
        size_t home = home_of(slots[j].tag, self->bits);
        /* slot j may move to the hole at i unless its home lies cyclically in (i, j] */
        int stays = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (!stays) {
            slots[i] = slots[j];
            i = j;
        }
    }
    memset(&slots[i], 0, sizeof slots[i]);
    self->used--;
    slot_release(&gone);
}

static int
key_arg(PyObject *key)
{
    if (!PyBytes_Check(key)) {
        PyErr_SetString(PyExc_TypeError, "a FlowIndex key must be bytes");
        return -1;
    }
    if (PyBytes_GET_SIZE(key) > INDEX_MAX_KEY) {
        PyErr_Format(PyExc_ValueError, "a FlowIndex key is at most %d bytes", INDEX_MAX_KEY);
        return -1;
    }
    return 0;
}

static PyObject *
FlowIndex_set(FlowIndex *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "set(key, entry)");
        return NULL;
    }
    PyObject *key = args[0], *entry = args[1];
    if (key_arg(key) < 0)
        return NULL;
    const unsigned char *k = (const unsigned char *)PyBytes_AS_STRING(key);
    Py_ssize_t len = PyBytes_GET_SIZE(key);
    IndexSlot *s = index_find(self, k, len);
    if (s != NULL) {
        Py_SETREF(s->entry, Py_NewRef(entry));
        Py_RETURN_NONE;
    }
    if (self->slots == NULL || (self->used + 1) * 2 > ((Py_ssize_t)1 << self->bits)) {
        if (index_grow(self, self->slots == NULL ? INDEX_MIN_BITS : self->bits + 1) < 0)
            return NULL;
    }
    IndexSlot slot = {tag_of(self, k, len), load_word(k, len), Py_NewRef(entry), Py_NewRef(key), NULL, 0, {0}};
    index_place(self->slots, self->bits, slot);
    self->used++;
    Py_RETURN_NONE;
}

static PyObject *
FlowIndex_discard(FlowIndex *self, PyObject *key)
{
    if (key_arg(key) < 0)
        return NULL;
    IndexSlot *s = index_find(self, (const unsigned char *)PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key));
    if (s == NULL)
        Py_RETURN_FALSE;
    index_delete_at(self, (size_t)(s - self->slots));
    Py_RETURN_TRUE;
}

static PyObject *
FlowIndex_get(FlowIndex *self, PyObject *key)
{
    if (key_arg(key) < 0)
        return NULL;
    IndexSlot *s = index_find(self, (const unsigned char *)PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key));
    return Py_NewRef(s == NULL ? Py_None : s->entry);
}

static int
FlowIndex_clear(FlowIndex *self)
{
    IndexSlot *slots = self->slots;
    size_t n = slots == NULL ? 0 : (size_t)1 << self->bits;
    self->slots = NULL;
    self->used = 0;
    for (size_t i = 0; i < n; i++) {
        if (slots[i].tag != 0)
            slot_release(&slots[i]);
    }
    free(slots);
    return 0;
}

static PyObject *
FlowIndex_clear_method(FlowIndex *self, PyObject *Py_UNUSED(ignored))
{
    FlowIndex_clear(self);
    Py_RETURN_NONE;
}

static int
FlowIndex_traverse(FlowIndex *self, visitproc visit, void *arg)
{
    if (self->slots != NULL) {
        for (size_t i = 0; i < ((size_t)1 << self->bits); i++) {
            if (self->slots[i].tag != 0)
                Py_VISIT(self->slots[i].entry);
        }
    }
    return 0;
}

static void
FlowIndex_dealloc(FlowIndex *self)
{
    PyObject_GC_UnTrack(self);
    FlowIndex_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
FlowIndex_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (!_PyArg_NoKeywords("FlowIndex", kwds) || !_PyArg_NoPositional("FlowIndex", args))
        return NULL;
    FlowIndex *self = (FlowIndex *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    if (getrandom(&self->seed, sizeof self->seed, 0) != (ssize_t)sizeof self->seed) {
        Py_DECREF(self);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return (PyObject *)self;
}

static Py_ssize_t
FlowIndex_len(FlowIndex *self)
{
    return self->used;
}

static PyObject *
FlowIndex_capacity(FlowIndex *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSize_t(self->slots == NULL ? 0 : (size_t)1 << self->bits);
}

static PyMethodDef FlowIndex_methods[] = {
    {"set", (PyCFunction)(void (*)(void))FlowIndex_set, METH_FASTCALL, "set(key, entry): key -> entry"},
    {"discard", (PyCFunction)FlowIndex_discard, METH_O, "discard(key) -> bool: it was there"},
    {"get", (PyCFunction)FlowIndex_get, METH_O, "get(key) -> entry | None"},
    {"clear", (PyCFunction)FlowIndex_clear_method, METH_NOARGS, "forget every key"},
    {NULL},
};

static PyGetSetDef FlowIndex_getset[] = {
    {"capacity", (getter)FlowIndex_capacity, NULL, "slots (at most half are used)", NULL},
    {NULL},
};

static PySequenceMethods FlowIndex_as_sequence = {
    .sq_length = (lenfunc)FlowIndex_len,
};

static PyTypeObject FlowIndex_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "relay._hitpath.FlowIndex",
    .tp_basicsize = sizeof(FlowIndex),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "FlowIndex(): client sockaddr bytes -> flow entry, for CHitPath (relay/_flow_index.h).",
    .tp_new = FlowIndex_new,
    .tp_dealloc = (destructor)FlowIndex_dealloc,
    .tp_traverse = (traverseproc)FlowIndex_traverse,
    .tp_clear = (inquiry)FlowIndex_clear,
    .tp_methods = FlowIndex_methods,
    .tp_getset = FlowIndex_getset,
    .tp_as_sequence = &FlowIndex_as_sequence,
};

#endif /* RTCRELAY_FLOW_INDEX_H */
