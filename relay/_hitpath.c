/* relay._hitpath: the client -> transceiver hit path of one public socket, in C (CHitPath).
 *
 * Why C: the relay's per-datagram Python decided both of issue #4's misses. At call rates
 * (~20k pps per worker) each wakeup brings one datagram and the worker's CPU time per datagram
 * sets the latency tail; in a drain the batch loop's Python was ~13% of the time. In Python the
 * hit line (receive, address key, dict hit, header, send and its error rules, the flow's
 * counters) cost ~7 us of a 17.5 us datagram. relay.hit_path.PythonHitPath has the same
 * interface (forward_one, forward_batches, last_*, forwarded) and stays the reference and the
 * fallback (hit_path = "python", or no compiler at install time); both face the same tests.
 *
 * It decides nothing: a datagram goes the C way only when its source's sockaddr bytes (the
 * same bytes as relay.batchio's keys) are a key of the worker's FlowIndex (by_key's copy,
 * _flow_index.h) and the flow's transceiver has an open connected link (link_fds dict,
 * transceiver sockaddr bytes -> fd).
 * Then the tunnel Data header is written in the headroom in front of the payload: the flow's
 * prefix and the payload length as a big-endian uint16, the layout of
 * wire/tunnel_frame.py's DATA_HEADER_V4/DATA_HEADER_V6 (the prefix comes whole from the entry,
 * so only the length's two bytes are written here). The frame goes out on the link with
 * relay.batchio's send rules (_hitpath_rules.h), and the entry's packets_in/bytes_in count it
 * (_hitpath_entry.h). Everything else (a miss, a truncated datagram, a flow without a link)
 * stays in its slot for the worker.
 *
 * The slots are the Python receiver's (relay.batchio.BatchReceiver: buffer, offset, stride), so
 * the worker picks up what is left with take_one/take_batch and no copy.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

#include "_flow_fields.h"
#include "_flow_index.h"
#include "_hitpath_entry.h"
#include "_hitpath_rules.h"
#include "_returnpath.h"

#define KEY_LEN_V4 8     /* family, port, address: sin_zero is not part of the key */
#define DATA_LENGTH_LEN 2  /* the header's last field: the payload length (wire/tunnel_frame.py) */
#define LEFT_FOR_PYTHON (-2)
#define SENT (-3)

typedef struct {
    PyObject_HEAD
    int fd;               /* the public socket (non-blocking) */
    int batch;            /* slots */
    Py_buffer buffer;     /* the receiver's slots (held for our lifetime) */
    Py_ssize_t offset;    /* payload offset of slot 0 */
    Py_ssize_t stride;    /* slot i's payload is at offset + i * stride */
    Py_ssize_t headroom;  /* bytes free in front of each payload */
    Py_ssize_t bufsize;   /* the largest datagram kept whole */
    FlowIndex *index;     /* client sockaddr bytes -> FlowEntry */
    PyObject *link_fds;   /* dict: transceiver sockaddr bytes -> connected link fd */
    /* forward_one's datagram left for the worker */
    Py_ssize_t last_length;
    int last_truncated;
    PyObject *last_key;
    SendCounts counts;    /* send outcomes and errors, as relay.batchio's senders count them */
    /* forward_batches' arrays, one entry per slot */
    struct mmsghdr *rx_hdrs;
    struct iovec *rx_iovs;
    struct sockaddr_storage *rx_names;
    struct mmsghdr *tx_hdrs;
    struct iovec *tx_iovs;
    int *hit_fd;          /* link fd, LEFT_FOR_PYTHON or SENT */
    EntryLayout entry;    /* FlowEntry's __slots__ as offsets */
} CHitPath;

/* How many of the source's sockaddr bytes relay.batchio.sockaddr uses as its key. */
static Py_ssize_t
key_len(const struct sockaddr_storage *source, socklen_t source_len)
{
    if (source->ss_family == AF_INET)
        return KEY_LEN_V4;
    if (source->ss_family == AF_INET6)
        return sizeof(struct sockaddr_in6);
    return source_len;
}

/* The key as bytes: only for a datagram left for the worker (a hit needs no object). */
static PyObject *
key_of(const struct sockaddr_storage *source, socklen_t source_len)
{
    return PyBytes_FromStringAndSize((const char *)source, key_len(source, source_len));
}

/* Write the frame header of a hit in front of its payload (the prefix, then the length: the
 * DATA_HEADER_V4/V6 of wire/tunnel_frame.py) and return the fd of dest's link
 * (*frame_len: header + payload); LEFT_FOR_PYTHON when it has no link (the worker opens it)
 * or the header does not fit; -1 with an exception set. */
static int
write_header(CHitPath *self, PyObject *dest, const char *prefix, Py_ssize_t prefix_len, char *payload,
             Py_ssize_t length, size_t *frame_len)
{
    PyObject *link = PyDict_GetItemWithError(self->link_fds, dest); /* borrowed */
    Py_ssize_t header_len = prefix_len + DATA_LENGTH_LEN;
    if (link == NULL || header_len > self->headroom || length > 0xFFFF)
        return PyErr_Occurred() ? -1 : LEFT_FOR_PYTHON;
    int link_fd = _PyLong_AsInt(link);
    if (link_fd < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "a link fd must be >= 0");
        return -1;
    }
    char *header = payload - header_len;
    memcpy(header, prefix, (size_t)prefix_len);
    header[prefix_len] = (char)((length >> 8) & 0xFF);
    header[prefix_len + 1] = (char)(length & 0xFF);
    *frame_len = (size_t)(header_len + length);
    return link_fd;
}

/* prepare_hit for an entry of a type without FlowFields: through its attributes. */
static int
prepare_hit_by_attributes(CHitPath *self, PyObject *entry, char *payload, Py_ssize_t length, size_t *frame_len)
{
    Py_INCREF(entry); /* held while its attributes are read and set (that may run Python code) */
    int fd = -1;
    PyObject *dest = NULL, *prefix = PyObject_GetAttr(entry, s_prefix);
    if (prefix == NULL || (dest = PyObject_GetAttr(entry, s_tunnel_dest)) == NULL)
        goto done;
    if (!PyBytes_Check(prefix)) {
        PyErr_SetString(PyExc_TypeError, "a flow entry's prefix must be bytes");
        goto done;
    }
    fd = write_header(self, dest, PyBytes_AS_STRING(prefix), PyBytes_GET_SIZE(prefix), payload, length, frame_len);
    if (fd >= 0 && count_hit(&self->entry, entry, length) < 0)
        fd = -1;
done:
    Py_XDECREF(prefix);
    Py_XDECREF(dest);
    Py_DECREF(entry);
    return fd;
}

/* The datagram from `source` (its payload at `payload`, `length` bytes): when it hits a flow
 * whose transceiver has a link, write the frame header in front of it, count it on the flow,
 * and return the link's fd (*frame_len: header + payload). LEFT_FOR_PYTHON when it does not go
 * the C way; -1 with an exception set.
 *
 * A FlowEntry is read in place and borrowed: the index slot holds it and the object its prefix
 * copy came from, the entry holds its tunnel_dest, and nothing here runs Python code (the link
 * lookup's key is bytes). With the prefix copied in the slot, a hit reads two cache lines: the
 * slot and the entry's first. */
static int
prepare_hit(CHitPath *self, const struct sockaddr_storage *source, socklen_t source_len, char *payload,
            Py_ssize_t length, size_t *frame_len)
{
    IndexSlot *slot = index_find(self->index, (const unsigned char *)source, key_len(source, source_len));
    if (slot == NULL)
        return LEFT_FOR_PYTHON;
    PyObject *entry = slot->entry;
    if (self->entry.type == NULL)
        learn_entry_type(&self->entry, Py_TYPE(entry));
    if (Py_TYPE(entry) != self->entry.type)
        return prepare_hit_by_attributes(self, entry, payload, length, frame_len);
    PyObject *prefix = SLOT(entry, self->entry.off_prefix), *dest = SLOT(entry, self->entry.off_tunnel_dest);
    if (prefix == NULL || dest == NULL || !PyBytes_CheckExact(dest)
        || (prefix != slot->prefix && !PyBytes_Check(prefix))) {
        PyErr_SetString(PyExc_TypeError, "a flow entry's prefix and tunnel_dest must be bytes");
        return -1;
    }
    Py_ssize_t prefix_len;
    const char *prefix_bytes = slot_prefix(slot, prefix, &prefix_len);
    int fd = write_header(self, dest, prefix_bytes, prefix_len, payload, length, frame_len);
    if (fd >= 0 && count_hit(&self->entry, entry, length) < 0)
        return -1;
    return fd;
}

PyDoc_STRVAR(forward_one_doc,
"forward_one() -> int | None\n\n"
"Receive one datagram into slot 0 without blocking. None: nothing was waiting (or a transient\n"
"receive error, counted). n >= 0: it hit a flow with an open link and went to its\n"
"transceiver (n payload bytes; the send's outcome is counted in sent/dropped_eagain/failed).\n"
"-1: it is in slot 0 for the worker (last_length, last_key, last_truncated).");

static PyObject *
forward_one(CHitPath *self, PyObject *Py_UNUSED(ignored))
{
    char *payload = (char *)self->buffer.buf + self->offset;
    struct sockaddr_storage source;
    socklen_t source_len;
    ssize_t n;
    for (;;) {
        source_len = sizeof source;
        n = recvfrom(self->fd, payload, (size_t)self->bufsize, MSG_DONTWAIT | MSG_TRUNC,
                     (struct sockaddr *)&source, &source_len);
        if (n >= 0)
            break;
        int err = errno;
        if (err == EAGAIN || err == EWOULDBLOCK)
            Py_RETURN_NONE;
        if (!transient_recv(err))
            return raise_errno(err);
        if (count_error(&self->counts, err) < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    int truncated = n > self->bufsize;
    Py_ssize_t length = truncated ? self->bufsize : n;
    size_t frame_len = 0;
    int fd = truncated ? LEFT_FOR_PYTHON : prepare_hit(self, &source, source_len, payload, length, &frame_len);
    if (fd == LEFT_FOR_PYTHON) {
        PyObject *key = key_of(&source, source_len);
        if (key == NULL)
            return NULL;
        Py_XSETREF(self->last_key, key);
        self->last_length = length;
        self->last_truncated = truncated;
        return PyLong_FromLong(-1);
    }
    if (fd < 0)
        return NULL;
    struct iovec iov = {payload - (frame_len - (size_t)length), frame_len};
    struct mmsghdr hdr = {.msg_hdr = {.msg_iov = &iov, .msg_iovlen = 1}};
    if (send_with_rules(&self->counts, fd, &hdr, 1) < 0)
        return NULL;
    return PyLong_FromSsize_t(length);
}

/* One recvmmsg into the slots with relay.batchio's rules (MmsgReceiver._recv_again): the count,
 * 0 when nothing is waiting, -1 with an exception set. */
static int
receive_batch(CHitPath *self)
{
    for (int i = 0; i < self->batch; i++) {
        self->rx_hdrs[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_storage);
        self->rx_hdrs[i].msg_hdr.msg_flags = 0;
    }
    for (int tries = 0;; tries++) {
        int n = recvmmsg(self->fd, self->rx_hdrs, (unsigned int)self->batch, MSG_DONTWAIT, NULL);
        if (n >= 0)
            return n;
        int err = errno;
        if (err == EAGAIN || err == EWOULDBLOCK)
            return 0;
        if (!transient_recv(err)) {
            raise_errno(err);
            return -1;
        }
        if (count_error(&self->counts, err) < 0)
            return -1;
        if (tries == RECV_RETRIES)
            return 0;
    }
}

/* Send every prepared hit of slots [0, n): one sendmmsg per link, in slot order. */
static int
send_hits(CHitPath *self, int n)
{
    for (int i = 0; i < n; i++) {
        int fd = self->hit_fd[i];
        if (fd < 0)
            continue;
        int m = 0;
        for (int j = i; j < n; j++) {
            if (self->hit_fd[j] != fd)
                continue;
            memset(&self->tx_hdrs[m], 0, sizeof self->tx_hdrs[m]);
            self->tx_hdrs[m].msg_hdr.msg_iov = &self->tx_iovs[j];
            self->tx_hdrs[m].msg_hdr.msg_iovlen = 1;
            self->hit_fd[j] = SENT;
            m++;
        }
        if (send_with_rules(&self->counts, fd, self->tx_hdrs, m) < 0)
            return -1;
    }
    return 0;
}

/* (misses, lengths, keys, truncated) of slots [0, n): what the worker needs for what is left. */
static PyObject *
leftover_of(CHitPath *self, int n)
{
    PyObject *misses = PyList_New(0), *lengths = PyTuple_New(n), *keys = PyTuple_New(n), *truncated = PyTuple_New(n);
    if (misses == NULL || lengths == NULL || keys == NULL || truncated == NULL)
        goto fail;
    for (int i = 0; i < n; i++) {
        Py_ssize_t length = self->rx_hdrs[i].msg_len;
        int trunc = (self->rx_hdrs[i].msg_hdr.msg_flags & MSG_TRUNC) != 0;
        PyObject *value = PyLong_FromSsize_t(trunc || length > self->bufsize ? self->bufsize : length);
        if (value == NULL)
            goto fail;
        PyTuple_SET_ITEM(lengths, i, value);
        PyObject *key = key_of(&self->rx_names[i], self->rx_hdrs[i].msg_hdr.msg_namelen);
        if (key == NULL)
            goto fail;
        PyTuple_SET_ITEM(keys, i, key);
        PyTuple_SET_ITEM(truncated, i, PyBool_FromLong(trunc));
        if (self->hit_fd[i] == LEFT_FOR_PYTHON) {
            PyObject *index = PyLong_FromLong(i);
            if (index == NULL || PyList_Append(misses, index) < 0) {
                Py_XDECREF(index);
                goto fail;
            }
            Py_DECREF(index);
        }
    }
    return Py_BuildValue("(NNNN)", misses, lengths, keys, truncated);
fail:
    Py_XDECREF(misses);
    Py_XDECREF(lengths);
    Py_XDECREF(keys);
    Py_XDECREF(truncated);
    return NULL;
}

PyDoc_STRVAR(forward_batches_doc,
"forward_batches(max_batches) -> (packets, bytes, batches, last_count, leftover)\n\n"
"recvmmsg batches into the slots and send their hits, until the socket is empty, a batch is\n"
"short, max_batches were done, or a batch has datagrams for the worker. packets/bytes: the hits\n"
"(payload bytes); batches: recvmmsg calls that returned datagrams; last_count: what the last\n"
"recvmmsg returned (0: the socket was empty). leftover: None, or (misses, lengths, keys, truncated) of the last batch, its misses'\n"
"slots untouched (the hits in it are sent): for BatchReceiver.take_batch.");

static PyObject *
forward_batches(CHitPath *self, PyObject *arg)
{
    long max_batches = PyLong_AsLong(arg);
    if (max_batches == -1 && PyErr_Occurred())
        return NULL;
    char *base = (char *)self->buffer.buf;
    long long packets = 0, nbytes = 0;
    long batches = 0;
    int n = 0;
    PyObject *leftover = Py_None;
    while (batches < max_batches) {
        n = receive_batch(self);
        if (n < 0)
            return NULL;
        if (n == 0)
            break;
        batches++;
        int left = 0;
        for (int i = 0; i < n; i++) {
            struct msghdr *h = &self->rx_hdrs[i].msg_hdr;
            Py_ssize_t length = self->rx_hdrs[i].msg_len;
            char *payload = base + self->offset + i * self->stride;
            size_t frame_len = 0;
            int fd = (h->msg_flags & MSG_TRUNC) || length > self->bufsize
                ? LEFT_FOR_PYTHON : prepare_hit(self, &self->rx_names[i], h->msg_namelen, payload, length, &frame_len);
            if (fd == -1)
                return NULL;
            self->hit_fd[i] = fd;
            if (fd == LEFT_FOR_PYTHON) {
                left++;
                continue;
            }
            self->tx_iovs[i].iov_base = payload - (frame_len - (size_t)length);
            self->tx_iovs[i].iov_len = frame_len;
            packets++;
            nbytes += length;
        }
        if (left) {
            leftover = leftover_of(self, n); /* before send_hits marks the hits SENT */
            if (leftover == NULL)
                return NULL;
        }
        if (send_hits(self, n) < 0) {
            if (leftover != Py_None)
                Py_DECREF(leftover);
            return NULL;
        }
        if (left || n < self->batch)
            break;
    }
    return Py_BuildValue("(LLliN)", packets, nbytes, batches, n, leftover == Py_None ? Py_NewRef(Py_None) : leftover);
}

static void
free_arrays(CHitPath *self)
{
    PyMem_Free(self->rx_hdrs);
    PyMem_Free(self->rx_iovs);
    PyMem_Free(self->rx_names);
    PyMem_Free(self->tx_hdrs);
    PyMem_Free(self->tx_iovs);
    PyMem_Free(self->hit_fd);
    self->rx_hdrs = self->tx_hdrs = NULL;
    self->rx_iovs = self->tx_iovs = NULL;
    self->rx_names = NULL;
    self->hit_fd = NULL;
}

static int
CHitPath_init(CHitPath *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "buffer", "offset", "stride", "batch", "headroom", "bufsize", "index", "link_fds", NULL};
    int fd, batch;
    PyObject *buffer, *index, *link_fds;
    Py_ssize_t offset, stride, headroom, bufsize;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iOnninnO!O!", kwlist, &fd, &buffer, &offset, &stride,
                                     &batch, &headroom, &bufsize, &FlowIndex_Type, &index,
                                     &PyDict_Type, &link_fds))
        return -1;
    if (self->buffer.obj != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "CHitPath is already initialised");
        return -1;
    }
    if (fd < 0 || batch < 1 || headroom < 0 || headroom > offset || bufsize < 1 || stride < bufsize) {
        PyErr_SetString(PyExc_ValueError,
                        "need fd >= 0, batch >= 1, 0 <= headroom <= offset, 1 <= bufsize <= stride");
        return -1;
    }
    if (PyObject_GetBuffer(buffer, &self->buffer, PyBUF_WRITABLE) < 0)
        return -1;
    if (offset + (batch - 1) * stride + bufsize > self->buffer.len) {
        PyBuffer_Release(&self->buffer);
        PyErr_SetString(PyExc_ValueError, "the slots (offset + (batch - 1) * stride + bufsize) do not fit in the buffer");
        return -1;
    }
    self->fd = fd;
    self->batch = batch;
    self->offset = offset;
    self->stride = stride;
    self->headroom = headroom;
    self->bufsize = bufsize;
    Py_XSETREF(self->index, (FlowIndex *)Py_NewRef(index));
    Py_INCREF(link_fds);
    Py_XSETREF(self->link_fds, link_fds);
    PyObject *errors = PyDict_New();
    if (errors == NULL)
        return -1;
    Py_XSETREF(self->counts.errors, errors);
    self->rx_hdrs = PyMem_Calloc((size_t)batch, sizeof *self->rx_hdrs);
    self->rx_iovs = PyMem_Calloc((size_t)batch, sizeof *self->rx_iovs);
    self->rx_names = PyMem_Calloc((size_t)batch, sizeof *self->rx_names);
    self->tx_hdrs = PyMem_Calloc((size_t)batch, sizeof *self->tx_hdrs);
    self->tx_iovs = PyMem_Calloc((size_t)batch, sizeof *self->tx_iovs);
    self->hit_fd = PyMem_Calloc((size_t)batch, sizeof *self->hit_fd);
    if (!self->rx_hdrs || !self->rx_iovs || !self->rx_names || !self->tx_hdrs || !self->tx_iovs
        || !self->hit_fd) {
        PyErr_NoMemory();
        return -1;
    }
    char *base = (char *)self->buffer.buf;
    for (int i = 0; i < batch; i++) {
        self->rx_iovs[i].iov_base = base + offset + i * stride;
        self->rx_iovs[i].iov_len = (size_t)bufsize;
        self->rx_hdrs[i].msg_hdr.msg_name = &self->rx_names[i];
        self->rx_hdrs[i].msg_hdr.msg_iov = &self->rx_iovs[i];
        self->rx_hdrs[i].msg_hdr.msg_iovlen = 1;
    }
    return 0;
}

static int
CHitPath_traverse(CHitPath *self, visitproc visit, void *arg)
{
    Py_VISIT(self->index);
    Py_VISIT(self->entry.type);
    Py_VISIT(self->link_fds);
    Py_VISIT(self->counts.errors);
    /* Not buffer.obj: an exported buffer is released in dealloc only. Were it visited, a
     * cycle through it could be cleared while the export is held (a memoryview's tp_clear
     * then frees its managed buffer under us). Held, not visited, it keeps that alive. */
    return 0;
}

static int
CHitPath_clear(CHitPath *self)
{
    Py_CLEAR(self->index);
    Py_CLEAR(self->entry.type);
    Py_CLEAR(self->link_fds);
    Py_CLEAR(self->counts.errors);
    Py_CLEAR(self->last_key);
    return 0;
}

static void
CHitPath_dealloc(CHitPath *self)
{
    PyObject_GC_UnTrack(self);
    CHitPath_clear(self);
    free_arrays(self);
    if (self->buffer.obj != NULL)
        PyBuffer_Release(&self->buffer);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
get_last_key(CHitPath *self, void *Py_UNUSED(closure))
{
    if (self->last_key == NULL)
        Py_RETURN_NONE;
    return Py_NewRef(self->last_key);
}

static PyObject *
get_last_truncated(CHitPath *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->last_truncated);
}

static PyObject *
get_forwarded(CHitPath *self, void *Py_UNUSED(closure))
{
    const SendCounts *c = &self->counts;
    return PyLong_FromUnsignedLongLong(c->sent + c->dropped_eagain + c->failed);
}

static PyGetSetDef CHitPath_getset[] = {
    {"last_key", (getter)get_last_key, NULL, "sockaddr bytes of the datagram forward_one left for the worker", NULL},
    {"last_truncated", (getter)get_last_truncated, NULL, "it was larger than bufsize", NULL},
    {"forwarded", (getter)get_forwarded, NULL, "hits forwarded: sent + dropped_eagain + failed", NULL},
    {NULL},
};

static PyMemberDef CHitPath_members[] = {
    {"fd", T_INT, offsetof(CHitPath, fd), READONLY, NULL},
    {"batch", T_INT, offsetof(CHitPath, batch), READONLY, NULL},
    {"last_length", T_PYSSIZET, offsetof(CHitPath, last_length), READONLY, NULL},
    {"sent", T_ULONGLONG, offsetof(CHitPath, counts.sent), READONLY, NULL},
    {"dropped_eagain", T_ULONGLONG, offsetof(CHitPath, counts.dropped_eagain), READONLY, NULL},
    {"failed", T_ULONGLONG, offsetof(CHitPath, counts.failed), READONLY, NULL},
    {"errors", T_OBJECT, offsetof(CHitPath, counts.errors), READONLY, "errno -> count"},
    {NULL},
};

static PyMethodDef CHitPath_methods[] = {
    {"forward_one", (PyCFunction)forward_one, METH_NOARGS, forward_one_doc},
    {"forward_batches", (PyCFunction)forward_batches, METH_O, forward_batches_doc},
    {NULL},
};

PyDoc_STRVAR(CHitPath_doc,
"CHitPath(fd, buffer, offset, stride, batch, headroom, bufsize, index, link_fds)\n\n"
"The hit path of one public socket over a BatchReceiver's slots (payload i at\n"
"buffer[offset + i * stride], headroom bytes free in front, bufsize bytes): sources found in\n"
"index (a FlowIndex) whose transceiver is in link_fds go out on that connected socket. Both are\n"
"the worker's own, read at every datagram.");

static PyTypeObject CHitPath_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "relay._hitpath.CHitPath",
    .tp_basicsize = sizeof(CHitPath),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = CHitPath_doc,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)CHitPath_init,
    .tp_dealloc = (destructor)CHitPath_dealloc,
    .tp_traverse = (traverseproc)CHitPath_traverse,
    .tp_clear = (inquiry)CHitPath_clear,
    .tp_methods = CHitPath_methods,
    .tp_members = CHitPath_members,
    .tp_getset = CHitPath_getset,
};

static struct PyModuleDef hitpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "relay._hitpath",
    .m_doc = "The relay's packet paths in C: client -> transceiver (relay/hit_path.py), and back (relay/return_path.py).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__hitpath(void)
{
    if (intern_entry_names() < 0 || intern_return_names() < 0)
        return NULL;
    if (PyType_Ready(&CHitPath_Type) < 0 || PyType_Ready(&FlowIndex_Type) < 0 || PyType_Ready(&FlowFields_Type) < 0
        || PyType_Ready(&CReturnPath_Type) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&hitpath_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "CHitPath", (PyObject *)&CHitPath_Type) < 0
        || PyModule_AddObjectRef(m, "FlowIndex", (PyObject *)&FlowIndex_Type) < 0
        || PyModule_AddObjectRef(m, "FlowFields", (PyObject *)&FlowFields_Type) < 0
        || PyModule_AddObjectRef(m, "CReturnPath", (PyObject *)&CReturnPath_Type) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
