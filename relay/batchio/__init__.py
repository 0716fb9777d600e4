"""Batched UDP receive/send for the relay worker's hot path: ``recvmmsg``/``sendmmsg`` via ctypes.

The hot loop (see bench/mmsg.py, which measures it)::

    rx = BatchReceiver(sock)                   # batch=64, bufsize=2048, headroom=64
    tx = BatchSender(tunnel_sock)
    n = rx.recv()                              # one recvmmsg(MSG_DONTWAIT); 0 when empty
    dests, skip = [], []
    for i, (key, length, off) in enumerate(zip(rx.keys(), rx.lengths, rx.offsets)):
        flow = flows.get(key)                  # key: raw sockaddr bytes (cheap dict key)
        if flow is None:                       # miss: rx.address(i), rx.payload(i)...
            skip.append(i); dests.append(b""); continue
        HEADER.pack_into(rx.buffer, off - 24, flow.prefix, length)   # header in the headroom
        dests.append(flow.dest)                # sockaddr bytes, built once per flow
    if rx.truncated_count: ...                 # rx.truncated(i): larger than bufsize: skip it
    tx.send_rx(rx, dests, 24, skip)            # header + payload from rx's slots, no copy

Per message there are also ``add_rx(dest, rx, i, header_len, strip)`` (zero-copy, mixes
receivers and destinations freely, ``strip`` drops a received tunnel header; then ``flush()``),
``add(dest, data)``, ``frame_view(i, header_len)``,
``payload(i)``, ``key(i)``, ``address(i)``, ``length(i)``, ``truncated(i)``.

Lifetime rules (not checked per packet):

- A receiver's slots are overwritten by its next ``recv()``: flush a sender holding
  ``add_rx`` entries of that receiver first (``flush`` raises RuntimeError otherwise).
  ``send_rx`` sends at once.
- ``add(dest, data)``: a ``bytes`` object is sent in place (referenced until ``flush``), any
  other buffer is copied at ``add`` time.

When libc has ``recvmmsg``/``sendmmsg`` (:data:`HAVE_MMSG`: Linux), :data:`BatchReceiver` and
:data:`BatchSender` are :class:`MmsgReceiver`/:class:`MmsgSender`; otherwise they are
:class:`FallbackReceiver`/:class:`FallbackSender`, the same interface over
``recvfrom_into``/``sendto`` loops.

Modules: ``sockaddr`` (addresses as sockaddr bytes: keys and destinations), ``errors`` (which
errors are retried, counted, raised), ``base`` (the slot layout and what both implementations
share), ``mmsg`` (the ctypes implementation), ``fallback``.
"""

from __future__ import annotations

from relay.batchio.base import MSG_TRUNC, ReceiverBase, SenderBase
from relay.batchio.fallback import FallbackReceiver, FallbackSender
from relay.batchio.mmsg import HAVE_MMSG, MmsgReceiver, MmsgSender
from relay.batchio.sockaddr import address_tuple, decode_sockaddr, sockaddr_for

__all__ = [
    "HAVE_MMSG",
    "MSG_TRUNC",
    "BatchReceiver",
    "BatchSender",
    "FallbackReceiver",
    "FallbackSender",
    "MmsgReceiver",
    "MmsgSender",
    "ReceiverBase",
    "SenderBase",
    "address_tuple",
    "batch_classes",
    "decode_sockaddr",
    "sockaddr_for",
]


def batch_classes(have_mmsg: bool) -> tuple[type[ReceiverBase], type[SenderBase]]:
    """The receiver and sender classes to use: the ``recvmmsg``/``sendmmsg`` ones if libc has them."""
    return (MmsgReceiver, MmsgSender) if have_mmsg else (FallbackReceiver, FallbackSender)


BatchReceiver: type[ReceiverBase]
BatchSender: type[SenderBase]
BatchReceiver, BatchSender = batch_classes(HAVE_MMSG)
