/* relay._hitpath.CReturnPath: the transceiver -> client return path of a worker's tunnel
 * links, in C (included once by relay/_hitpath.c).
 *
 * Why C: in Python a Data frame from a transceiver cost 1.2-1.9x the C reference's CPU (the
 * `t->c` column of bench/relay.py's cpu phase): receive, a dict lookup by handle, the header
 * compared with the flow's, a sendto; every call has as many datagrams this way as the
 * other, and the C hit path only served the other.
 *
 * It decides nothing: a frame goes the C way only when it is a Data frame whose handle is a
 * current flow's (the FlowIndex by_handle: the 8 handle bytes as the frame carries them), from
 * that flow's transceiver (the link's dest), whose header is the flow's `match` and whose
 * length field is the payload's; its payload then goes to the flow's client (client_key, the
 * sockaddr) from public socket public_index. Anything else (control frames, other handles, a
 * cluster relay's hop socket, an entry of another type) is handed back whole, as bytes, for
 * relay/return_path.py (the reference, which also serves the shared tunnel socket and a
 * transceiver whose network is not allowed). A batch with such a frame ends the call, so the
 * worker sees control frames in order with the batches around them.
 */
#ifndef RTCRELAY_RETURNPATH_H
#define RTCRELAY_RETURNPATH_H

#include <Python.h>

#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

#include "_flow_index.h"
#include "_hitpath_rules.h"
#include "_slots.h"

#define DATA_TAG_LEN 4
#define HANDLE_LEN 8
static const unsigned char DATA_TAG_BYTES[DATA_TAG_LEN] = {0x01, 0x95, 0x01, 0xCF}; /* wire/tunnel_frame.py DATA_TAG */
#define NOT_OURS (-1)

/* What the return path reads of a flow entry's type (relay.flow_entry.FlowEntry). */
typedef struct {
    PyTypeObject *type;
    Py_ssize_t match, tunnel_dest, client_key, public_index, packets_out, bytes_out;
} ReturnLayout;

typedef struct {
    PyObject_HEAD
    int batch;
    Py_ssize_t bufsize;       /* a frame this long or longer is oversized (truncated) */
    char *frames;             /* batch frames of bufsize + 1 bytes */
    FlowIndex *by_handle;
    int publics;
    int *public_fds;
    Py_ssize_t *header_lens;  /* per public socket: the Data header's length for its family */
    struct mmsghdr *rx_hdrs, *tx_hdrs;
    struct iovec *rx_iovs, *tx_iovs;
    struct sockaddr_storage *tx_names;
    int *tx_public;           /* per frame: the public socket it goes out on, or NOT_OURS */
    ReturnLayout layout;
    SendCounts counts;
    unsigned long long forwarded;
} CReturnPath;

static PyObject *s_match, *s_client_key, *s_public_index, *s_packets_out, *s_bytes_out;

static int
learn_return_layout(ReturnLayout *layout, PyTypeObject *type)
{
    ReturnLayout l = {type, slot_offset(type, s_match), slot_offset(type, s_tunnel_dest),
                      slot_offset(type, s_client_key), slot_offset(type, s_public_index),
                      int_member_offset(type, s_packets_out), int_member_offset(type, s_bytes_out)};
    if (l.match < 0 || l.tunnel_dest < 0 || l.client_key < 0 || l.public_index < 0 || l.packets_out < 0
        || l.bytes_out < 0)
        return -1;
    Py_INCREF(type);
    Py_XDECREF(layout->type);
    *layout = l; /* (holds the reference just taken) */
    return 0;
}

/* Frame i (`length` bytes at `frame`) from the link to `dest`: when it is one of its flows'
 * Data frames, point tx slot i at its payload and client and count it on the flow: its
 * payload length. NOT_OURS otherwise (no exception is set: anything odd is the worker's). */
static Py_ssize_t
prepare_return(CReturnPath *self, int i, char *frame, Py_ssize_t length, PyObject *dest)
{
    self->tx_public[i] = NOT_OURS;
    if (length < DATA_TAG_LEN + HANDLE_LEN || memcmp(frame, DATA_TAG_BYTES, DATA_TAG_LEN) != 0)
        return NOT_OURS;
    IndexSlot *slot = index_find(self->by_handle, (const unsigned char *)frame + DATA_TAG_LEN, HANDLE_LEN);
    if (slot == NULL)
        return NOT_OURS;
    PyObject *entry = slot->entry; /* borrowed: nothing here runs Python code */
    if (Py_TYPE(entry) != self->layout.type && learn_return_layout(&self->layout, Py_TYPE(entry)) < 0)
        return NOT_OURS;
    const ReturnLayout *l = &self->layout;
    PyObject *tunnel_dest = SLOT(entry, l->tunnel_dest), *match = SLOT(entry, l->match);
    PyObject *client = SLOT(entry, l->client_key), *public_index = SLOT(entry, l->public_index);
    if (tunnel_dest == NULL || match == NULL || client == NULL || public_index == NULL
        || !PyLong_CheckExact(public_index) || !PyBytes_CheckExact(client))
        return NOT_OURS;
    if (tunnel_dest != dest && (!PyBytes_CheckExact(tunnel_dest) || PyBytes_GET_SIZE(tunnel_dest) != PyBytes_GET_SIZE(dest)
                                || memcmp(PyBytes_AS_STRING(tunnel_dest), PyBytes_AS_STRING(dest),
                                          (size_t)PyBytes_GET_SIZE(dest)) != 0))
        return NOT_OURS;
    long which = PyLong_AsLong(public_index);
    if (which < 0 || which >= self->publics || (match != slot->prefix && !PyBytes_Check(match)))
        return NOT_OURS; /* (a hop socket's flow: the worker's HopReturn) */
    Py_ssize_t header_len = self->header_lens[which], match_len;
    const char *match_bytes = slot_prefix(slot, match, &match_len);
    Py_ssize_t payload_len = length - header_len;
    if (match_len != header_len - 2 || payload_len < 0 || memcmp(frame, match_bytes, (size_t)match_len) != 0
        || (((unsigned char)frame[match_len] << 8) | (unsigned char)frame[match_len + 1]) != payload_len)
        return NOT_OURS;
    Py_ssize_t client_len = PyBytes_GET_SIZE(client);
    if (client_len > (Py_ssize_t)sizeof(struct sockaddr_storage))
        return NOT_OURS;
    struct sockaddr_storage *name = &self->tx_names[i];
    memset(name, 0, sizeof *name);
    memcpy(name, PyBytes_AS_STRING(client), (size_t)client_len);
    socklen_t name_len = name->ss_family == AF_INET ? sizeof(struct sockaddr_in)
                       : name->ss_family == AF_INET6 ? sizeof(struct sockaddr_in6) : (socklen_t)client_len;
    memset(&self->tx_hdrs[i], 0, sizeof self->tx_hdrs[i]);
    self->tx_iovs[i].iov_base = frame + header_len;
    self->tx_iovs[i].iov_len = (size_t)payload_len;
    self->tx_hdrs[i].msg_hdr.msg_name = name;
    self->tx_hdrs[i].msg_hdr.msg_namelen = name_len;
    self->tx_hdrs[i].msg_hdr.msg_iov = &self->tx_iovs[i];
    self->tx_hdrs[i].msg_hdr.msg_iovlen = 1;
    self->tx_public[i] = (int)which;
    INT_FIELD(entry, l->packets_out) += 1;
    INT_FIELD(entry, l->bytes_out) += payload_len;
    return payload_len;
}

/* Send the prepared frames of [0, n): one sendmmsg per public socket, in frame order. */
static int
send_returns(CReturnPath *self, int n)
{
    struct mmsghdr *out = self->rx_hdrs; /* (the receive headers are free until the next batch) */
    for (int i = 0; i < n; i++) {
        int which = self->tx_public[i];
        if (which == NOT_OURS)
            continue;
        int m = 0;
        for (int j = i; j < n; j++) {
            if (self->tx_public[j] != which)
                continue;
            out[m++] = self->tx_hdrs[j];
            self->tx_public[j] = NOT_OURS;
        }
        if (send_with_rules(&self->counts, self->public_fds[which], out, m) < 0)
            return -1;
    }
    return 0;
}

static void
arm_receive(CReturnPath *self)
{
    for (int i = 0; i < self->batch; i++) {
        self->rx_iovs[i].iov_base = self->frames + (size_t)i * (size_t)(self->bufsize + 1);
        self->rx_iovs[i].iov_len = (size_t)self->bufsize + 1;
        memset(&self->rx_hdrs[i], 0, sizeof self->rx_hdrs[i]);
        self->rx_hdrs[i].msg_hdr.msg_iov = &self->rx_iovs[i];
        self->rx_hdrs[i].msg_hdr.msg_iovlen = 1;
    }
}

PyDoc_STRVAR(return_forward_doc,
"forward(fd, dest, max_batches) -> (packets, bytes, others, oversized, error)\n\n"
"recvmmsg batches from the link fd (connected to the transceiver whose tunnel sockaddr bytes are\n"
"dest) and send the payloads of its flows' Data frames to their clients, until the link is\n"
"empty, a batch is short, max_batches were done, a batch had other frames, or a receive failed.\n"
"packets/bytes: the payloads sent; others: the other frames, as bytes, for the worker;\n"
"oversized: frames of bufsize bytes or more (dropped); error: a receive's errno, else 0.");

static PyObject *
CReturnPath_forward(CReturnPath *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyBytes_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "forward(fd: int, dest: bytes, max_batches: int)");
        return NULL;
    }
    int fd = _PyLong_AsInt(args[0]);
    long max_batches = PyLong_AsLong(args[2]);
    if ((fd == -1 || max_batches == -1) && PyErr_Occurred())
        return NULL;
    PyObject *dest = args[1], *others = PyList_New(0);
    if (others == NULL)
        return NULL;
    long long packets = 0, nbytes = 0;
    long oversized = 0;
    int error = 0;
    for (long batches = 0; batches < max_batches && PyList_GET_SIZE(others) == 0; batches++) {
        arm_receive(self);
        int n = recvmmsg(fd, self->rx_hdrs, (unsigned int)self->batch, MSG_DONTWAIT, NULL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                error = errno;
            break;
        }
        for (int i = 0; i < n; i++) {
            char *frame = self->rx_iovs[i].iov_base;
            Py_ssize_t length = self->rx_hdrs[i].msg_len;
            self->tx_public[i] = NOT_OURS;
            if ((self->rx_hdrs[i].msg_hdr.msg_flags & MSG_TRUNC) || length > self->bufsize - 1) {
                oversized++;
                continue;
            }
            Py_ssize_t sent = prepare_return(self, i, frame, length, dest);
            if (sent >= 0) {
                packets++;
                nbytes += sent;
                continue;
            }
            PyObject *copy = PyBytes_FromStringAndSize(frame, length);
            if (copy == NULL || PyList_Append(others, copy) < 0) {
                Py_XDECREF(copy);
                Py_DECREF(others);
                return NULL;
            }
            Py_DECREF(copy);
        }
        if (send_returns(self, n) < 0) {
            Py_DECREF(others);
            return NULL;
        }
        if (n < self->batch)
            break;
    }
    self->forwarded += (unsigned long long)packets;
    return Py_BuildValue("(LLNli)", packets, nbytes, others, oversized, error);
}

static void
CReturnPath_free_arrays(CReturnPath *self)
{
    PyMem_Free(self->frames);
    PyMem_Free(self->public_fds);
    PyMem_Free(self->header_lens);
    PyMem_Free(self->rx_hdrs);
    PyMem_Free(self->tx_hdrs);
    PyMem_Free(self->rx_iovs);
    PyMem_Free(self->tx_iovs);
    PyMem_Free(self->tx_names);
    PyMem_Free(self->tx_public);
    self->frames = NULL;
    self->public_fds = NULL;
    self->header_lens = NULL;
    self->rx_hdrs = self->tx_hdrs = NULL;
    self->rx_iovs = self->tx_iovs = NULL;
    self->tx_names = NULL;
    self->tx_public = NULL;
}

static int
CReturnPath_init(CReturnPath *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"by_handle", "public_fds", "header_lens", "batch", "bufsize", NULL};
    PyObject *by_handle, *fds, *lens;
    int batch;
    Py_ssize_t bufsize;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!O!in", kwlist, &FlowIndex_Type, &by_handle, &PyTuple_Type, &fds,
                                     &PyTuple_Type, &lens, &batch, &bufsize))
        return -1;
    if (self->frames != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "CReturnPath is already initialised");
        return -1;
    }
    Py_ssize_t publics = PyTuple_GET_SIZE(fds);
    if (batch < 1 || bufsize < DATA_TAG_LEN + HANDLE_LEN + 2 || publics != PyTuple_GET_SIZE(lens) || publics > 1024) {
        PyErr_SetString(PyExc_ValueError, "need batch >= 1, bufsize >= 14, a header length per public fd");
        return -1;
    }
    self->batch = batch;
    self->bufsize = bufsize;
    self->publics = (int)publics;
    self->frames = PyMem_Malloc((size_t)batch * (size_t)(bufsize + 1));
    self->public_fds = PyMem_Calloc((size_t)publics + 1, sizeof *self->public_fds);
    self->header_lens = PyMem_Calloc((size_t)publics + 1, sizeof *self->header_lens);
    self->rx_hdrs = PyMem_Calloc((size_t)batch, sizeof *self->rx_hdrs);
    self->tx_hdrs = PyMem_Calloc((size_t)batch, sizeof *self->tx_hdrs);
    self->rx_iovs = PyMem_Calloc((size_t)batch, sizeof *self->rx_iovs);
    self->tx_iovs = PyMem_Calloc((size_t)batch, sizeof *self->tx_iovs);
    self->tx_names = PyMem_Calloc((size_t)batch, sizeof *self->tx_names);
    self->tx_public = PyMem_Calloc((size_t)batch, sizeof *self->tx_public);
    if (!self->frames || !self->public_fds || !self->header_lens || !self->rx_hdrs || !self->tx_hdrs
        || !self->rx_iovs || !self->tx_iovs || !self->tx_names || !self->tx_public) {
        CReturnPath_free_arrays(self);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t p = 0; p < publics; p++) {
        int fd = _PyLong_AsInt(PyTuple_GET_ITEM(fds, p));
        Py_ssize_t len = PyLong_AsSsize_t(PyTuple_GET_ITEM(lens, p));
        if (PyErr_Occurred() || fd < 0 || len < DATA_TAG_LEN + HANDLE_LEN + 2 || len >= bufsize) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "a public fd >= 0 and a header length in [14, bufsize)");
            CReturnPath_free_arrays(self);
            return -1;
        }
        self->public_fds[p] = fd;
        self->header_lens[p] = len;
    }
    PyObject *errors = PyDict_New();
    if (errors == NULL) {
        CReturnPath_free_arrays(self);
        return -1;
    }
    Py_XSETREF(self->counts.errors, errors);
    Py_XSETREF(self->by_handle, (FlowIndex *)Py_NewRef(by_handle));
    return 0;
}

static int
CReturnPath_traverse(CReturnPath *self, visitproc visit, void *arg)
{
    Py_VISIT(self->by_handle);
    Py_VISIT(self->layout.type);
    Py_VISIT(self->counts.errors);
    return 0;
}

static int
CReturnPath_clear(CReturnPath *self)
{
    Py_CLEAR(self->by_handle);
    Py_CLEAR(self->layout.type);
    Py_CLEAR(self->counts.errors);
    return 0;
}

static void
CReturnPath_dealloc(CReturnPath *self)
{
    PyObject_GC_UnTrack(self);
    CReturnPath_clear(self);
    CReturnPath_free_arrays(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef CReturnPath_members[] = {
    {"batch", T_INT, offsetof(CReturnPath, batch), READONLY, NULL},
    {"forwarded", T_ULONGLONG, offsetof(CReturnPath, forwarded), READONLY, "payloads sent to clients"},
    {"sent", T_ULONGLONG, offsetof(CReturnPath, counts.sent), READONLY, NULL},
    {"dropped_eagain", T_ULONGLONG, offsetof(CReturnPath, counts.dropped_eagain), READONLY, NULL},
    {"failed", T_ULONGLONG, offsetof(CReturnPath, counts.failed), READONLY, NULL},
    {"errors", T_OBJECT, offsetof(CReturnPath, counts.errors), READONLY, "send errno -> count"},
    {NULL},
};

static PyMethodDef CReturnPath_methods[] = {
    {"forward", (PyCFunction)(void (*)(void))CReturnPath_forward, METH_FASTCALL, return_forward_doc},
    {NULL},
};

static PyTypeObject CReturnPath_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "relay._hitpath.CReturnPath",
    .tp_basicsize = sizeof(CReturnPath),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "CReturnPath(by_handle, public_fds, header_lens, batch, bufsize): a worker's return path "
              "on its tunnel links (relay/_returnpath.h).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)CReturnPath_init,
    .tp_dealloc = (destructor)CReturnPath_dealloc,
    .tp_traverse = (traverseproc)CReturnPath_traverse,
    .tp_clear = (inquiry)CReturnPath_clear,
    .tp_methods = CReturnPath_methods,
    .tp_members = CReturnPath_members,
};

static int
intern_return_names(void)
{
    return (s_match = PyUnicode_InternFromString("match")) == NULL
        || (s_client_key = PyUnicode_InternFromString("client_key")) == NULL
        || (s_public_index = PyUnicode_InternFromString("public_index")) == NULL
        || (s_packets_out = PyUnicode_InternFromString("packets_out")) == NULL
        || (s_bytes_out = PyUnicode_InternFromString("bytes_out")) == NULL ? -1 : 0;
}

#endif /* RTCRELAY_RETURNPATH_H */
