"""The errno policy of batched receive and send: which errors are waited out, retried, counted
or raised, written once for the receivers and senders of both kinds. relay/_hitpath_rules.h mirrors
it (``transient_recv``, ``async_send``, ``send_with_rules``): change both together.

Receive: EAGAIN → 0. Transient errors are counted in ``errors`` (by errno) and the call is
retried a bounded number of times (:data:`RECV_RETRIES`), then 0 is returned: EINTR,
ENOMEM/ENOBUFS, and the asynchronous ICMP errors a connected (or IP_RECVERR) socket reports
once on its next call (ECONNREFUSED, EHOSTUNREACH, ENETUNREACH, ...) — that call returns no
data even when data is queued, the retry gets it. Anything else (EBADF, ENOTSOCK, EFAULT,
EINVAL) is a bug: OSError.

Send (:func:`send_action`): EAGAIN/ENOBUFS drop the rest of the batch (``dropped_eagain``) — a
send never blocks; an asynchronous ICMP error is retried once (it belongs to an earlier
datagram, and the call that reports it sends nothing); any other error of one message (EINVAL
for port 0, EMSGSIZE, EAFNOSUPPORT, EACCES, EPERM, ...) skips that message (``failed``,
``errors``) and the rest of the batch still goes (sendmmsg stops at the failing message: the
loop resumes after it); EBADF/ENOTSOCK/EFAULT raise OSError.
"""

from __future__ import annotations

import enum
import errno
import os

_ENONET = getattr(errno, "ENONET", errno.ENETDOWN)

#: Receive errors about an earlier datagram (ICMP) or a passing shortage: nothing was
#: received, the socket is fine.
TRANSIENT_RECV = frozenset(
    {
        errno.EINTR,
        errno.ENOMEM,
        errno.ENOBUFS,
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.ENETDOWN,
        errno.EPROTO,
        errno.ETIMEDOUT,
        errno.ENOPROTOOPT,
        _ENONET,
    }
)
#: Reported once by the call after an ICMP error (connected or IP_RECVERR socket); that call
#: sent nothing, so the message it was about is retried once. (ENOPROTOOPT: protocol
#: unreachable, one of the "fatal" ICMP errors a connected socket is told of without IP_RECVERR.)
ASYNC_SEND = frozenset(
    {
        errno.ECONNREFUSED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.ENETDOWN,
        errno.EPROTO,
        errno.ENOPROTOOPT,
        _ENONET,
    }
)
#: The socket would block: the rest of the batch is dropped, never waited for.
DROP_SEND = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS})
#: The socket itself is wrong: a bug, raised.
FATAL = frozenset({errno.EBADF, errno.ENOTSOCK, errno.EFAULT})
#: Receive calls retried after transient errors before a receive gives up (returns 0).
RECV_RETRIES = 3
#: EINTRs a ctypes sendmmsg is retried after, per batch (Python's own send retries EINTR
#: itself, PEP 475).
SEND_EINTR_RETRIES = 8


class SendAction(enum.Enum):
    """What a sender does about the error of the message at the head of what it is sending."""

    DROP_REST = enum.auto()  # count the rest in dropped_eagain, stop
    RETRY_INTERRUPTED = enum.auto()  # EINTR: the same call again
    RETRY_ASYNC = enum.auto()  # an earlier datagram's ICMP error: this message again, once
    RAISE = enum.auto()  # count the rest in failed, raise OSError
    SKIP = enum.auto()  # this message's own error: count it in failed, send the rest


def send_action(err: int, async_retried: bool, eintr_left: int = 0) -> SendAction:
    """The rule for send error ``err``. ``async_retried``: this message was already retried
    after an asynchronous ICMP error; ``eintr_left``: EINTR retries this batch has left."""
    if err in DROP_SEND:
        return SendAction.DROP_REST
    if err == errno.EINTR and eintr_left > 0:
        return SendAction.RETRY_INTERRUPTED
    if err in ASYNC_SEND and not async_retried:
        return SendAction.RETRY_ASYNC
    if err in FATAL:
        return SendAction.RAISE
    return SendAction.SKIP


def oserror(err: int, what: str) -> OSError:
    """The OSError for ``err`` of a libc call made through ctypes (errno name and text)."""
    return OSError(err, f"{what}: {errno.errorcode.get(err, err)} ({os.strerror(err)})")


class ErrorCounts:
    """``errors``: errno → how many times a receiver's or sender's calls met it."""

    errors: dict[int, int]

    def _count_error(self, err: int) -> None:
        self.errors[err] = self.errors.get(err, 0) + 1
