"""A flow entry: one client 5-tuple of a worker, as the packet path needs it.

Its counters, ``prefix`` and ``tunnel_dest`` are the fields of ``relay._hitpath.FlowFields``
(relay/_flow_fields.h): 64-bit integers and two object pointers in the entry's first cache line,
which the C hit path and counter flush read and write in place. Where the extension was not
built, a Python class with the same names stands in (everything is Python then).
"""

from __future__ import annotations

from typing import Any

from relay.batchio import address_tuple
from wire.tunnel_frame import data_prefix, hop_prefix

try:
    from relay._hitpath import FlowFields

    C_FIELDS = True
except ImportError:
    C_FIELDS = False

    class FlowFields:  # type: ignore[no-redef]
        """relay._hitpath.FlowFields's fields, as Python slots."""

        __slots__ = ("packets_in", "bytes_in", "prefix", "tunnel_dest", "packets_out", "bytes_out",
                     "flushed_activity", "flushed_ms")

        packets_in: int
        bytes_in: int
        prefix: bytes
        tunnel_dest: bytes
        packets_out: int
        bytes_out: int
        flushed_activity: int
        flushed_ms: int


class FlowEntry(FlowFields):
    """One client 5-tuple, as the packet path needs it.

    ``prefix`` is what the hit path writes in front of a client datagram: a Data header, or a
    HopData header with ``hops`` left for a session that lives in another cluster (this relay
    is its edge, ``tunnel_dest`` a relay of that cluster). ``match`` is what the frames coming
    back start with: a Data header with the flow's handle, from a transceiver or a cluster
    relay alike (the same object as ``prefix`` but for hops)."""

    __slots__ = (
        "client_key", "client", "public_index", "handle", "match", "hops", "target", "ufrag", "aliases",
        "client_address", "index", "kernel",
    )

    def __init__(self, client_key: bytes, client: tuple[bytes, int], public_index: int, handle: int,
                 tunnel_dest: bytes, target: tuple[bytes, int], ufrag: str, hops: int | None = None) -> None:
        self.client_key = client_key
        self.client_address = address_tuple(client_key)  # as recvfrom gives it (by_address key)
        self.client = client
        self.public_index = public_index
        self.hops = hops
        self._set_handle(handle)
        self.tunnel_dest = tunnel_dest
        self.target = target
        self.ufrag = ufrag
        self.packets_in = self.bytes_in = self.packets_out = self.bytes_out = 0
        self.flushed_activity = 0  # packets_in + packets_out at the last flush
        self.flushed_ms = 0  # when a flush last saw it move (or it was learned, adopted, taken over): ms
        self.aliases: tuple[int, ...] = ()  # (a tuple: no list per flow for the collector to walk)
        self.index = -1  # position in LocalFlows.entries
        self.kernel: Any = None  # relay.kernel_flows.KernelFlow while the kernel forwards it

    def _set_handle(self, handle: int) -> None:
        self.handle = handle
        self.match = data_prefix(handle, self.client[0], self.client[1])
        self.prefix = self.match if self.hops is None else hop_prefix(handle, self.client[0], self.client[1], self.hops)

    def rehandle(self, handle: int) -> None:
        self.aliases += (self.handle,)
        self._set_handle(handle)
