/* relay._fastpath: the client -> transceiver hit path of one public socket, in C.
 *
 * Why C: the relay's per-datagram Python decided both of issue #4's misses. At call rates
 * (~20k pps per worker) each wakeup brings one datagram and the worker's CPU time per datagram
 * sets the latency tail; in a drain the batch loop's Python was ~13% of the time. In Python the
 * hit line (receive, address key, dict hit, header, send and its error rules, the flow's
 * counters) cost ~7 us of a 17.5 us datagram. The Python lines in relay/worker.py stay the
 * reference and the fallback (hot_path = "python", or no compiler at install time); both face
 * the same tests.
 *
 * It decides nothing: a datagram goes the C way only when its source's sockaddr bytes (the
 * same bytes as relay.batchio's keys) are a key of the worker's by_key dict and the flow's
 * transceiver has an open connected link (link_fds dict, transceiver sockaddr bytes -> fd).
 * Then the flow's prefix and the payload length are written in the headroom in front of the
 * payload (the tunnel Data frame, wire/tunnel_frame.py), the frame goes out on the link with
 * relay.batchio's send rules, and the entry's packets_in/bytes_in count it. Everything else (a
 * miss, a truncated datagram, a flow without a link) stays in its slot for Python.
 *
 * The slots are the Python receiver's (relay.batchio.BatchReceiver: buffer, offsets, stride), so
 * Python picks up what is left with take_one/take_batch and no copy.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

#define KEY_LEN_V4 8     /* family, port, address: sin_zero is not part of the key */
#define RECV_RETRIES 3   /* relay.batchio.errors.RECV_RETRIES */
#define SEND_EINTR_MAX 8 /* relay.batchio.errors.SEND_EINTR_RETRIES */
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
    PyObject *by_key;     /* dict: client sockaddr bytes -> FlowEntry */
    PyObject *link_fds;   /* dict: transceiver sockaddr bytes -> connected link fd */
    /* forward_one's datagram left for Python */
    Py_ssize_t last_length;
    int last_truncated;
    PyObject *last_key;
    /* send outcomes, as relay.batchio's senders count them */
    unsigned long long sent;
    unsigned long long dropped_eagain;
    unsigned long long failed;
    PyObject *errors;     /* dict: errno -> count (receive and send) */
    /* forward_batches' arrays, one entry per slot */
    struct mmsghdr *rx_hdrs;
    struct iovec *rx_iovs;
    struct sockaddr_storage *rx_names;
    struct mmsghdr *tx_hdrs;
    struct iovec *tx_iovs;
    int *hit_fd;          /* link fd, LEFT_FOR_PYTHON or SENT */
    PyObject **keys;      /* the last batch's keys */
    /* FlowEntry's __slots__ as offsets (entry_type NULL: not learned yet, or not slots) */
    PyTypeObject *entry_type;
    Py_ssize_t off_prefix, off_tunnel_dest, off_packets_in, off_bytes_in;
} PublicFastPath;

static PyObject *s_prefix, *s_tunnel_dest, *s_packets_in, *s_bytes_in;

static int
count_error(PublicFastPath *self, int err)
{
    PyObject *key = PyLong_FromLong(err);
    if (key == NULL)
        return -1;
    PyObject *old = PyDict_GetItemWithError(self->errors, key);
    long n = old == NULL ? 0 : PyLong_AsLong(old);
    PyObject *value = PyLong_FromLong(n + 1);
    int r = value == NULL ? -1 : PyDict_SetItem(self->errors, key, value);
    Py_XDECREF(value);
    Py_DECREF(key);
    return r;
}

static PyObject *
raise_errno(int err)
{
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* relay.batchio.errors.ASYNC_SEND: an earlier datagram's ICMP error, reported by this call,
 * which sent nothing: retried once. */
static int
async_send(int err)
{
    switch (err) {
    case ECONNREFUSED: case EHOSTUNREACH: case ENETUNREACH: case EHOSTDOWN: case ENETDOWN:
    case EPROTO:
#ifdef ENONET
    case ENONET:
#endif
        return 1;
    }
    return 0;
}

/* relay.batchio.errors.TRANSIENT_RECV (a superset of ASYNC_SEND): a receive error about an
 * earlier datagram (ICMP) or a passing shortage; nothing was received, the socket is fine. */
static int
transient_recv(int err)
{
    switch (err) {
    case EINTR: case ENOMEM: case ENOBUFS: case ECONNRESET: case ETIMEDOUT:
        return 1;
    }
    return async_send(err);
}

/* sendmmsg of hdrs[0:count] on fd with relay.batchio's rules (errors.send_action, as
 * MmsgSender._send applies them): partial sends go on; EAGAIN/ENOBUFS drop the rest; EINTR is
 * retried; an async ICMP error is retried once per position; EBADF/ENOTSOCK/EFAULT raise; any
 * other error costs its message only.
 * 0, or -1 with an exception set. */
static int
send_with_rules(PublicFastPath *self, int fd, struct mmsghdr *hdrs, int count)
{
    int start = 0, retried_at = -1, interrupted = 0;
    while (start < count) {
        int r = count - start == 1
            ? (send(fd, hdrs[start].msg_hdr.msg_iov->iov_base, hdrs[start].msg_hdr.msg_iov->iov_len, MSG_DONTWAIT) >= 0)
            : sendmmsg(fd, hdrs + start, (unsigned int)(count - start), MSG_DONTWAIT);
        if (r > 0) {
            start += r;
            self->sent += (unsigned long long)r;
            continue;
        }
        int err = r < 0 || count - start == 1 ? errno : EAGAIN;
        if (count_error(self, err) < 0)
            return -1;
        if (err == EAGAIN || err == EWOULDBLOCK || err == ENOBUFS) {
            self->dropped_eagain += (unsigned long long)(count - start);
            return 0;
        }
        if (err == EINTR && interrupted < SEND_EINTR_MAX) {
            interrupted++;
            continue;
        }
        if (async_send(err) && retried_at != start) {
            retried_at = start;
            continue;
        }
        if (err == EBADF || err == ENOTSOCK || err == EFAULT) {
            self->failed += (unsigned long long)(count - start);
            raise_errno(err);
            return -1;
        }
        self->failed++;
        start++;
    }
    return 0;
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

/* Learn the entry type's slot offsets once: at 50k flows the attribute protocol
 * (PyObject_GetAttr/SetAttr: a type lookup and a descriptor call each, four a datagram) cost
 * more than the dict lookup. Any other type takes the attribute protocol. */
static void
learn_entry_type(PublicFastPath *self, PyTypeObject *type)
{
    Py_ssize_t p = slot_offset(type, s_prefix), d = slot_offset(type, s_tunnel_dest);
    Py_ssize_t i = slot_offset(type, s_packets_in), b = slot_offset(type, s_bytes_in);
    if (p < 0 || d < 0 || i < 0 || b < 0)
        return;
    Py_INCREF(type);
    Py_XSETREF(self->entry_type, type);
    self->off_prefix = p;
    self->off_tunnel_dest = d;
    self->off_packets_in = i;
    self->off_bytes_in = b;
}

#define SLOT(entry, off) (*(PyObject **)((char *)(entry) + (off)))

/* SLOT(entry, off) += delta, for an int slot; -1 (exception set) if it is unset or no int. */
static int
add_to_slot(PyObject *entry, Py_ssize_t off, long long delta)
{
    PyObject *old = SLOT(entry, off);
    if (old == NULL || !PyLong_CheckExact(old)) {
        PyErr_SetString(PyExc_TypeError, "a flow entry's counter must be an int");
        return -1;
    }
    long long v = PyLong_AsLongLong(old);
    if (v == -1 && PyErr_Occurred())
        return -1;
    PyObject *value = PyLong_FromLongLong(v + delta);
    if (value == NULL)
        return -1;
    SLOT(entry, off) = value;
    Py_DECREF(old);
    return 0;
}

/* The sockaddr bytes relay.batchio.sockaddr uses as a key for this source. */
static PyObject *
key_of(const struct sockaddr_storage *source, socklen_t source_len)
{
    Py_ssize_t len;
    if (source->ss_family == AF_INET)
        len = KEY_LEN_V4;
    else if (source->ss_family == AF_INET6)
        len = sizeof(struct sockaddr_in6);
    else
        len = source_len;
    return PyBytes_FromStringAndSize((const char *)source, len);
}

/* The datagram of `key` (its payload at `payload`, `length` bytes): when it hits a flow whose
 * transceiver has a link, write the frame header in front of it, count it on the flow, and
 * return the link's fd (*frame_len: header + payload). LEFT_FOR_PYTHON when it does not go
 * the C way; -1 with an exception set. */
static int
prepare_hit(PublicFastPath *self, PyObject *key, char *payload, Py_ssize_t length, size_t *frame_len)
{
    PyObject *entry = PyDict_GetItemWithError(self->by_key, key); /* borrowed */
    if (entry == NULL)
        return PyErr_Occurred() ? -1 : LEFT_FOR_PYTHON;
    Py_INCREF(entry); /* held while its attributes are read and set */
    int fd = -1;
    PyObject *dest = NULL, *prefix = NULL;
    if (self->entry_type == NULL)
        learn_entry_type(self, Py_TYPE(entry));
    int slots = Py_TYPE(entry) == self->entry_type;
    if (slots) {
        prefix = SLOT(entry, self->off_prefix);
        dest = SLOT(entry, self->off_tunnel_dest);
        if (prefix == NULL || dest == NULL) {
            PyErr_SetString(PyExc_AttributeError, "a flow entry without prefix or tunnel_dest");
            prefix = dest = NULL;
            goto done;
        }
        Py_INCREF(prefix);
        Py_INCREF(dest);
    }
    else if ((prefix = PyObject_GetAttr(entry, s_prefix)) == NULL)
        goto done;
    if (!PyBytes_Check(prefix)) {
        PyErr_SetString(PyExc_TypeError, "a flow entry's prefix must be bytes");
        goto done;
    }
    if (!slots && (dest = PyObject_GetAttr(entry, s_tunnel_dest)) == NULL)
        goto done;
    PyObject *link = PyDict_GetItemWithError(self->link_fds, dest); /* borrowed */
    Py_ssize_t prefix_len = PyBytes_GET_SIZE(prefix);
    Py_ssize_t header_len = prefix_len + 2;
    if (link == NULL || header_len > self->headroom || length > 0xFFFF) {
        fd = PyErr_Occurred() ? -1 : LEFT_FOR_PYTHON; /* no link yet: Python opens it */
        goto done;
    }
    int link_fd = _PyLong_AsInt(link);
    if (link_fd < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "a link fd must be >= 0");
        goto done;
    }
    char *header = payload - header_len;
    memcpy(header, PyBytes_AS_STRING(prefix), (size_t)prefix_len);
    header[prefix_len] = (char)((length >> 8) & 0xFF);
    header[prefix_len + 1] = (char)(length & 0xFF);
    if (slots ? add_to_slot(entry, self->off_packets_in, 1) < 0 || add_to_slot(entry, self->off_bytes_in, length) < 0
              : add_to_attr(entry, s_packets_in, 1) < 0 || add_to_attr(entry, s_bytes_in, length) < 0)
        goto done;
    *frame_len = (size_t)(header_len + length);
    fd = link_fd;
done:
    Py_XDECREF(prefix);
    Py_XDECREF(dest);
    Py_DECREF(entry);
    return fd;
}

PyDoc_STRVAR(forward_one_doc,
"forward_one() -> int | None\n\n"
"Receive one datagram into slot 0 without blocking. None: nothing was waiting (or a transient\n"
"receive error, counted). n >= 0: it hit a flow with an open link and went to its\n"
"transceiver (n payload bytes; the send's outcome is counted in sent/dropped_eagain/failed).\n"
"-1: it is in slot 0 for Python's path (last_length, last_key, last_truncated).");

static PyObject *
forward_one(PublicFastPath *self, PyObject *Py_UNUSED(ignored))
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
        if (count_error(self, err) < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    int truncated = n > self->bufsize;
    Py_ssize_t length = truncated ? self->bufsize : n;
    PyObject *key = key_of(&source, source_len);
    if (key == NULL)
        return NULL;
    size_t frame_len = 0;
    int fd = truncated ? LEFT_FOR_PYTHON : prepare_hit(self, key, payload, length, &frame_len);
    if (fd == LEFT_FOR_PYTHON) {
        Py_XSETREF(self->last_key, key);
        self->last_length = length;
        self->last_truncated = truncated;
        return PyLong_FromLong(-1);
    }
    Py_DECREF(key);
    if (fd < 0)
        return NULL;
    struct iovec iov = {payload - (frame_len - (size_t)length), frame_len};
    struct mmsghdr hdr = {.msg_hdr = {.msg_iov = &iov, .msg_iovlen = 1}};
    if (send_with_rules(self, fd, &hdr, 1) < 0)
        return NULL;
    return PyLong_FromSsize_t(length);
}

/* One recvmmsg into the slots with relay.batchio's rules (MmsgReceiver._recv_again): the count,
 * 0 when nothing is waiting, -1 with an exception set. */
static int
receive_batch(PublicFastPath *self)
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
        if (count_error(self, err) < 0)
            return -1;
        if (tries == RECV_RETRIES)
            return 0;
    }
}

/* Send every prepared hit of slots [0, n): one sendmmsg per link, in slot order. */
static int
send_hits(PublicFastPath *self, int n)
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
        if (send_with_rules(self, fd, self->tx_hdrs, m) < 0)
            return -1;
    }
    return 0;
}

/* (misses, lengths, keys, truncated) of slots [0, n): what Python needs for the misses. */
static PyObject *
leftover_of(PublicFastPath *self, int n)
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
        PyTuple_SET_ITEM(keys, i, Py_NewRef(self->keys[i]));
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
"short, max_batches were done, or a batch has datagrams for Python. packets/bytes: the hits\n"
"(payload bytes); batches: recvmmsg calls that returned datagrams; last_count: what the last\n"
"recvmmsg returned (0: the socket was empty). leftover: None, or (misses, lengths, keys, truncated) of the last batch, its misses'\n"
"slots untouched (the hits in it are sent): for BatchReceiver.take_batch.");

static PyObject *
forward_batches(PublicFastPath *self, PyObject *arg)
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
            PyObject *key = key_of(&self->rx_names[i], h->msg_namelen);
            if (key == NULL)
                return NULL;
            Py_XSETREF(self->keys[i], key);
            Py_ssize_t length = self->rx_hdrs[i].msg_len;
            char *payload = base + self->offset + i * self->stride;
            size_t frame_len = 0;
            int fd = (h->msg_flags & MSG_TRUNC) || length > self->bufsize
                ? LEFT_FOR_PYTHON : prepare_hit(self, key, payload, length, &frame_len);
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
free_arrays(PublicFastPath *self)
{
    if (self->keys != NULL) {
        for (int i = 0; i < self->batch; i++)
            Py_CLEAR(self->keys[i]);
    }
    PyMem_Free(self->keys);
    PyMem_Free(self->rx_hdrs);
    PyMem_Free(self->rx_iovs);
    PyMem_Free(self->rx_names);
    PyMem_Free(self->tx_hdrs);
    PyMem_Free(self->tx_iovs);
    PyMem_Free(self->hit_fd);
    self->keys = NULL;
    self->rx_hdrs = self->tx_hdrs = NULL;
    self->rx_iovs = self->tx_iovs = NULL;
    self->rx_names = NULL;
    self->hit_fd = NULL;
}

static int
PublicFastPath_init(PublicFastPath *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "buffer", "offset", "stride", "batch", "headroom", "bufsize", "by_key", "link_fds", NULL};
    int fd, batch;
    PyObject *buffer, *by_key, *link_fds;
    Py_ssize_t offset, stride, headroom, bufsize;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iOnninnO!O!", kwlist, &fd, &buffer, &offset, &stride,
                                     &batch, &headroom, &bufsize, &PyDict_Type, &by_key,
                                     &PyDict_Type, &link_fds))
        return -1;
    if (self->buffer.obj != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "PublicFastPath is already initialised");
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
    Py_INCREF(by_key);
    Py_XSETREF(self->by_key, by_key);
    Py_INCREF(link_fds);
    Py_XSETREF(self->link_fds, link_fds);
    PyObject *errors = PyDict_New();
    if (errors == NULL)
        return -1;
    Py_XSETREF(self->errors, errors);
    self->rx_hdrs = PyMem_Calloc((size_t)batch, sizeof *self->rx_hdrs);
    self->rx_iovs = PyMem_Calloc((size_t)batch, sizeof *self->rx_iovs);
    self->rx_names = PyMem_Calloc((size_t)batch, sizeof *self->rx_names);
    self->tx_hdrs = PyMem_Calloc((size_t)batch, sizeof *self->tx_hdrs);
    self->tx_iovs = PyMem_Calloc((size_t)batch, sizeof *self->tx_iovs);
    self->hit_fd = PyMem_Calloc((size_t)batch, sizeof *self->hit_fd);
    self->keys = PyMem_Calloc((size_t)batch, sizeof *self->keys);
    if (!self->rx_hdrs || !self->rx_iovs || !self->rx_names || !self->tx_hdrs || !self->tx_iovs
        || !self->hit_fd || !self->keys) {
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
PublicFastPath_traverse(PublicFastPath *self, visitproc visit, void *arg)
{
    Py_VISIT(self->by_key);
    Py_VISIT(self->entry_type);
    Py_VISIT(self->link_fds);
    Py_VISIT(self->errors);
    /* Not buffer.obj: an exported buffer is released in dealloc only. Were it visited, a
     * cycle through it could be cleared while the export is held (a memoryview's tp_clear
     * then frees its managed buffer under us). Held, not visited, it keeps that alive. */
    return 0;
}

static int
PublicFastPath_clear(PublicFastPath *self)
{
    Py_CLEAR(self->by_key);
    Py_CLEAR(self->entry_type);
    Py_CLEAR(self->link_fds);
    Py_CLEAR(self->errors);
    Py_CLEAR(self->last_key);
    return 0;
}

static void
PublicFastPath_dealloc(PublicFastPath *self)
{
    PyObject_GC_UnTrack(self);
    PublicFastPath_clear(self);
    free_arrays(self);
    if (self->buffer.obj != NULL)
        PyBuffer_Release(&self->buffer);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
get_last_key(PublicFastPath *self, void *Py_UNUSED(closure))
{
    if (self->last_key == NULL)
        Py_RETURN_NONE;
    return Py_NewRef(self->last_key);
}

static PyObject *
get_last_truncated(PublicFastPath *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->last_truncated);
}

static PyGetSetDef PublicFastPath_getset[] = {
    {"last_key", (getter)get_last_key, NULL, "sockaddr bytes of the datagram forward_one left for Python", NULL},
    {"last_truncated", (getter)get_last_truncated, NULL, "it was larger than bufsize", NULL},
    {NULL},
};

static PyMemberDef PublicFastPath_members[] = {
    {"fd", T_INT, offsetof(PublicFastPath, fd), READONLY, NULL},
    {"batch", T_INT, offsetof(PublicFastPath, batch), READONLY, NULL},
    {"last_length", T_PYSSIZET, offsetof(PublicFastPath, last_length), READONLY, NULL},
    {"sent", T_ULONGLONG, offsetof(PublicFastPath, sent), READONLY, NULL},
    {"dropped_eagain", T_ULONGLONG, offsetof(PublicFastPath, dropped_eagain), READONLY, NULL},
    {"failed", T_ULONGLONG, offsetof(PublicFastPath, failed), READONLY, NULL},
    {"errors", T_OBJECT, offsetof(PublicFastPath, errors), READONLY, "errno -> count"},
    {NULL},
};

static PyMethodDef PublicFastPath_methods[] = {
    {"forward_one", (PyCFunction)forward_one, METH_NOARGS, forward_one_doc},
    {"forward_batches", (PyCFunction)forward_batches, METH_O, forward_batches_doc},
    {NULL},
};

PyDoc_STRVAR(PublicFastPath_doc,
"PublicFastPath(fd, buffer, offset, stride, batch, headroom, bufsize, by_key, link_fds)\n\n"
"The hit path of one public socket over a BatchReceiver's slots (payload i at\n"
"buffer[offset + i * stride], headroom bytes free in front, bufsize bytes): sources found in\n"
"by_key whose transceiver is in link_fds go out on that connected socket. The dicts are the\n"
"worker's own, read at every datagram.");

static PyTypeObject PublicFastPath_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "relay._fastpath.PublicFastPath",
    .tp_basicsize = sizeof(PublicFastPath),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = PublicFastPath_doc,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)PublicFastPath_init,
    .tp_dealloc = (destructor)PublicFastPath_dealloc,
    .tp_traverse = (traverseproc)PublicFastPath_traverse,
    .tp_clear = (inquiry)PublicFastPath_clear,
    .tp_methods = PublicFastPath_methods,
    .tp_members = PublicFastPath_members,
    .tp_getset = PublicFastPath_getset,
};

static struct PyModuleDef fastpath_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "relay._fastpath",
    .m_doc = "The relay's client -> transceiver hit path in C (see relay/worker.py).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__fastpath(void)
{
    if ((s_prefix = PyUnicode_InternFromString("prefix")) == NULL
        || (s_tunnel_dest = PyUnicode_InternFromString("tunnel_dest")) == NULL
        || (s_packets_in = PyUnicode_InternFromString("packets_in")) == NULL
        || (s_bytes_in = PyUnicode_InternFromString("bytes_in")) == NULL)
        return NULL;
    if (PyType_Ready(&PublicFastPath_Type) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fastpath_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "PublicFastPath", (PyObject *)&PublicFastPath_Type) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
