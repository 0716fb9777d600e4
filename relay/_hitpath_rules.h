/* relay.batchio's receive and send error rules, in C, for relay/_hitpath.c and _returnpath.h.
 *
 * The C hit path sends on the same sockets as relay.batchio's senders and must fail the same way:
 * which errors are transient, which drop the rest of a batch, which raise. Each rule names
 * the Python it mirrors; tests/test_hit_path.py checks the C side on real sockets.
 */
#ifndef RTCRELAY_HITPATH_RULES_H
#define RTCRELAY_HITPATH_RULES_H

#include <Python.h>

#include <errno.h>
#include <sys/socket.h>

#define RECV_RETRIES 3   /* relay.batchio.errors.RECV_RETRIES */
#define SEND_EINTR_MAX 8

/* Send outcomes, as relay.batchio's senders count them. */
typedef struct {
    unsigned long long sent;
    unsigned long long dropped_eagain;
    unsigned long long failed;
    PyObject *errors;     /* dict: errno -> count (receive and send) */
} SendCounts;

static int
count_error(SendCounts *counts, int err)
{
    PyObject *key = PyLong_FromLong(err);
    if (key == NULL)
        return -1;
    PyObject *old = PyDict_GetItemWithError(counts->errors, key);
    long n = old == NULL ? 0 : PyLong_AsLong(old);
    PyObject *value = PyLong_FromLong(n + 1);
    int r = value == NULL ? -1 : PyDict_SetItem(counts->errors, key, value);
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

/* relay.batchio.errors.ASYNC_SEND: an earlier datagram's ICMP error, reported by this call, which sent
 * nothing: retried once. */
static int
async_send(int err)
{
    switch (err) {
    case ECONNREFUSED: case EHOSTUNREACH: case ENETUNREACH: case EHOSTDOWN: case ENETDOWN:
    case EPROTO: case ENOPROTOOPT:
#ifdef ENONET
    case ENONET:
#endif
        return 1;
    }
    return 0;
}

/* relay.batchio.errors.TRANSIENT_RECV (a superset of ASYNC_SEND): a receive error about an earlier
 * datagram (ICMP) or a passing shortage; nothing was received, the socket is fine. */
static int
transient_recv(int err)
{
    switch (err) {
    case EINTR: case ENOMEM: case ENOBUFS: case ECONNRESET: case ETIMEDOUT:
        return 1;
    }
    return async_send(err);
}

/* sendmmsg of hdrs[0:count] on fd with relay.batchio's rules (MmsgSender._send): partial sends
 * go on; EAGAIN/ENOBUFS drop the rest; EINTR is retried; an async ICMP error is retried once
 * per position; EBADF/ENOTSOCK/EFAULT raise; any other error costs its message only.
 * 0, or -1 with an exception set. */
static int
send_with_rules(SendCounts *counts, int fd, struct mmsghdr *hdrs, int count)
{
    int start = 0, retried_at = -1, interrupted = 0;
    while (start < count) {
        int r = count - start == 1 && hdrs[start].msg_hdr.msg_name == NULL /* (a connected link) */
            ? (send(fd, hdrs[start].msg_hdr.msg_iov->iov_base, hdrs[start].msg_hdr.msg_iov->iov_len, MSG_DONTWAIT) >= 0)
            : sendmmsg(fd, hdrs + start, (unsigned int)(count - start), MSG_DONTWAIT);
        if (r > 0) {
            start += r;
            counts->sent += (unsigned long long)r;
            continue;
        }
        int err = r < 0 || count - start == 1 ? errno : EAGAIN;
        if (count_error(counts, err) < 0)
            return -1;
        if (err == EAGAIN || err == EWOULDBLOCK || err == ENOBUFS) {
            counts->dropped_eagain += (unsigned long long)(count - start);
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
            counts->failed += (unsigned long long)(count - start);
            raise_errno(err);
            return -1;
        }
        counts->failed++;
        start++;
    }
    return 0;
}

#endif /* RTCRELAY_HITPATH_RULES_H */
