"""The fuzz targets of tests/test_fuzz.py: the STUN parser, route tokens, tunnel frames and the
whole miss-path decision. Each fails on any exception but the named one (StunError,
TokenError, FrameError, with a reason its module lists); ``decide`` must never raise at all.

Kept apart from pytest and hypothesis (this module imports only the relay's), so that
atheris instruments and loads only the relay's modules (tests/test_fuzz.py runs them).
"""
from __future__ import annotations

import socket

from relay.decision import AuthPolicy, Drop, Learn, decide
from relay.metrics import DROP_REASONS
from wire.route_token import TOKEN_ERROR_REASONS, RouteKeyring, TokenError, decode_token, derive_password, inspect_token
from wire.stun import (
    ATTR_FINGERPRINT,
    ATTR_MESSAGE_INTEGRITY,
    ATTR_USERNAME,
    ATTR_XOR_MAPPED_ADDRESS,
    STUN_ERROR_REASONS,
    StunError,
    parse,
    parse_binding_request,
)
from wire.tunnel_frame import (
    FRAME_ERROR_REASONS,
    Data,
    Drain,
    FrameError,
    Heartbeat,
    SessionClosed,
    decode_frame,
    encode_frame,
)

# Fixed secrets and clock, so the corpus' tokens and MESSAGE-INTEGRITY verify: the fuzzer
# starts from inputs that reach the deepest checks.
KEYRING = RouteKeyring({1: b"fuzz-corpus-route-secret-one-0001", 2: b"fuzz-corpus-route-secret-two-0002"}, 1)
NOW = 1_750_000_000
CLUSTER = 7
SOURCE = (socket.inet_aton("127.0.0.1"), 40000)


def _stun_error(exc: StunError) -> None:
    assert exc.reason in STUN_ERROR_REASONS, exc.reason


def target_stun(data: bytes) -> None:
    for buf in (data, memoryview(data)):
        try:
            msg = parse(buf)
        except StunError as exc:
            _stun_error(exc)
            continue
        repr(msg)
        assert isinstance(msg.method, int) and 0 <= msg.message_class <= 3
        _ = (msg.is_binding_request, msg.use_candidate, msg.has_fingerprint)
        _ = (msg.integrity_offset, msg.integrity_sha256_offset, msg.fingerprint_offset, ATTR_USERNAME in msg)
        for attr in (ATTR_USERNAME, ATTR_XOR_MAPPED_ADDRESS, ATTR_MESSAGE_INTEGRITY, ATTR_FINGERPRINT, 0x8055):
            value = msg.get(attr)
            assert value is None or isinstance(value, bytes)
        for accessor in ("username", "priority", "ice_controlling", "ice_controlled"):
            try:
                getattr(msg, accessor)
            except StunError as exc:
                _stun_error(exc)
        try:
            msg.xor_mapped_address()
        except StunError as exc:
            _stun_error(exc)
        for key in (b"", b"pwd", derive_password(KEYRING, "A" * 38, 1).encode()):
            assert msg.verify_integrity(key) in (True, False)
            assert msg.verify_integrity_sha256(key) in (True, False)
        assert msg.verify_fingerprint() in (True, False)
    try:
        parse_binding_request(data)
    except StunError as exc:
        _stun_error(exc)


def _token_error(exc: TokenError) -> None:
    assert exc.reason in TOKEN_ERROR_REASONS, exc.reason


def target_token(data: bytes) -> None:
    ufrag = data.decode("utf-8", "replace")  # what a USERNAME can carry: any UTF-8 text
    try:
        token = inspect_token(ufrag)
        assert len(token.target_ip) in (4, 16) and 0 <= token.target_port <= 0xFFFF
    except TokenError as exc:
        _token_error(exc)
    for max_age in (300.0, None):
        for cluster in (None, CLUSTER):
            try:
                token = decode_token(KEYRING, ufrag, NOW, max_age=max_age, cluster=cluster)
                assert token.key_id in KEYRING.key_ids
                assert KEYRING.password(token.key_id, ufrag) is not None
            except TokenError as exc:
                _token_error(exc)
    if ufrag.isascii():  # non-ASCII: a known bug, see test_fuzz.test_derive_password_of_a_non_ascii_ufrag...
        try:
            derive_password(KEYRING, ufrag)
        except TokenError as exc:
            _token_error(exc)


def target_frame(data: bytes) -> None:
    for buf in (data, memoryview(data)):
        try:
            frame = decode_frame(buf)
        except FrameError as exc:
            assert exc.reason in FRAME_ERROR_REASONS, exc.reason
            continue
        assert isinstance(frame, (Data, Heartbeat, SessionClosed, Drain))
        if isinstance(frame, Data):
            assert len(frame.ip) in (4, 16) and 0 <= frame.port <= 0xFFFF and frame.handle >= 0
        again = decode_frame(encode_frame(frame))
        assert again == frame or (isinstance(frame, Drain) and frame.deadline_s != frame.deadline_s), (frame, again)


class FuzzView:
    """The decision's window on the table: nothing is known, sessions sometimes are."""

    def find(self, source: tuple[bytes, int]) -> None:
        return None

    def session_known(self, ufrag: str) -> bool:
        return ufrag[-1:] in ("+", "/")  # rare, and reachable: both age-check paths run

    def session_closed(self, ufrag: str, now: float) -> bool:
        # Only signed checks get this far: the corpus's key-2 request stands for a closed session.
        return ufrag.endswith("30A")

    def transceiver_gone(self, target_ip: bytes, target_port: int, issued_at: int) -> bool:
        return target_port % 7 == 0  # sometimes: the signed-error answer runs too


_AUTH = AuthPolicy(KEYRING, 300.0, CLUSTER)


def target_decide(data: bytes) -> None:
    result = decide(data, SOURCE, FuzzView(), _AUTH, NOW)
    if isinstance(result, Drop):
        assert result.reason in DROP_REASONS, result.reason
    else:
        assert isinstance(result, Learn), result  # the view knows no flow: no Forward
        assert len(result.target_ip) in (4, 16)


FUZZ_TARGETS = {"stun": target_stun, "token": target_token, "frame": target_frame, "decide": target_decide}
