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
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.batchio import sockaddr_for
from relay.config import RelayConfig
from relay.decision import AuthPolicy, Learn, authenticate_steps, decide, run_steps
from relay.flows import LocalFlows
from shm.table import FlowTable
from wire.demux import classify
from wire.route_token import RouteKeyring, decode_token, derive_password, issue_token
from wire.stun import build_binding_request, parse, parse_binding_request
from wire.tunnel_frame import Data, data_header, decode_frame, encode_frame


class EmptyView:
    """No flows, no sessions, nothing closed or gone: the decision's own cost, no table's."""

    def find(self, source):
        return None

    def session_known(self, ufrag):
        return False

    def session_closed(self, ufrag, now):
        return False

    def transceiver_gone(self, ip, port, issued_at):
        return False

    def hops_unavailable(self):
        return frozenset()


PUBLIC = (socket.inet_aton("127.0.0.1"), 3478)
NEW_SESSIONS = 2_000
TABLE_FLOWS = 50_000


def new_session_parts(keyring: RouteKeyring, now: float, count: int, held: int) -> list[tuple[str, float]]:
    """µs per new session, by part, each with a token and source never seen before, against a
    real flow table holding ``held`` flows: what a worker pays per session learned
    (caches cold for the token, the table's probe misses) that the rows above (one token
    again and again) do not show."""
    with tempfile.TemporaryDirectory() as directory:
        config = RelayConfig(name="core", workers=1, table_dir=directory, flow_capacity=1 << 17,
                             session_capacity=1 << 17, idle_timeout=30.0)
        table = FlowTable.create(config.table_path, partitions=1, flow_capacity=1 << 17, session_capacity=1 << 17)
        flows = LocalFlows(config, 0, socket.AF_INET, [PUBLIC])
        flows.take_over(now=now)
        try:
            target = (socket.inet_aton("127.0.0.2"), 40000)
            for n in range(held):
                source = (bytes([10, n >> 16, (n >> 8) & 255, n & 255]), 5000)
                flows.learn(sockaddr_for(*source), source, 0, Learn(f"held{n:07d}", *target, 1), now)
            auth = AuthPolicy(keyring)
            requests = []
            for n in range(count):
                ufrag = issue_token(keyring, target[0], target[1], now)
                password = derive_password(keyring, ufrag).encode()
                requests.append((build_binding_request(os.urandom(12), f"{ufrag}:abcd", password, priority=1,
                                                       controlling=True, tie_breaker=n, use_candidate=True),
                                 (bytes([11, n >> 16, (n >> 8) & 255, n & 255]), 6000)))
            spent = {"decide (all checks, shm reads)": 0.0, "learn (shm insert, local dicts)": 0.0}
            for request, source in requests:
                t0 = time.perf_counter()
                decision = decide(request, source, flows.views[0], auth, now)
                t1 = time.perf_counter()
                assert isinstance(decision, Learn), decision
                entry, refusal = flows.learn(sockaddr_for(*source), source, 0, decision, now)
                t2 = time.perf_counter()
                assert entry is not None, refusal
                spent["decide (all checks, shm reads)"] += t1 - t0
                spent["learn (shm insert, local dicts)"] += t2 - t1
        finally:
            flows.close()
            table.close()
    return [(part, seconds / count * 1e6) for part, seconds in spent.items()]


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
        ("miss path: full authentication → Learn", lambda: run_steps(authenticate_steps(request, view, auth, now))),
        ("miss path: decide() on RTP junk → Drop", lambda: decide(b"\x80" + payload, source, view, auth, now)),
    ]
    assert decode_frame(header + payload) == frame
    reference = None
    print(f"{'operation':48} {'ns/op':>9} {'× dict hit':>11}")  # noqa: RUF001 - the multiplication sign is meant
    for name, stmt in rows:
        ns = measure(stmt, number, repeat)
        reference = reference or ns
        print(f"{name:48} {ns:9.0f} {ns / reference:11.1f}")
    count, held = (NEW_SESSIONS // 10, TABLE_FLOWS // 10) if args.quick else (NEW_SESSIONS, TABLE_FLOWS)
    print(f"\nnew session, fresh token and source each ({count:,}), table of {held:,} flows:")
    for part, us in new_session_parts(keyring, now, count, held):
        print(f"{part:48} {us * 1e3:9.0f} {us * 1e3 / reference:11.1f}")


if __name__ == "__main__":
    main()
