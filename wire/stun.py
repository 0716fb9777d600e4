"""STUN (RFC 8489) parsing, integrity checks and builders, sans-IO.

The relay parses exactly one kind of message on its miss path: a client's Binding Request.
:func:`parse` validates the framing and indexes the attributes without copying them (the
message keeps a reference to the input), :meth:`StunMessage.verify_integrity` checks the
HMAC-SHA1 of ICE short-term credentials, and every malformed input raises :class:`StunError`
with a short ``reason`` the relay counts in its metrics. Nothing else escapes, for any bytes.

For ICE short-term credentials the MESSAGE-INTEGRITY key is simply the password's UTF-8
bytes. RFC 8489 would run the password through OpaqueString (SASLprep's successor) first,
but ICE passwords are ice-chars (``A-Za-z0-9+/``), which that profile leaves unchanged.

The builders are for tests, benchmarks and the test clients; they are not on any packet path.
"""

from __future__ import annotations

import hmac
import ipaddress
import struct
import zlib
from collections.abc import Iterable

from wire.hmac_fast import hmac_digest

__all__ = [
    "MAGIC_COOKIE",
    "BINDING_REQUEST",
    "BINDING_SUCCESS",
    "BINDING_ERROR",
    "BINDING_INDICATION",
    "ATTR_USERNAME",
    "ATTR_MESSAGE_INTEGRITY",
    "ATTR_ERROR_CODE",
    "ATTR_MESSAGE_INTEGRITY_SHA256",
    "ATTR_XOR_MAPPED_ADDRESS",
    "ATTR_PRIORITY",
    "ATTR_USE_CANDIDATE",
    "ATTR_SOFTWARE",
    "ATTR_FINGERPRINT",
    "ATTR_ICE_CONTROLLED",
    "ATTR_ICE_CONTROLLING",
    "STUN_ERROR_REASONS",
    "StunError",
    "StunMessage",
    "parse",
    "parse_binding_request",
    "looks_like_binding_request",
    "build_message",
    "build_binding_request",
    "build_binding_success",
    "build_binding_error",
    "encode_xor_address",
]

MAGIC_COOKIE = 0x2112A442
HEADER_LEN = 20

# Message types (method Binding = 0x001 with the class bits C1/C0 at 0x0100/0x0010).
BINDING_REQUEST = 0x0001
BINDING_INDICATION = 0x0011
BINDING_SUCCESS = 0x0101
BINDING_ERROR = 0x0111

# Attribute types. 0x0000-0x7FFF are comprehension-required, 0x8000-0xFFFF optional.
ATTR_USERNAME = 0x0006
ATTR_MESSAGE_INTEGRITY = 0x0008
ATTR_ERROR_CODE = 0x0009
ATTR_MESSAGE_INTEGRITY_SHA256 = 0x001C
ATTR_XOR_MAPPED_ADDRESS = 0x0020
ATTR_PRIORITY = 0x0024  # RFC 8445
ATTR_USE_CANDIDATE = 0x0025  # RFC 8445
ATTR_SOFTWARE = 0x8022
ATTR_FINGERPRINT = 0x8028
ATTR_ICE_CONTROLLED = 0x8029  # RFC 8445
ATTR_ICE_CONTROLLING = 0x802A  # RFC 8445

FINGERPRINT_XOR = 0x5354554E  # "STUN"
_MI_LEN = 20  # HMAC-SHA1
_MI_ATTR_LEN = 4 + _MI_LEN
_FP_ATTR_LEN = 8

# Every reason StunError carries, so metrics can pre-register one counter each.
STUN_ERROR_REASONS = frozenset(
    {
        "stun_too_short",  # fewer than 20 bytes
        "stun_bad_type",  # top two bits of the message type not zero
        "stun_bad_length",  # header length not a multiple of 4 or not len(datagram) - 20
        "stun_bad_cookie",  # not RFC 5389+ STUN (or not STUN at all)
        "stun_attr_truncated",  # an attribute (with its padding) runs past the end
        "stun_bad_attr_length",  # MI / MI-SHA256 / FINGERPRINT / fixed-size value of wrong size
        "stun_attr_after_fingerprint",  # FINGERPRINT must be the last attribute
        "stun_bad_address",  # XOR-MAPPED-ADDRESS with unknown family or wrong size
        "stun_bad_username",  # USERNAME not UTF-8
        "stun_not_request",  # parse_binding_request: not a Binding Request
        "stun_no_username",  # parse_binding_request: no USERNAME
        "stun_no_integrity",  # parse_binding_request: no MESSAGE-INTEGRITY
    }
)

_HEADER = struct.Struct("!HHI12s")
_ATTR_HEAD = struct.Struct("!HH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_COOKIE_BYTES = _U32.pack(MAGIC_COOKIE)
# Attributes with placement rules: parse handles them off the common path.
_TRAILERS = frozenset({ATTR_MESSAGE_INTEGRITY, ATTR_MESSAGE_INTEGRITY_SHA256, ATTR_FINGERPRINT})


_BINDING_REQUEST_TYPE = _U16.pack(BINDING_REQUEST)


def looks_like_binding_request(data: bytes) -> bool:
    """Type 0x0001 and the magic cookie: a screen of a few byte compares, before any parse."""
    return len(data) >= HEADER_LEN and data[0:2] == _BINDING_REQUEST_TYPE and data[4:8] == _COOKIE_BYTES


class StunError(Exception):
    """A datagram that is not acceptable STUN; ``reason`` is one of STUN_ERROR_REASONS."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StunMessage:
    """A parsed STUN message: a view over the input bytes plus an attribute index.

    The input is referenced, not copied: do not reuse the buffer of a memoryview input while
    the message is in use.
    """

    __slots__ = ("msg_type", "transaction_id", "_data", "_attrs")

    def __init__(
        self,
        msg_type: int,
        transaction_id: bytes,
        data: bytes | memoryview,
        attrs: dict[int, tuple[int, int]],
    ) -> None:
        self.msg_type = msg_type
        self.transaction_id = transaction_id
        self._data = data
        # type -> (value offset, value length) of every attribute parse accepted: the first
        # occurrence of each, and none after an integrity attribute except the trailers.
        self._attrs = attrs

    def __repr__(self) -> str:
        types = ",".join(f"0x{t:04x}" for t in self._attrs)
        return f"StunMessage(type=0x{self.msg_type:04x}, tid={self.transaction_id.hex()}, attrs=[{types}])"

    # -- type ---------------------------------------------------------------------------

    @property
    def method(self) -> int:
        t = self.msg_type
        return ((t & 0x3E00) >> 2) | ((t & 0x00E0) >> 1) | (t & 0x000F)

    @property
    def message_class(self) -> int:
        """0 request, 1 indication, 2 success response, 3 error response."""
        t = self.msg_type
        return ((t & 0x0100) >> 7) | ((t & 0x0010) >> 4)

    @property
    def is_binding_request(self) -> bool:
        return self.msg_type == BINDING_REQUEST

    # -- attributes -----------------------------------------------------------------------

    def __contains__(self, attr_type: int) -> bool:
        return attr_type in self._attrs

    def get(self, attr_type: int) -> bytes | None:
        """Value of the first ``attr_type`` attribute (padding stripped), or None."""
        loc = self._attrs.get(attr_type)
        if loc is None:
            return None
        off, length = loc
        # bytes(b) of an exact bytes object is b itself: a copy only for memoryview input.
        return bytes(self._data[off : off + length])

    def _fixed(self, attr_type: int, size: int) -> bytes | None:
        value = self.get(attr_type)
        if value is not None and len(value) != size:
            raise StunError("stun_bad_attr_length")
        return value

    @property
    def username(self) -> str | None:
        value = self.get(ATTR_USERNAME)
        if value is None:
            return None
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise StunError("stun_bad_username") from None

    @property
    def priority(self) -> int | None:
        value = self._fixed(ATTR_PRIORITY, 4)
        return None if value is None else _U32.unpack(value)[0]

    @property
    def use_candidate(self) -> bool:
        return ATTR_USE_CANDIDATE in self._attrs

    @property
    def ice_controlling(self) -> int | None:
        """Tie-breaker of ICE-CONTROLLING, or None."""
        value = self._fixed(ATTR_ICE_CONTROLLING, 8)
        return None if value is None else _U64.unpack(value)[0]

    @property
    def ice_controlled(self) -> int | None:
        """Tie-breaker of ICE-CONTROLLED, or None."""
        value = self._fixed(ATTR_ICE_CONTROLLED, 8)
        return None if value is None else _U64.unpack(value)[0]

    def xor_mapped_address(self) -> tuple[str, int] | None:
        value = self.get(ATTR_XOR_MAPPED_ADDRESS)
        if value is None:
            return None
        if len(value) == 8 and value[1] == 1:
            ip = ipaddress.IPv4Address(int.from_bytes(value[4:8]) ^ MAGIC_COOKIE)
        elif len(value) == 20 and value[1] == 2:
            mask = int.from_bytes(_COOKIE_BYTES + self.transaction_id)
            ip = ipaddress.IPv6Address(int.from_bytes(value[4:20]) ^ mask)
        else:
            raise StunError("stun_bad_address")
        return str(ip), _U16.unpack_from(value, 2)[0] ^ (MAGIC_COOKIE >> 16)

    # -- integrity ------------------------------------------------------------------------

    def _offset(self, attr_type: int) -> int | None:
        loc = self._attrs.get(attr_type)
        return None if loc is None else loc[0] - 4

    @property
    def integrity_offset(self) -> int | None:
        """Offset of the MESSAGE-INTEGRITY attribute header, or None."""
        return self._offset(ATTR_MESSAGE_INTEGRITY)

    @property
    def integrity_sha256_offset(self) -> int | None:
        """Offset of the MESSAGE-INTEGRITY-SHA256 attribute header, or None."""
        return self._offset(ATTR_MESSAGE_INTEGRITY_SHA256)

    @property
    def fingerprint_offset(self) -> int | None:
        """Offset of the FINGERPRINT attribute header, or None."""
        return self._offset(ATTR_FINGERPRINT)

    def _signed_text(self, attr_offset: int, attr_len: int) -> bytes:
        # The HMAC covers everything before the attribute, with the header length rewritten
        # as if the message ended right after it (later attributes are not covered).
        data = self._data
        length = attr_offset + attr_len - HEADER_LEN
        return b"".join((data[:2], _U16.pack(length), data[4:attr_offset]))

    def verify_integrity(self, key: bytes) -> bool:
        """Check MESSAGE-INTEGRITY (HMAC-SHA1) with ``key``; False when there is none."""
        loc = self._attrs.get(ATTR_MESSAGE_INTEGRITY)
        if loc is None:
            return False
        off = loc[0] - 4
        mac = hmac_digest(key, self._signed_text(off, _MI_ATTR_LEN), "sha1")
        return hmac.compare_digest(mac, self._data[off + 4 : off + _MI_ATTR_LEN])

    def verify_integrity_sha256(self, key: bytes) -> bool:
        """Check MESSAGE-INTEGRITY-SHA256 (possibly truncated); False when there is none."""
        loc = self._attrs.get(ATTR_MESSAGE_INTEGRITY_SHA256)
        if loc is None:
            return False
        off, size = loc[0] - 4, loc[1]
        mac = hmac_digest(key, self._signed_text(off, 4 + size), "sha256")
        return hmac.compare_digest(mac[:size], self._data[off + 4 : off + 4 + size])

    @property
    def has_fingerprint(self) -> bool:
        return ATTR_FINGERPRINT in self._attrs

    def verify_fingerprint(self) -> bool:
        """Check FINGERPRINT (CRC-32 ^ 0x5354554e); False when there is none."""
        loc = self._attrs.get(ATTR_FINGERPRINT)
        if loc is None:
            return False
        off = loc[0] - 4
        # FINGERPRINT is the last attribute (parse enforces it), so the header length
        # already ends right after it: no rewrite needed.
        data = self._data
        crc = zlib.crc32(data[:off]) ^ FINGERPRINT_XOR
        return crc == _U32.unpack_from(data, off + 4)[0]


def parse(data: bytes | memoryview) -> StunMessage:
    """Validate the framing of a STUN message and index its attributes.

    Raises StunError and nothing else, whatever ``data`` holds.
    """
    n = len(data)
    if n < HEADER_LEN:
        raise StunError("stun_too_short")
    msg_type, length, cookie, tid = _HEADER.unpack_from(data)
    if msg_type & 0xC000:
        raise StunError("stun_bad_type")
    if length != n - HEADER_LEN or length & 3:
        raise StunError("stun_bad_length")
    if cookie != MAGIC_COOKIE:
        raise StunError("stun_bad_cookie")

    attrs: dict[int, tuple[int, int]] = {}
    sealed = False  # an integrity attribute was seen
    unpack = _ATTR_HEAD.unpack_from
    off = HEADER_LEN
    # n - off stays a multiple of 4, so a 4-byte attribute header always fits.
    while off < n:
        attr_type, attr_len = unpack(data, off)
        off += 4  # now the value offset
        nxt = off + ((attr_len + 3) & ~3)
        if nxt > n:
            raise StunError("stun_attr_truncated")
        if attr_type not in _TRAILERS:
            # RFC 8489 §14: only the first occurrence counts. §14.5/§14.6: attributes after
            # an integrity attribute are ignored, and must be, since they are unauthenticated.
            if not sealed and attr_type not in attrs:
                attrs[attr_type] = (off, attr_len)
        elif attr_type == ATTR_FINGERPRINT:
            if attr_len != 4:
                raise StunError("stun_bad_attr_length")
            if nxt != n:
                raise StunError("stun_attr_after_fingerprint")
            attrs[attr_type] = (off, attr_len)
        elif attr_type == ATTR_MESSAGE_INTEGRITY:
            if not sealed:
                if attr_len != _MI_LEN:
                    raise StunError("stun_bad_attr_length")
                sealed = True
                attrs[attr_type] = (off, attr_len)
        elif attr_type not in attrs:  # MESSAGE-INTEGRITY-SHA256, which may follow MI
            if attr_len < 16 or attr_len > 32 or attr_len & 3:
                raise StunError("stun_bad_attr_length")
            sealed = True
            attrs[attr_type] = (off, attr_len)
        off = nxt
    return StunMessage(msg_type, tid, data, attrs)


def parse_binding_request(data: bytes | memoryview) -> StunMessage:
    """:func:`parse`, then require what the relay needs: a Binding Request with USERNAME
    and MESSAGE-INTEGRITY. The caller still verifies the integrity (it derives the key from
    the username)."""
    msg = parse(data)
    if msg.msg_type != BINDING_REQUEST:
        raise StunError("stun_not_request")
    if ATTR_USERNAME not in msg._attrs:
        raise StunError("stun_no_username")
    if ATTR_MESSAGE_INTEGRITY not in msg._attrs:
        raise StunError("stun_no_integrity")
    return msg


# -- builders ---------------------------------------------------------------------------------


def encode_xor_address(ip: str, port: int, transaction_id: bytes) -> bytes:
    """XOR-MAPPED-ADDRESS value for ``ip``:``port`` (IPv4 or IPv6)."""
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    addr = ipaddress.ip_address(ip)
    head = struct.pack("!BBH", 0, 1 if addr.version == 4 else 2, port ^ (MAGIC_COOKIE >> 16))
    if addr.version == 4:
        return head + _U32.pack(int(addr) ^ MAGIC_COOKIE)
    if len(transaction_id) != 12:
        raise ValueError("transaction id must be 12 bytes")
    mask = int.from_bytes(_COOKIE_BYTES + bytes(transaction_id))
    return head + (int(addr) ^ mask).to_bytes(16)


def build_message(
    msg_type: int,
    transaction_id: bytes,
    attributes: Iterable[tuple[int, bytes]],
    integrity_key: bytes | None = None,
    fingerprint: bool = True,
    *,
    pad: int = 0,
) -> bytes:
    """Encode a STUN message; MESSAGE-INTEGRITY (if keyed) and FINGERPRINT are appended.

    ``pad`` is the padding byte value: 0 normally; RFC 5769's vectors pad with 0x20, and the
    padding is covered by the HMAC and CRC, so reproducing them needs it.
    """
    if not 0 <= msg_type <= 0x3FFF:
        raise ValueError(f"message type out of range: {msg_type:#x}")
    tid = bytes(transaction_id)
    if len(tid) != 12:
        raise ValueError("transaction id must be 12 bytes")
    parts: list[bytes] = []
    for attr_type, value in attributes:
        size = len(value)
        if not 0 <= attr_type <= 0xFFFF or size > 0xFFFF:
            raise ValueError(f"attribute 0x{attr_type:04x} out of range")
        parts += (_ATTR_HEAD.pack(attr_type, size), bytes(value), bytes([pad]) * (-size % 4))
    body = b"".join(parts)
    tail = (_MI_ATTR_LEN if integrity_key is not None else 0) + (_FP_ATTR_LEN if fingerprint else 0)
    if len(body) + tail > 0xFFFF:
        raise ValueError("message too long")
    if integrity_key is not None:
        # The HMAC sees a header whose length already counts MESSAGE-INTEGRITY itself.
        head = _HEADER.pack(msg_type, len(body) + _MI_ATTR_LEN, MAGIC_COOKIE, tid)
        mac = hmac_digest(integrity_key, head + body, "sha1")
        body += _ATTR_HEAD.pack(ATTR_MESSAGE_INTEGRITY, _MI_LEN) + mac
    if fingerprint:
        head = _HEADER.pack(msg_type, len(body) + _FP_ATTR_LEN, MAGIC_COOKIE, tid)
        crc = zlib.crc32(head + body) ^ FINGERPRINT_XOR
        return head + body + _ATTR_HEAD.pack(ATTR_FINGERPRINT, 4) + _U32.pack(crc)
    return _HEADER.pack(msg_type, len(body), MAGIC_COOKIE, tid) + body


def build_binding_request(
    transaction_id: bytes,
    username: str,
    integrity_key: bytes,
    priority: int,
    *,
    controlling: bool,
    tie_breaker: int,
    use_candidate: bool = False,
    fingerprint: bool = True,
) -> bytes:
    """An ICE connectivity check, attributes in libwebrtc's order."""
    attrs = [
        (ATTR_USERNAME, username.encode("utf-8")),
        (ATTR_PRIORITY, _U32.pack(priority)),
        (ATTR_ICE_CONTROLLING if controlling else ATTR_ICE_CONTROLLED, _U64.pack(tie_breaker)),
    ]
    if use_candidate:
        attrs.append((ATTR_USE_CANDIDATE, b""))
    return build_message(BINDING_REQUEST, transaction_id, attrs, integrity_key, fingerprint)


def build_binding_success(
    transaction_id: bytes,
    mapped: tuple[str, int],
    integrity_key: bytes | None,
    fingerprint: bool = True,
) -> bytes:
    """A Binding success response carrying XOR-MAPPED-ADDRESS."""
    value = encode_xor_address(mapped[0], mapped[1], transaction_id)
    return build_message(
        BINDING_SUCCESS, transaction_id, [(ATTR_XOR_MAPPED_ADDRESS, value)], integrity_key, fingerprint
    )


def build_binding_error(transaction_id: bytes, code: int, reason: str, integrity_key: bytes) -> bytes:
    """An authenticated Binding error response (RFC 8489 section 14.8: ERROR-CODE is class,
    number and a UTF-8 reason phrase), signed like the success it replaces."""
    if not 300 <= code <= 699:
        raise ValueError(f"STUN error code out of range: {code}")
    value = bytes([0, 0, code // 100, code % 100]) + reason.encode("utf-8")
    return build_message(BINDING_ERROR, transaction_id, [(ATTR_ERROR_CODE, value)], integrity_key)
