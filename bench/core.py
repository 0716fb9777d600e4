"""ns per operation of the sans-IO core: demux, STUN parse, integrity check, token decode,
frame encode/decode, the whole miss-path decision. Prints a table; the reference line is a
dict lookup by a 16-byte key measured in the same run, so the ratios travel between machines.

    .venv/bin/python bench/core.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.decision import AuthPolicy, authenticate, decide
from wire.demux import classify
from wire.route_token import RouteKeyring, decode_token, derive_password, issue_token
from wire.stun import build_binding_request, parse, parse_binding_request
from wire.tunnel_frame import Data, data_header, decode_frame, encode_frame


class EmptyView:
    def find(self, source):
        return None

    def session_known(self, ufrag):
        return False


def measure(stmt, number: int, repeat: int) -> float:
    """Best of ``repeat`` runs, in ns per call (the minimum is the least noisy estimate)."""
    return min(timeit.repeat(stmt, number=number, repeat=repeat)) / number * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke run)")
    args = parser.parse_args()
    number, repeat = (2_000, 3) if args.quick else (50_000, 7)

    now = time.time()
    keyring = RouteKeyring({1: os.urandom(32)}, 1)
    ufrag = issue_token(keyring, socket.inet_aton("10.0.0.7"), 7000, now)
    password = derive_password(keyring, ufrag).encode()
    request = build_binding_request(os.urandom(12), f"{ufrag}:abcd", password, priority=1853824767,
                                    controlling=True, tie_breaker=0x1122334455667788, use_candidate=True)
    message = parse(request)
    payload = os.urandom(140)
    frame = Data(123456789, b"\x7f\x00\x00\x01", 50000, payload)
    encoded = encode_frame(frame)
    header = data_header(123456789, b"\x7f\x00\x00\x01", 50000, 140)
    auth = AuthPolicy(keyring)
    view = EmptyView()
    flows = {os.urandom(16): i for i in range(10_000)}
    key = next(iter(flows))
    source = (b"\x7f\x00\x00\x02", 40000)

    rows = [
        ("reference: dict hit, 16-byte key (10k entries)", lambda: flows.get(key)),
        ("demux (RFC 7983 classify)", lambda: classify(request)),
        ("STUN parse, ICE Binding Request", lambda: parse(request)),
        ("STUN parse + require USERNAME/MI", lambda: parse_binding_request(request)),
        ("MESSAGE-INTEGRITY check (HMAC-SHA1)", lambda: message.verify_integrity(password)),
        ("FINGERPRINT check (CRC-32)", lambda: message.verify_fingerprint()),  # noqa: PLW0108 - called via a lambda as every row
        ("route token decode + MAC", lambda: decode_token(keyring, ufrag, now)),
        ("derived ICE password", lambda: derive_password(keyring, ufrag)),
        ("tunnel frame encode (msgspec, 140 B)", lambda: encode_frame(frame)),
        ("tunnel frame decode (msgspec, 140 B)", lambda: decode_frame(encoded)),
        ("fixed data header (hit path form)", lambda: data_header(123456789, b"\x7f\x00\x00\x01", 50000, 140)),
        ("miss path: full authentication → Learn", lambda: authenticate(request, view, auth, now)),
        ("miss path: decide() on RTP junk → Drop", lambda: decide(b"\x80" + payload, source, view, auth, now)),
    ]
    assert decode_frame(header + payload) == frame
    reference = None
    print(f"{'operation':48} {'ns/op':>9} {'× dict hit':>11}")  # noqa: RUF001 - the multiplication sign is meant
    for name, stmt in rows:
        ns = measure(stmt, number, repeat)
        reference = reference or ns
        print(f"{name:48} {ns:9.0f} {ns / reference:11.1f}")


if __name__ == "__main__":
    main()
