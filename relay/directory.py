"""The route directory (Redis/Valkey): flows learned by one relay, adoptable by another after a
failover without waiting for the client's next STUN check. Sans-IO: keys, signed entries, the
circuit breaker and the negative cache; the worker's I/O shell talks to the server.

- **Key**: ``rtcrelay:flow:<cluster>:<client ip>:<client port>``, the client's 5-tuple as the
  relays see it (their public address is the same service address on every relay of the pool).
- **Value**: a sealed :class:`DirectoryEntry` — the server ufrag (itself a signed route token),
  when it was learned, until when it may be adopted — with an HMAC under a key derived from the
  route secret. A relay adopts an entry only when the MAC verifies with one of its keys, it has
  not expired, and the ufrag decodes as a route token for this relay's keys and cluster: the
  flow then goes exactly where the relay's own STUN check would have sent it (the token's
  target). Someone who can write to Redis but holds no route key cannot point a client's
  5-tuple at another session. A ufrag whose session closed is refused as a check would be.
- **TTL**: an entry expires (in Redis and in its own ``expires_at``) ``ENTRY_TTL_FACTOR`` idle
  timeouts after it was last written; relays rewrite the entries of flows that carry traffic.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
from dataclasses import dataclass

import msgspec

from wire.route_token import RouteKeyring

__all__ = ["DirectoryEntry", "DirectoryError", "flow_key", "seal_entry", "open_entry", "CircuitBreaker",
           "NegativeCache", "ENTRY_TTL_FACTOR"]

KEY_PREFIX = "rtcrelay:flow"
KEY_LABEL = b"rtcrelay directory v1"
MAC_LEN = 16
ENTRY_VERSION = 1
ENTRY_TTL_FACTOR = 2.0  # x idle_timeout


class DirectoryEntry(msgspec.Struct, array_like=True, frozen=True):
    version: int
    key_id: int
    client_ip: bytes  # packed, 4 or 16 bytes
    client_port: int
    ufrag: str
    learned_at: float  # unix s
    expires_at: float  # unix s


class DirectoryError(Exception):
    """An entry that must not be adopted; ``reason`` for the counters."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(DirectoryEntry)


def flow_key(cluster: int | None, client_ip: bytes, client_port: int) -> str:
    return f"{KEY_PREFIX}:{'-' if cluster is None else cluster}:{ipaddress.ip_address(client_ip)}:{client_port}"


def _mac(keyring: RouteKeyring, key_id: int, body: bytes) -> bytes | None:
    key = keyring.purpose_key(key_id, KEY_LABEL)
    return None if key is None else hmac.digest(key, body, "sha256")[:MAC_LEN]


def seal_entry(keyring: RouteKeyring, client: tuple[bytes, int], ufrag: str, now: float, ttl_s: float) -> bytes:
    entry = DirectoryEntry(ENTRY_VERSION, keyring.active_key_id, client[0], client[1], ufrag, now, now + ttl_s)
    body = _encoder.encode(entry)
    mac = _mac(keyring, entry.key_id, body)
    assert mac is not None
    return body + mac


def open_entry(keyring: RouteKeyring, value: bytes, client: tuple[bytes, int], now: float) -> DirectoryEntry:
    """The entry in ``value``, if this relay may adopt it for ``client``; else DirectoryError
    (the caller then checks the ufrag's token as a STUN check would: its keys, its cluster)."""
    if len(value) <= MAC_LEN:
        raise DirectoryError("directory_malformed")
    body, mac = value[:-MAC_LEN], value[-MAC_LEN:]
    try:
        entry = _decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise DirectoryError("directory_malformed") from None
    expected = _mac(keyring, entry.key_id, body) if entry.version == ENTRY_VERSION else None
    if expected is None or not hmac.compare_digest(mac, expected):
        raise DirectoryError("directory_forged")
    if (entry.client_ip, entry.client_port) != client:
        raise DirectoryError("directory_forged")  # a valid entry of another 5-tuple, copied here
    if now > entry.expires_at:
        raise DirectoryError("directory_expired")
    return entry


class CircuitBreaker:
    """Stop asking a directory that fails: after ``threshold`` failures in a row it opens for
    ``open_s`` (every lookup is skipped, counted), then lets one probe through."""

    def __init__(self, threshold: int = 5, open_s: float = 5.0) -> None:
        self.threshold = threshold
        self.open_s = open_s
        self.failures = 0
        self.open_until = 0.0
        self._probing = False

    def allow(self, now: float) -> bool:
        if self.failures < self.threshold:
            return True
        if now < self.open_until or self._probing:
            return False
        self._probing = True  # half-open: one request decides
        return True

    def succeeded(self) -> None:
        self.failures = 0
        self._probing = False

    def failed(self, now: float) -> None:
        self.failures += 1
        self._probing = False
        if self.failures >= self.threshold:
            self.open_until = now + self.open_s

    @property
    def is_open(self) -> bool:
        return self.failures >= self.threshold


@dataclass
class NegativeCache:
    """5-tuples the directory did not know, for ``ttl_s`` (a flood of junk from one source costs
    one lookup), at most ``capacity`` (oldest out)."""

    capacity: int = 65536
    ttl_s: float = 2.0

    def __post_init__(self) -> None:
        self._until: collections.OrderedDict[bytes, float] = collections.OrderedDict()

    @staticmethod
    def _key(client: tuple[bytes, int]) -> bytes:
        return hashlib.blake2b(client[0] + client[1].to_bytes(2, "big"), digest_size=8).digest()

    def add(self, client: tuple[bytes, int], now: float) -> None:
        key = self._key(client)
        self._until[key] = now + self.ttl_s
        self._until.move_to_end(key)
        while len(self._until) > self.capacity:
            self._until.popitem(last=False)

    def __contains__(self, item: tuple[tuple[bytes, int], float]) -> bool:
        client, now = item
        until = self._until.get(self._key(client))
        if until is None:
            return False
        if now >= until:
            del self._until[self._key(client)]
            return False
        return True

    def __len__(self) -> int:
        return len(self._until)
