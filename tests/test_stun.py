"""wire/stun.py: RFC 5769 vectors, placement rules, every drop reason, and properties."""

from __future__ import annotations

import hashlib
import hmac
import struct
import zlib
from collections.abc import Callable

import aioice.stun
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wire import stun
from wire.stun import (
    ATTR_ERROR_CODE,
    ATTR_FINGERPRINT,
    ATTR_ICE_CONTROLLED,
    ATTR_ICE_CONTROLLING,
    ATTR_MESSAGE_INTEGRITY,
    ATTR_MESSAGE_INTEGRITY_SHA256,
    ATTR_PRIORITY,
    ATTR_SOFTWARE,
    ATTR_USE_CANDIDATE,
    ATTR_USERNAME,
    ATTR_XOR_MAPPED_ADDRESS,
    BINDING_ERROR,
    BINDING_INDICATION,
    BINDING_REQUEST,
    BINDING_SUCCESS,
    MAGIC_COOKIE,
    STUN_ERROR_REASONS,
    StunError,
    StunMessage,
    build_binding_request,
    build_binding_success,
    build_message,
    encode_xor_address,
    parse,
    parse_binding_request,
)

# --- RFC 5769 test vectors, byte for byte --------------------------------------------------
# Both FINGERPRINT (CRC-32) and MESSAGE-INTEGRITY (HMAC-SHA1) verify over these bytes, so a
# transcription error could not pass the tests below. Padding is 0x20 in 2.1-2.3, as in the RFC.

RFC5769_PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"
RFC5769_TID = bytes.fromhex("b7e7a701bc34d686fa87dfae")

# 2.1 Sample Request
RFC5769_REQUEST = bytes.fromhex(
    "0001 0058"  # Binding Request, length 88
    "2112a442"  # magic cookie
    "b7e7a701 bc34d686 fa87dfae"  # transaction id
    "8022 0010"  # SOFTWARE, 16 bytes
    "5354554e 20746573 7420636c 69656e74"  # "STUN test client"
    "0024 0004"  # PRIORITY
    "6e0001ff"
    "8029 0008"  # ICE-CONTROLLED
    "932ff9b1 51263b36"
    "0006 0009"  # USERNAME, 9 bytes
    "6576746a 3a683676 59202020"  # "evtj:h6vY" + 3 bytes of 0x20 padding
    "0008 0014"  # MESSAGE-INTEGRITY
    "9aeaa70c bfd8cb56 781ef2b5 b2d3f249 c1b571a2"
    "8028 0004"  # FINGERPRINT
    "e57a3bcf"
)

# 2.2 Sample IPv4 Response
RFC5769_RESPONSE_V4 = bytes.fromhex(
    "0101 003c"  # Binding Success Response, length 60
    "2112a442"
    "b7e7a701 bc34d686 fa87dfae"
    "8022 000b"  # SOFTWARE, 11 bytes
    "74657374 20766563 746f7220"  # "test vector" + 0x20 padding
    "0020 0008"  # XOR-MAPPED-ADDRESS
    "0001 a147 e112a643"  # IPv4, port 32853 ^ 0x2112, 192.0.2.1 ^ cookie
    "0008 0014"  # MESSAGE-INTEGRITY
    "2b91f599 fd9e90c3 8c7489f9 2af9ba53 f06be7d7"
    "8028 0004"  # FINGERPRINT
    "c07d4c96"
)

# 2.3 Sample IPv6 Response
RFC5769_RESPONSE_V6 = bytes.fromhex(
    "0101 0048"  # Binding Success Response, length 72
    "2112a442"
    "b7e7a701 bc34d686 fa87dfae"
    "8022 000b"  # SOFTWARE
    "74657374 20766563 746f7220"  # "test vector"
    "0020 0014"  # XOR-MAPPED-ADDRESS
    "0002 a147"  # IPv6, port
    "0113a9fa a5d3f179 bc25f4b5 bed2b9d9"  # 2001:db8:1234:5678:11:2233:4455:6677 ^ cookie|tid
    "0008 0014"  # MESSAGE-INTEGRITY
    "a382954e 4be67bf1 1784c97c 8292c275 bfe3ed41"
    "8028 0004"  # FINGERPRINT
    "c8fb0b4c"
)

# 2.4 Sample Request with Long-Term Authentication (no FINGERPRINT; zero padding)
RFC5769_LONG_TERM_USERNAME = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"  # "マトリックス"
RFC5769_LONG_TERM_REQUEST = bytes.fromhex(
    "0001 0060"
    "2112a442"
    "78ad3433 c6ad72c0 29da412e"
    "0006 0012"  # USERNAME, 18 bytes
    "e3839ee3 8388e383 aae38383 e382afe3 82b90000"
    "0015 001c"  # NONCE
    "662f2f34 39396b39 35346436 4f4c3334 6f4c3946 53547679 36347341"
    "0014 000b"  # REALM
    "6578616d 706c652e 6f726700"  # "example.org"
    "0008 0014"  # MESSAGE-INTEGRITY
    "f6702465 6dd64a3e 02b8e071 2e85c9a2 8ca89666"
)
ATTR_NONCE = 0x0015
ATTR_REALM = 0x0014
# RFC 5769 §2.4: key = MD5(username ":" realm ":" SASLprep(password)); the password
# "The<U+00AD>M<U+00AA>tr<U+2168>" SASLpreps to "TheMatrIX".
RFC5769_LONG_TERM_KEY = hashlib.md5(
    f"{RFC5769_LONG_TERM_USERNAME}:example.org:TheMatrIX".encode()
).digest()

TID = bytes(range(12))
KEY = b"Hz1YfJ2vQ8yTnP0sKcR7uWxA3bE"
USERNAME = "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNk:x9Zq"


def _with_length(data: bytes | bytearray) -> bytes:
    """Rewrite the header length to match ``data`` (for hand-made messages)."""
    out = bytearray(data)
    out[2:4] = struct.pack("!H", len(out) - 20)
    return bytes(out)


def _attr(attr_type: int, value: bytes, pad: int = 0) -> bytes:
    return struct.pack("!HH", attr_type, len(value)) + value + bytes([pad]) * (-len(value) % 4)


def _header(msg_type: int = BINDING_REQUEST, body: bytes = b"", tid: bytes = TID) -> bytes:
    return struct.pack("!HHI12s", msg_type, len(body), MAGIC_COOKIE, tid) + body


def _request(**kw: object) -> bytes:
    args: dict[str, object] = {"controlling": True, "tie_breaker": 0x0102030405060708}
    args.update(kw)
    return build_binding_request(TID, USERNAME, KEY, 0x6E7F1EFF, **args)  # type: ignore[arg-type]


def _append_after(message: bytes, *attrs: bytes) -> bytes:
    return _with_length(message + b"".join(attrs))


def _fingerprinted(message: bytes) -> bytes:
    """Append a correct FINGERPRINT to ``message`` (which has none)."""
    head = _with_length(message + bytes(8))[:20]
    crc = zlib.crc32(head + message[20:]) ^ 0x5354554E
    return head + message[20:] + _attr(ATTR_FINGERPRINT, struct.pack("!I", crc))


def _one(attr_type: int, value: bytes) -> StunMessage:
    """A message holding just one attribute."""
    return parse(_header(body=_attr(attr_type, value)))


def _keyed(msg_type: int, attrs: list[tuple[int, bytes]], key: bytes | None = KEY) -> bytes:
    return build_message(msg_type, TID, attrs, key)


# --- the vectors -----------------------------------------------------------------------------


def test_rfc5769_sample_request() -> None:
    msg = parse(RFC5769_REQUEST)
    assert msg.msg_type == BINDING_REQUEST and msg.is_binding_request
    assert (msg.method, msg.message_class) == (0x001, 0)
    assert msg.transaction_id == RFC5769_TID
    assert msg.get(ATTR_SOFTWARE) == b"STUN test client"
    assert msg.username == "evtj:h6vY"
    assert msg.get(ATTR_USERNAME) == b"evtj:h6vY"  # padding stripped
    assert msg.priority == 0x6E0001FF
    assert msg.ice_controlled == 0x932FF9B151263B36
    assert msg.ice_controlling is None
    assert msg.use_candidate is False
    assert msg.xor_mapped_address() is None
    assert msg.integrity_offset == 20 + 20 + 8 + 12 + 16
    assert msg.fingerprint_offset == len(RFC5769_REQUEST) - 8
    assert msg.integrity_sha256_offset is None
    assert msg.verify_integrity(RFC5769_PASSWORD)
    assert msg.has_fingerprint and msg.verify_fingerprint()
    assert parse_binding_request(RFC5769_REQUEST).username == "evtj:h6vY"


@pytest.mark.parametrize(
    ("vector", "mapped"),
    [
        (RFC5769_RESPONSE_V4, ("192.0.2.1", 32853)),
        (RFC5769_RESPONSE_V6, ("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
    ],
    ids=["ipv4", "ipv6"],
)
def test_rfc5769_sample_responses(vector: bytes, mapped: tuple[str, int]) -> None:
    msg = parse(vector)
    assert msg.msg_type == BINDING_SUCCESS and not msg.is_binding_request
    assert (msg.method, msg.message_class) == (0x001, 2)
    assert msg.transaction_id == RFC5769_TID
    assert msg.get(ATTR_SOFTWARE) == b"test vector"
    assert msg.xor_mapped_address() == mapped
    assert msg.username is None and msg.priority is None
    assert msg.verify_integrity(RFC5769_PASSWORD)
    assert msg.verify_fingerprint()
    with pytest.raises(StunError) as err:
        parse_binding_request(vector)
    assert err.value.reason == "stun_not_request"


def test_rfc5769_long_term_request() -> None:
    msg = parse(RFC5769_LONG_TERM_REQUEST)
    assert msg.username == RFC5769_LONG_TERM_USERNAME
    assert msg.get(ATTR_NONCE) == b"f//499k954d6OL34oL9FSTvy64sA"
    assert msg.get(ATTR_REALM) == b"example.org"
    assert msg.verify_integrity(RFC5769_LONG_TERM_KEY)
    assert not msg.verify_integrity(RFC5769_PASSWORD)
    assert not msg.has_fingerprint and not msg.verify_fingerprint()


@pytest.mark.parametrize(
    "vector", [RFC5769_REQUEST, RFC5769_RESPONSE_V4, RFC5769_RESPONSE_V6], ids=["req", "v4", "v6"]
)
@pytest.mark.parametrize(
    "key",
    # Not PASSWORD + b"\x00": HMAC zero-pads short keys, so that key is the same key.
    [b"", b"VOkJxbRl1RmTxUk/WvJxBu", RFC5769_PASSWORD + b"=", RFC5769_PASSWORD[:-1], b"vokjxbrl1rmtxuk/wvjxbt"],
    ids=["empty", "last-char", "longer", "shorter", "case"],
)
def test_rfc5769_wrong_key_fails(vector: bytes, key: bytes) -> None:
    assert not parse(vector).verify_integrity(key)


@pytest.mark.parametrize(
    "vector", [RFC5769_REQUEST, RFC5769_RESPONSE_V4, RFC5769_RESPONSE_V6, RFC5769_LONG_TERM_REQUEST]
)
def test_memoryview_input_parses_the_same(vector: bytes) -> None:
    view = memoryview(bytearray(vector))
    a, b = parse(vector), parse(view)
    assert (b.msg_type, b.transaction_id) == (a.msg_type, a.transaction_id)
    for attr_type in (ATTR_SOFTWARE, ATTR_USERNAME, ATTR_XOR_MAPPED_ADDRESS, ATTR_MESSAGE_INTEGRITY):
        value = b.get(attr_type)
        assert value == a.get(attr_type)
        assert value is None or type(value) is bytes
    assert b.xor_mapped_address() == a.xor_mapped_address()
    assert b.username == a.username
    assert b.verify_fingerprint() == a.verify_fingerprint()
    key = RFC5769_LONG_TERM_KEY if vector is RFC5769_LONG_TERM_REQUEST else RFC5769_PASSWORD
    assert b.verify_integrity(key) and a.verify_integrity(key)


# --- the builder reproduces the vectors -------------------------------------------------------


def _rfc_request(pad: int) -> bytes:
    attrs = [
        (ATTR_SOFTWARE, b"STUN test client"),
        (ATTR_PRIORITY, struct.pack("!I", 0x6E0001FF)),
        (ATTR_ICE_CONTROLLED, bytes.fromhex("932ff9b151263b36")),
        (ATTR_USERNAME, b"evtj:h6vY"),
    ]
    return build_message(BINDING_REQUEST, RFC5769_TID, attrs, RFC5769_PASSWORD, True, pad=pad)


def _rfc_response(ip: str, pad: int) -> bytes:
    attrs = [
        (ATTR_SOFTWARE, b"test vector"),
        (ATTR_XOR_MAPPED_ADDRESS, encode_xor_address(ip, 32853, RFC5769_TID)),
    ]
    return build_message(BINDING_SUCCESS, RFC5769_TID, attrs, RFC5769_PASSWORD, pad=pad)


def test_builder_reproduces_rfc5769_vectors_byte_exact() -> None:
    assert _rfc_request(pad=0x20) == RFC5769_REQUEST
    assert _rfc_response("192.0.2.1", pad=0x20) == RFC5769_RESPONSE_V4
    assert _rfc_response("2001:db8:1234:5678:11:2233:4455:6677", pad=0x20) == RFC5769_RESPONSE_V6
    attrs = [
        (ATTR_USERNAME, RFC5769_LONG_TERM_USERNAME.encode()),
        (ATTR_NONCE, b"f//499k954d6OL34oL9FSTvy64sA"),
        (ATTR_REALM, b"example.org"),
    ]
    tid = bytes.fromhex("78ad3433c6ad72c029da412e")
    built = build_message(BINDING_REQUEST, tid, attrs, RFC5769_LONG_TERM_KEY, fingerprint=False)
    assert built == RFC5769_LONG_TERM_REQUEST


def test_builder_zero_padding_differs_only_in_padding_and_checksums() -> None:
    # With the default zero padding the padding bytes differ, and with them MI and FINGERPRINT
    # (which cover the padding); everything else is the vector's.
    built = _rfc_request(pad=0)
    assert len(built) == len(RFC5769_REQUEST)
    diff = {i for i, (a, b) in enumerate(zip(built, RFC5769_REQUEST)) if a != b}
    username_padding = set(range(20 + 20 + 8 + 12 + 4 + 9, 20 + 20 + 8 + 12 + 4 + 12))
    mi_value = set(range(76 + 4, 76 + 24))
    fp_value = set(range(100 + 4, 100 + 8))
    assert username_padding <= diff  # the padding really differs
    assert diff <= username_padding | mi_value | fp_value
    msg = parse(built)
    assert msg.username == "evtj:h6vY" and msg.get(ATTR_SOFTWARE) == b"STUN test client"
    assert msg.verify_integrity(RFC5769_PASSWORD) and msg.verify_fingerprint()


def test_encode_xor_address_matches_vectors() -> None:
    assert encode_xor_address("192.0.2.1", 32853, RFC5769_TID) == bytes.fromhex("0001a147e112a643")
    assert encode_xor_address(
        "2001:db8:1234:5678:11:2233:4455:6677", 32853, RFC5769_TID
    ) == bytes.fromhex("0002a1470113a9faa5d3f179bc25f4b5bed2b9d9")


@pytest.mark.parametrize(
    ("ip", "port", "tid"),
    [("192.0.2.1", 65536, TID), ("192.0.2.1", -1, TID), ("::1", 1, b"short"), ("nope", 1, TID)],
)
def test_encode_xor_address_rejects_bad_input(ip: str, port: int, tid: bytes) -> None:
    with pytest.raises(ValueError):
        encode_xor_address(ip, port, tid)


def test_build_message_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        build_message(0x4001, TID, [])  # top bits set
    with pytest.raises(ValueError):
        build_message(BINDING_REQUEST, b"\x00" * 11, [])
    with pytest.raises(ValueError):
        build_message(BINDING_REQUEST, TID, [(0x10000, b"")])
    with pytest.raises(ValueError):
        build_message(BINDING_REQUEST, TID, [(ATTR_SOFTWARE, bytes(0x10000))])
    with pytest.raises(ValueError):
        build_message(BINDING_REQUEST, TID, [(ATTR_SOFTWARE, bytes(0xFFF0))], KEY)


# --- convenience builders ---------------------------------------------------------------------


@pytest.mark.parametrize("controlling", [True, False])
@pytest.mark.parametrize("use_candidate", [True, False])
@pytest.mark.parametrize("fingerprint", [True, False])
def test_build_binding_request_round_trip(
    controlling: bool, use_candidate: bool, fingerprint: bool
) -> None:
    data = _request(controlling=controlling, use_candidate=use_candidate, fingerprint=fingerprint)
    msg = parse_binding_request(data)
    assert msg.transaction_id == TID
    assert msg.username == USERNAME
    assert msg.priority == 0x6E7F1EFF
    assert msg.use_candidate is use_candidate
    if controlling:
        assert (msg.ice_controlling, msg.ice_controlled) == (0x0102030405060708, None)
    else:
        assert (msg.ice_controlling, msg.ice_controlled) == (None, 0x0102030405060708)
    assert msg.verify_integrity(KEY)
    assert not msg.verify_integrity(KEY[:-1])
    assert msg.has_fingerprint is fingerprint
    assert msg.verify_fingerprint() is fingerprint


@pytest.mark.parametrize("mapped", [("203.0.113.7", 50000), ("2001:db8::42", 3478), ("::", 0)])
@pytest.mark.parametrize("key", [KEY, None])
def test_build_binding_success_round_trip(mapped: tuple[str, int], key: bytes | None) -> None:
    msg = parse(build_binding_success(TID, mapped, key))
    assert msg.msg_type == BINDING_SUCCESS
    assert msg.xor_mapped_address() == mapped
    assert msg.verify_integrity(KEY) is (key is not None)
    assert (msg.integrity_offset is None) is (key is None)
    assert msg.verify_fingerprint()


@pytest.mark.parametrize(
    ("msg_type", "method", "cls"),
    [(BINDING_REQUEST, 1, 0), (BINDING_INDICATION, 1, 1), (BINDING_SUCCESS, 1, 2), (BINDING_ERROR, 1, 3),
     (0x0003, 3, 0), (0x0113, 3, 3), (0x3EEF, 0xFFF, 0)],
)
def test_method_and_class(msg_type: int, method: int, cls: int) -> None:
    msg = parse(build_message(msg_type, TID, [], fingerprint=False))
    assert (msg.method, msg.message_class) == (method, cls)
    assert msg.is_binding_request is (msg_type == BINDING_REQUEST)


# --- interop with aioice (what the transceiver and test clients use) --------------------------


def test_aioice_request_parses_and_verifies() -> None:
    message = aioice.stun.Message(
        message_method=aioice.stun.Method.BINDING,
        message_class=aioice.stun.Class.REQUEST,
        transaction_id=TID,
    )
    message.attributes["USERNAME"] = USERNAME
    message.attributes["PRIORITY"] = 1853824767
    message.attributes["ICE-CONTROLLING"] = 0xDEADBEEFCAFEF00D
    message.attributes["USE-CANDIDATE"] = None
    message.add_message_integrity(KEY)
    msg = parse_binding_request(bytes(message))
    assert msg.username == USERNAME
    assert msg.priority == 1853824767
    assert msg.ice_controlling == 0xDEADBEEFCAFEF00D
    assert msg.use_candidate
    assert msg.verify_integrity(KEY) and msg.verify_fingerprint()


def test_our_messages_parse_and_verify_in_aioice() -> None:
    message = aioice.stun.parse_message(_request(use_candidate=True))
    assert message.attributes["USERNAME"] == USERNAME
    assert message.attributes["ICE-CONTROLLING"] == 0x0102030405060708
    assert "USE-CANDIDATE" in message.attributes
    assert message.check_message_integrity(KEY)
    response = aioice.stun.parse_message(build_binding_success(TID, ("2001:db8::7", 9), KEY))
    assert response.attributes["XOR-MAPPED-ADDRESS"] == ("2001:db8::7", 9)
    assert response.check_message_integrity(KEY)


# --- placement rules (RFC 8489 §14) -------------------------------------------------------------


def test_first_occurrence_wins() -> None:
    data = _keyed(BINDING_REQUEST, [(ATTR_USERNAME, b"first:one"), (ATTR_USERNAME, b"second:two")])
    msg = parse(data)
    assert msg.username == "first:one"
    assert msg.verify_integrity(KEY)


def test_attributes_after_integrity_are_ignored_but_fingerprint_counts() -> None:
    signed = _request(use_candidate=False, fingerprint=False)
    tail = _attr(ATTR_USE_CANDIDATE, b"") + _attr(ATTR_USERNAME, b"mallory:x")
    tampered = _append_after(signed, tail)
    msg = parse(tampered)
    assert not msg.use_candidate and ATTR_USE_CANDIDATE not in msg
    assert msg.username == USERNAME
    assert msg.verify_integrity(KEY)  # MI covers only what precedes it
    assert not msg.has_fingerprint
    with_fp = _fingerprinted(tampered)
    msg = parse(with_fp)
    assert msg.has_fingerprint and msg.verify_fingerprint() and msg.verify_integrity(KEY)
    assert not msg.use_candidate


def test_second_integrity_is_ignored() -> None:
    signed = _request(fingerprint=False)
    bogus = _attr(ATTR_MESSAGE_INTEGRITY, bytes(20))
    msg = parse(_append_after(signed, bogus))
    assert msg.integrity_offset == len(signed) - 24
    assert msg.verify_integrity(KEY)


def _sha256_signed(message: bytes, key: bytes, size: int = 32) -> bytes:
    """Append MESSAGE-INTEGRITY-SHA256 (truncated to ``size``) to ``message``."""
    head = _with_length(message + bytes(4 + size))[:20]
    mac = hmac.digest(key, head + message[20:], "sha256")[:size]
    return head + message[20:] + _attr(ATTR_MESSAGE_INTEGRITY_SHA256, mac)


@pytest.mark.parametrize("size", [16, 20, 32])
def test_message_integrity_sha256_after_sha1(size: int) -> None:
    signed = _request(fingerprint=False)
    data = _fingerprinted(_sha256_signed(signed, KEY, size))
    msg = parse_binding_request(data)
    assert msg.verify_integrity(KEY)
    assert msg.verify_integrity_sha256(KEY)
    assert not msg.verify_integrity_sha256(KEY + b"!")
    assert msg.integrity_sha256_offset == len(signed)
    assert msg.verify_fingerprint()


def test_message_integrity_sha256_alone_seals_the_message() -> None:
    body = _attr(ATTR_USERNAME, b"a:b")
    data = _sha256_signed(_header(body=body), KEY)
    data = _append_after(data, _attr(ATTR_MESSAGE_INTEGRITY, bytes(20)), _attr(ATTR_PRIORITY, bytes(4)))
    msg = parse(data)
    assert msg.verify_integrity_sha256(KEY)
    assert msg.integrity_offset is None and not msg.verify_integrity(KEY)
    assert msg.priority is None
    assert not parse(_request()).verify_integrity_sha256(KEY)


# --- every drop reason --------------------------------------------------------------------------


def _raises(fn: Callable[[], object], reason: str) -> None:
    with pytest.raises(StunError) as err:
        fn()
    assert err.value.reason == reason
    assert str(err.value) == reason


def _good() -> bytes:
    return _request()


def _mutate(data: bytes, index: int, value: int) -> bytes:
    out = bytearray(data)
    out[index] = value
    return bytes(out)


_BAD_USERNAME = _header(body=_attr(ATTR_USERNAME, b"\xff\xfeab") + _attr(ATTR_MESSAGE_INTEGRITY, bytes(20)))

_SIGNED_NO_FP = build_message(BINDING_REQUEST, TID, [], KEY, fingerprint=False)

REASON_CASES: list[tuple[str, Callable[[], object]]] = [
    ("stun_too_short", lambda: parse(b"")),
    ("stun_too_short", lambda: parse(_good()[:19])),
    ("stun_bad_type", lambda: parse(_mutate(_good(), 0, 0x40))),
    ("stun_bad_type", lambda: parse(_mutate(_good(), 0, 0x80))),
    ("stun_bad_length", lambda: parse(_good() + bytes(4))),
    ("stun_bad_length", lambda: parse(_good()[:-4])),
    ("stun_bad_length", lambda: parse(_header()[:2] + b"\x00\x02" + _header()[4:] + b"\x00\x00")),
    ("stun_bad_cookie", lambda: parse(_mutate(_good(), 4, 0x22))),
    ("stun_attr_truncated", lambda: parse(_header(body=struct.pack("!HH", ATTR_SOFTWARE, 8) + bytes(4)))),
    # A value whose padding is missing is truncated too.
    ("stun_attr_truncated", lambda: parse(_header(body=struct.pack("!HH", ATTR_SOFTWARE, 5) + bytes(4)))),
    ("stun_bad_attr_length", lambda: _one(ATTR_MESSAGE_INTEGRITY, bytes(16))),
    ("stun_bad_attr_length", lambda: _one(ATTR_FINGERPRINT, bytes(8))),
    ("stun_bad_attr_length", lambda: _one(ATTR_MESSAGE_INTEGRITY_SHA256, bytes(12))),
    ("stun_bad_attr_length", lambda: _one(ATTR_MESSAGE_INTEGRITY_SHA256, bytes(36))),
    ("stun_bad_attr_length", lambda: _one(ATTR_MESSAGE_INTEGRITY_SHA256, bytes(18))),
    ("stun_bad_attr_length", lambda: _one(ATTR_PRIORITY, bytes(3)).priority),
    ("stun_bad_attr_length", lambda: _one(ATTR_ICE_CONTROLLING, bytes(4)).ice_controlling),
    ("stun_bad_attr_length", lambda: _one(ATTR_ICE_CONTROLLED, bytes(9)).ice_controlled),
    ("stun_attr_after_fingerprint", lambda: parse(_append_after(_good(), _attr(ATTR_SOFTWARE, b"x")))),
    ("stun_attr_after_fingerprint", lambda: parse(_append_after(_good(), _attr(ATTR_FINGERPRINT, bytes(4))))),
    ("stun_bad_address", lambda: _one(ATTR_XOR_MAPPED_ADDRESS, bytes([0, 3, 0, 1]) + bytes(4)).xor_mapped_address()),
    ("stun_bad_address", lambda: _one(ATTR_XOR_MAPPED_ADDRESS, bytes([0, 1, 0, 1]) + bytes(16)).xor_mapped_address()),
    ("stun_bad_address", lambda: _one(ATTR_XOR_MAPPED_ADDRESS, bytes([0, 2])).xor_mapped_address()),
    ("stun_bad_username", lambda: parse(_BAD_USERNAME).username),
    ("stun_bad_username", lambda: parse_binding_request(_BAD_USERNAME).username),
    ("stun_not_request", lambda: parse_binding_request(build_binding_success(TID, ("192.0.2.1", 1), KEY))),
    ("stun_not_request", lambda: parse_binding_request(_keyed(BINDING_INDICATION, [(ATTR_USERNAME, b"a:b")]))),
    ("stun_not_request", lambda: parse_binding_request(_keyed(0x0003, [(ATTR_USERNAME, b"a:b")]))),
    ("stun_no_username", lambda: parse_binding_request(_keyed(BINDING_REQUEST, [(ATTR_PRIORITY, bytes(4))]))),
    # USERNAME after MESSAGE-INTEGRITY is ignored, so it does not count.
    ("stun_no_username", lambda: parse_binding_request(_append_after(_SIGNED_NO_FP, _attr(ATTR_USERNAME, b"a:b")))),
    ("stun_no_integrity", lambda: parse_binding_request(_keyed(BINDING_REQUEST, [(ATTR_USERNAME, b"a:b")], None))),
]


@pytest.mark.parametrize(("reason", "case"), REASON_CASES)
def test_drop_reason(reason: str, case: Callable[[], object]) -> None:
    assert reason in STUN_ERROR_REASONS
    _raises(case, reason)


def test_every_drop_reason_is_tested() -> None:
    assert {reason for reason, _ in REASON_CASES} == STUN_ERROR_REASONS
    assert all(r.startswith("stun_") and r == r.lower() and " " not in r for r in STUN_ERROR_REASONS)


def test_stun_error_reason_attribute() -> None:
    err = StunError("stun_bad_cookie")
    assert err.reason == "stun_bad_cookie" and err.args == ("stun_bad_cookie",)


def test_unknown_attributes_and_error_code_are_indexed_not_interpreted() -> None:
    data = build_message(BINDING_ERROR, TID, [(ATTR_ERROR_CODE, b"\x00\x00\x04\x01Unauthorized"), (0x7FFF, b"?")])
    msg = parse(data)
    assert msg.get(ATTR_ERROR_CODE) == b"\x00\x00\x04\x01Unauthorized"
    assert msg.get(0x7FFF) == b"?" and 0x7FFF in msg
    assert msg.get(0x1234) is None and 0x1234 not in msg


# --- properties -----------------------------------------------------------------------------


def _exercise(data: bytes | memoryview) -> StunMessage | None:
    """parse and every accessor: a message, or StunError with a known reason, nothing else."""
    try:
        msg = parse(data)
    except StunError as err:
        assert err.reason in STUN_ERROR_REASONS
        return None
    assert isinstance(msg.msg_type, int) and 0 <= msg.msg_type <= 0x3FFF
    assert len(msg.transaction_id) == 12
    for accessor in (
        lambda: msg.username,
        lambda: msg.priority,
        lambda: msg.ice_controlling,
        lambda: msg.ice_controlled,
        msg.xor_mapped_address,
        lambda: parse_binding_request(data),
    ):
        try:
            accessor()
        except StunError as err:
            assert err.reason in STUN_ERROR_REASONS
    for attr_type in (ATTR_USERNAME, ATTR_SOFTWARE, ATTR_MESSAGE_INTEGRITY, ATTR_FINGERPRINT, 0xFFFF):
        value = msg.get(attr_type)
        assert value is None or type(value) is bytes
    assert isinstance(msg.use_candidate, bool)
    assert isinstance(msg.verify_integrity(KEY), bool)
    assert isinstance(msg.verify_integrity_sha256(KEY), bool)
    assert isinstance(msg.verify_fingerprint(), bool)
    assert msg.has_fingerprint is (msg.fingerprint_offset is not None)
    repr(msg)
    return msg


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=256))
def test_arbitrary_bytes_give_a_message_or_stun_error(data: bytes) -> None:
    _exercise(data)
    _exercise(memoryview(data))


_ATTR_TYPES = st.one_of(
    st.sampled_from(
        [ATTR_USERNAME, ATTR_MESSAGE_INTEGRITY, ATTR_MESSAGE_INTEGRITY_SHA256, ATTR_FINGERPRINT,
         ATTR_XOR_MAPPED_ADDRESS, ATTR_PRIORITY, ATTR_USE_CANDIDATE, ATTR_ICE_CONTROLLED,
         ATTR_ICE_CONTROLLING, ATTR_SOFTWARE, ATTR_ERROR_CODE]
    ),
    st.integers(0, 0xFFFF),
)
_RAW_ATTR = st.tuples(_ATTR_TYPES, st.binary(max_size=40), st.integers(-4, 4)).map(
    # A declared length off by up to +-4 exercises truncation and misaligned walks.
    lambda a: struct.pack("!HH", a[0], max(0, min(0xFFFF, len(a[1]) + a[2]))) + a[1] + bytes(-len(a[1]) % 4)
)


@FUZZ
@given(
    msg_type=st.integers(0, 0x3FFF),
    attrs=st.lists(_RAW_ATTR, max_size=8),
    tail=st.binary(max_size=8),
)
def test_well_framed_garbage_gives_a_message_or_stun_error(msg_type: int, attrs: list[bytes], tail: bytes) -> None:
    body = b"".join(attrs) + tail
    _exercise(_header(msg_type, body))
    _exercise(_header(msg_type, body + bytes(-len(body) % 4)))  # length a multiple of 4


def _covered_end(data: bytes) -> int:
    msg = parse(data)
    assert msg.integrity_offset is not None
    return msg.integrity_offset + 24


SIGNED_SAMPLES = [
    (RFC5769_REQUEST, RFC5769_PASSWORD),
    (RFC5769_RESPONSE_V6, RFC5769_PASSWORD),
    (_request(use_candidate=True), KEY),
    (_request(fingerprint=False), KEY),
]


@pytest.mark.parametrize(("data", "key"), SIGNED_SAMPLES, ids=["rfc-req", "rfc-v6", "ice", "ice-nofp"])
def test_every_truncation_is_rejected(data: bytes, key: bytes) -> None:
    for cut in range(len(data)):
        with pytest.raises(StunError) as err:
            parse(data[:cut])
        assert err.value.reason in {"stun_too_short", "stun_bad_length"}


def _check_mutation(data: bytes, key: bytes, index: int, delta: int) -> None:
    mutated = bytearray(data)
    mutated[index] ^= delta
    msg = _exercise(bytes(mutated))
    if msg is None:
        return
    if index < _covered_end(data):
        assert not msg.verify_integrity(key), f"mutation at {index} passed MESSAGE-INTEGRITY"
    if parse(data).has_fingerprint:
        # CRC-32 catches every single-byte error, wherever the walk now finds FINGERPRINT.
        assert not (msg.has_fingerprint and msg.verify_fingerprint()), f"mutation at {index}"


@pytest.mark.parametrize(("data", "key"), SIGNED_SAMPLES, ids=["rfc-req", "rfc-v6", "ice", "ice-nofp"])
def test_every_single_bit_flip_is_caught(data: bytes, key: bytes) -> None:
    assert parse(data).verify_integrity(key)
    for index in range(len(data)):
        for bit in range(8):
            _check_mutation(data, key, index, 1 << bit)


@FUZZ
@given(st.sampled_from(SIGNED_SAMPLES), st.data())
def test_random_single_byte_mutation_is_caught(sample: tuple[bytes, bytes], draw: st.DataObject) -> None:
    data, key = sample
    index = draw.draw(st.integers(0, len(data) - 1))
    delta = draw.draw(st.integers(1, 255))
    _check_mutation(data, key, index, delta)


_ICE_CHARS = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", min_size=4, max_size=64)


@FUZZ
@given(
    tid=st.binary(min_size=12, max_size=12),
    local=_ICE_CHARS,
    remote=_ICE_CHARS,
    password=st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", min_size=22, max_size=64),
    priority=st.integers(0, 2**32 - 1),
    controlling=st.booleans(),
    tie_breaker=st.integers(0, 2**64 - 1),
    use_candidate=st.booleans(),
    fingerprint=st.booleans(),
)
def test_binding_request_round_trip(
    tid: bytes, local: str, remote: str, password: str, priority: int, controlling: bool,
    tie_breaker: int, use_candidate: bool, fingerprint: bool,
) -> None:
    key = password.encode()
    data = build_binding_request(
        tid, f"{local}:{remote}", key, priority, controlling=controlling, tie_breaker=tie_breaker,
        use_candidate=use_candidate, fingerprint=fingerprint,
    )
    assert len(data) % 4 == 0
    msg = parse_binding_request(data)
    assert msg.transaction_id == tid
    assert msg.username == f"{local}:{remote}"
    assert msg.priority == priority
    assert (msg.ice_controlling if controlling else msg.ice_controlled) == tie_breaker
    assert (msg.ice_controlled if controlling else msg.ice_controlling) is None
    assert msg.use_candidate is use_candidate
    assert msg.verify_integrity(key)
    assert not msg.verify_integrity(key + b"x")
    assert msg.verify_fingerprint() is fingerprint


@FUZZ
@given(
    msg_type=st.integers(0, 0x3FFF),
    attrs=st.lists(
        st.tuples(st.integers(0, 0xFFFF).filter(lambda t: t not in stun._TRAILERS), st.binary(max_size=70)),
        max_size=10,
    ),
    keyed=st.booleans(),
    fingerprint=st.booleans(),
    pad=st.integers(0, 255),
)
def test_build_message_round_trip(
    msg_type: int, attrs: list[tuple[int, bytes]], keyed: bool, fingerprint: bool, pad: int
) -> None:
    data = build_message(msg_type, TID, attrs, KEY if keyed else None, fingerprint, pad=pad)
    msg = parse(data)
    assert msg.msg_type == msg_type
    first: dict[int, bytes] = {}
    for attr_type, value in attrs:
        first.setdefault(attr_type, value)
    for attr_type, value in first.items():
        assert msg.get(attr_type) == value
    assert msg.verify_integrity(KEY) is keyed
    assert msg.verify_fingerprint() is fingerprint
