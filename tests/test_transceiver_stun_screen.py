"""transceiver/stun_screen.py: what reaches aioice, and why the rest does not."""

from __future__ import annotations

import os

from transceiver.stun_screen import SCREEN_REASONS, Screened, screen
from wire.stun import (
    ATTR_ICE_CONTROLLING,
    ATTR_PRIORITY,
    ATTR_USERNAME,
    BINDING_INDICATION,
    BINDING_REQUEST,
    BINDING_SUCCESS,
    build_binding_request,
    build_message,
)

UFRAG = "server-ufrag"
PASSWORD = b"a-password-of-twenty-two+"
TIE = (1234).to_bytes(8, "big")


def check(**kw: object) -> bytes:
    args: dict = {"username": f"{UFRAG}:cli", "integrity_key": PASSWORD, "priority": 100, "controlling": True,
                  "tie_breaker": 1234}
    args.update(kw)
    return build_binding_request(os.urandom(12), **args)


def test_a_signed_check_passes() -> None:
    verdict = screen(check(use_candidate=True), UFRAG, PASSWORD)
    assert isinstance(verdict, Screened) and verdict.request
    assert verdict.message.use_candidate


def test_zero_length_priority_is_refused_although_correctly_signed() -> None:
    # The request that made aioice raise struct.error inside the tunnel endpoint (issue #17).
    data = build_message(BINDING_REQUEST, os.urandom(12),
                         [(ATTR_USERNAME, f"{UFRAG}:cli".encode()), (ATTR_PRIORITY, b""), (ATTR_ICE_CONTROLLING, TIE)],
                         PASSWORD)
    assert screen(data, UFRAG, PASSWORD) == "stun_malformed"


def test_refusals_by_reason() -> None:
    assert screen(check(fingerprint=False), UFRAG, PASSWORD) == "stun_no_fingerprint"
    assert screen(check(integrity_key=b"another password entirely"), UFRAG, PASSWORD) == "stun_bad_integrity"
    assert screen(check(username="someone-else:cli"), UFRAG, PASSWORD) == "stun_bad_username"
    assert screen(check(username=UFRAG), UFRAG, PASSWORD) == "stun_bad_username"  # no ":theirs"
    good = bytearray(check())
    good[-1] ^= 1  # the CRC
    assert screen(bytes(good), UFRAG, PASSWORD) == "stun_bad_fingerprint"
    assert screen(b"\x00\x01\x00", UFRAG, PASSWORD) == "stun_malformed"
    allocate = build_message(0x0003, os.urandom(12), [], PASSWORD)  # TURN Allocate
    assert screen(allocate, UFRAG, PASSWORD) == "stun_not_binding"
    assert {"stun_no_fingerprint", "stun_bad_integrity", "stun_malformed"} <= SCREEN_REASONS


def test_responses_and_indications_pass_to_aioice_unauthenticated() -> None:
    # aioice checks a response against the transaction it sent; indications are keepalives.
    response = screen(build_message(BINDING_SUCCESS, os.urandom(12), [], b"their password"), UFRAG, PASSWORD)
    assert isinstance(response, Screened) and not response.request
    indication = screen(build_message(BINDING_INDICATION, os.urandom(12), []), UFRAG, PASSWORD)
    assert isinstance(indication, Screened) and not indication.request


def test_any_bytes_get_a_verdict_and_never_raise() -> None:
    seed = check(use_candidate=True)
    rng = __import__("random").Random(7)
    for _ in range(3000):
        data = bytearray(seed)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        verdict = screen(bytes(data[: rng.randint(0, len(data))] if rng.random() < 0.2 else data), UFRAG, PASSWORD)
        assert isinstance(verdict, Screened) or verdict in SCREEN_REASONS
