"""The relay's decision for a datagram with no local flow: plain bytes, no sockets."""
from __future__ import annotations

import os
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.check_changes import LIMIT as CHECK_CHANGES_LIMIT
from relay.check_changes import CheckChanges
from relay.cluster_routes import ClusterRoutes, parse_cluster_routes
from relay.decision import (
    DECISION_DROP_REASONS,
    Answer,
    AuthPolicy,
    Drop,
    Forward,
    Learn,
    closed_until,
    decide,
    decide_steps,
    decide_then_learn_steps,
)
from wire.route_token import RouteKeyring, derive_password, issue_token
from wire.stun import (
    ATTR_USERNAME,
    BINDING_REQUEST,
    build_binding_request,
    build_binding_success,
    build_message,
    parse,
)

NOW = 1_800_000_000.0
KEYRING = RouteKeyring({1: b"r" * 32}, 1)
AUTH = AuthPolicy(KEYRING, token_max_age=300.0, cluster=None)
TARGET = (socket.inet_aton("127.0.0.9"), 7100)
CLIENT = (socket.inet_aton("127.0.0.2"), 50000)


class TableView:
    """A dict standing in for the shm table: the decision only reads through this protocol."""

    def __init__(self, flows: dict | None = None, sessions: set[str] | None = None,
                 closed: set[str] | None = None, gone: set[tuple[bytes, int]] | None = None) -> None:
        self.flows = flows or {}
        self.sessions = sessions or set()
        self.closed = closed or set()
        self.gone = gone or set()
        self.gone_hops: set[tuple[str, int]] = set()

    def find(self, source):
        return self.flows.get(source)

    def session_known(self, ufrag: str) -> bool:
        return ufrag in self.sessions

    def session_closed(self, ufrag: str, now: float) -> bool:
        return ufrag in self.closed

    def transceiver_gone(self, target_ip: bytes, target_port: int, issued_at: int) -> bool:
        return (target_ip, target_port) in self.gone and issued_at <= NOW + 5  # gone at NOW + 5

    def hops_unavailable(self) -> frozenset[tuple[str, int]]:
        return frozenset(self.gone_hops)


def ufrag(now: float = NOW, keyring: RouteKeyring = KEYRING, cluster: int | None = None) -> str:
    return issue_token(keyring, *TARGET, now, cluster=cluster)


def binding_request(server_ufrag: str, password: str | None = None, *, fingerprint: bool = True, username: str | None = None) -> bytes:
    password = password if password is not None else derive_password(KEYRING, server_ufrag)
    return build_binding_request(
        os.urandom(12),
        username if username is not None else f"{server_ufrag}:cli1",
        password.encode(),
        priority=1853824767,
        controlling=True,
        tie_breaker=0x1234,
        use_candidate=True,
        fingerprint=fingerprint,
    )


def test_valid_binding_request_learns_the_flow() -> None:
    u = ufrag()
    decision = decide(binding_request(u), CLIENT, TableView(), AUTH, NOW + 1)
    assert decision == Learn(u, TARGET[0], TARGET[1], 1)


class CountingView(TableView):
    """Which table reads happened, in order (to see where the steps' yields fall)."""

    def __init__(self, log: list[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.log = log

    def find(self, source):
        self.log.append("find")
        return super().find(source)

    def session_known(self, ufrag: str) -> bool:
        self.log.append("session_known")
        return super().session_known(ufrag)

    def session_closed(self, ufrag: str, now: float) -> bool:
        self.log.append("session_closed")
        return super().session_closed(ufrag, now)


def run_logged(steps, log: list[str]):
    """Drive decide_steps, logging each yield: (the decision, the log)."""
    try:
        while True:
            next(steps)
            log.append("yield")
    except StopIteration as done:
        return done.value, log


@pytest.mark.parametrize("closed", [False, True], ids=["learn", "closed"])
def test_decide_in_steps_yields_between_its_costly_parts_and_decides_as_decide(closed: bool) -> None:
    """A worker serves established flows between the steps of a new session's checks: the
    table reads and the crypto fall in different steps, and the decision is decide's."""
    u = ufrag()
    request = binding_request(u)
    view = CountingView([], closed={u} if closed else None)
    decision, log = run_logged(decide_steps(request, CLIENT, view, AUTH, NOW + 1), view.log)
    assert decision == decide(request, CLIENT, TableView(closed={u} if closed else None), AUTH, NOW + 1)
    # (a young token: no session_known read, that is only for a token too old for a new session)
    assert log == ["find", "yield", "yield", "yield", "yield", "session_closed"]
    assert decision == (Drop("session_closed") if closed else Learn(u, TARGET[0], TARGET[1], 1))


def packed_destination(ip: bytes, port: int) -> bytes:
    return ip + port.to_bytes(2, "big")


@pytest.mark.parametrize("happens", ["nothing", "closed here", "gone here", "closed elsewhere",
                                     "another closed here", "another gone here", "log overrun"])
def test_learning_is_a_step_of_its_own_and_a_close_meanwhile_checks_again(happens: str) -> None:
    """The closed-session read ends the checks' last step; the learning gets the next one. A
    session this worker recorded closed (or its transceiver marked gone) in between makes the
    session's check run again; another session's close or another transceiver gone does not
    (nor another worker's close: a shm write the next check reads, as before the split); a
    log that no longer reaches back to the check cannot tell, and checks again."""
    u = ufrag()
    log: list[str] = []
    view = CountingView(log)
    changes = CheckChanges(packed_destination)
    other_ip = socket.inet_aton("127.0.0.10")
    steps = decide_then_learn_steps(binding_request(u), CLIENT, view, AUTH, lambda: NOW + 1, None, changes)
    yields = 0
    try:
        while True:
            next(steps)
            yields += 1
            log.append("yield")
            if log[-2:] == ["session_closed", "yield"] and yields == 5:  # before learning
                if happens == "gone here":
                    view.gone.add(TARGET)
                    changes.gone(packed_destination(*TARGET))
                elif happens in ("closed here", "closed elsewhere"):
                    view.closed.add(u)
                    if happens == "closed here":
                        changes.closed(u)
                elif happens == "another closed here":
                    changes.closed(ufrag(NOW - 1))
                elif happens == "another gone here":
                    changes.gone(packed_destination(other_ip, TARGET[1]))
                elif happens == "log overrun":
                    for i in range(CHECK_CHANGES_LIMIT + 1):
                        changes.gone(packed_destination(other_ip, i))
    except StopIteration as done:
        decision = done.value
    first = ["find", "yield", "yield", "yield", "yield", "session_closed", "yield"]
    if happens in ("closed here", "gone here"):
        assert log[:len(first)] == first and log[len(first):] == first[:-1]  # checked again, all of it
        assert decision == Drop("session_closed") if happens == "closed here" else decision.reason == "transceiver_gone"
    elif happens == "log overrun":  # checked again, and learned a step later
        assert log == first + first and decision == Learn(u, TARGET[0], TARGET[1], 1)
    else:
        assert decision == Learn(u, TARGET[0], TARGET[1], 1) and log == first


def test_a_learned_flows_destination_is_its_transceiver_or_its_hop() -> None:
    learn = Learn("u", TARGET[0], TARGET[1], 1)
    assert learn.destination == TARGET
    hop = Learn("u", TARGET[0], TARGET[1], 1, hop=("127.0.0.77", 7300), hops=1)
    assert hop.destination == (socket.inet_aton("127.0.0.77"), 7300)
    changes = CheckChanges(packed_destination)
    mark = changes.mark()
    changes.gone(packed_destination(*hop.destination))  # a cluster relay gone: its hop sessions are stale
    assert changes.stale(mark, hop.ufrag, hop.destination) and not changes.stale(mark, learn.ufrag, learn.destination)
    assert not changes.stale(changes.mark(), "u", TARGET)


def test_junk_and_known_flows_are_decided_without_a_step() -> None:
    """What costs ~1 µs takes no step: junk, and a 5-tuple another worker holds."""
    view = CountingView([], flows={CLIENT: "flow-1"})
    assert run_logged(decide_steps(b"", CLIENT, view, AUTH, NOW), [])[0] == Drop("empty")
    decision, log = run_logged(decide_steps(binding_request(ufrag()), CLIENT, view, AUTH, NOW), view.log)
    assert decision == Forward("flow-1") and "yield" not in log


def test_without_fingerprint_is_refused() -> None:
    # RFC 8445 section 7.3: checks carry FINGERPRINT. Without the rule, a captured request whose
    # FINGERPRINT type was altered still verified (issue #17) and opened flows.
    u = ufrag()
    assert decide(binding_request(u, fingerprint=False), CLIENT, TableView(), AUTH, NOW) == Drop("stun_no_fingerprint")


def test_a_closed_session_opens_no_flow_even_with_a_fresh_signed_check() -> None:
    u = ufrag()
    assert decide(binding_request(u), CLIENT, TableView(closed={u}), AUTH, NOW + 1) == Drop("session_closed")
    # forged or unsigned checks are refused for what they are, before the shm read
    bad = binding_request(u, password="x" * 22)
    assert decide(bad, CLIENT, TableView(closed={u}), AUTH, NOW + 1) == Drop("stun_bad_integrity")


def test_a_check_for_a_gone_transceiver_is_answered_with_a_signed_error() -> None:
    u = ufrag()
    request = binding_request(u)
    decision = decide(request, CLIENT, TableView(gone={TARGET}), AUTH, NOW + 1)
    assert isinstance(decision, Answer) and decision.reason == "transceiver_gone"
    msg = parse(decision.datagram)
    assert msg.msg_type == 0x0111 and msg.transaction_id == parse(request).transaction_id
    assert msg.verify_integrity(derive_password(KEYRING, u).encode()) and msg.verify_fingerprint()
    assert msg.get(0x0009) == b"\x00\x00\x04\x03transceiver gone"
    # only signed checks are answered: a forged one is just dropped
    forged = binding_request(u, password="y" * 22)
    assert decide(forged, CLIENT, TableView(gone={TARGET}), AUTH, NOW + 1) == Drop("stun_bad_integrity")
    # A token issued after it went away: a new process at the same address, learned as usual.
    later = ufrag(NOW + 10)
    assert isinstance(decide(binding_request(later), CLIENT, TableView(gone={TARGET}), AUTH, NOW + 11), Learn)


def test_closed_until_only_for_the_sessions_own_transceiver() -> None:
    u = ufrag()
    until = closed_until(u, TARGET, AUTH, NOW + 10)
    assert until is not None and NOW + AUTH.token_max_age <= until <= NOW + AUTH.token_max_age + 2
    v4_mapped = (b"\x00" * 10 + b"\xff\xff" + TARGET[0], TARGET[1])  # a dual-stack tunnel socket's view
    assert closed_until(u, v4_mapped, AUTH, NOW + 10) == until
    assert closed_until(u, (TARGET[0], TARGET[1] + 1), AUTH, NOW + 10) is None  # another transceiver
    assert closed_until(u, TARGET, AUTH, NOW + AUTH.token_max_age + 5) is None  # too old to be learned anyway
    assert closed_until("not-a-token", TARGET, AUTH, NOW) is None


def test_known_source_forwards_anything_webrtc() -> None:
    view = TableView({CLIENT: "flow-1"})
    for datagram in (b"\x16\xfe\xfd" + bytes(20), b"\x80" + bytes(20), binding_request(ufrag())):
        assert decide(datagram, CLIENT, view, AUTH, NOW) == Forward("flow-1")


@pytest.mark.parametrize(
    "datagram, reason",
    [
        (b"", "empty"),
        (b"\x40junk", "not_webrtc"),
        (b"\xffjunk", "not_webrtc"),
        (b"\x16\xfe\xfd" + bytes(40), "unknown_flow"),  # DTLS from an unknown source
        (b"\x80\x00" + bytes(40), "unknown_flow"),  # RTP from an unknown source
        (b"\x00\x01\x00", "stun_too_short"),
        (b"\x00\x01\x00\x00" + b"\x00" * 16, "stun_bad_cookie"),
    ],
)
def test_junk_is_dropped_with_reason(datagram: bytes, reason: str) -> None:
    assert decide(datagram, CLIENT, TableView(), AUTH, NOW) == Drop(reason)


def test_stun_response_from_unknown_source_is_unknown_flow() -> None:
    response = build_binding_success(os.urandom(12), ("127.0.0.2", 50000), b"k")
    assert decide(response, CLIENT, TableView(), AUTH, NOW) == Drop("unknown_flow")


def test_missing_username_and_integrity() -> None:
    no_username = build_message(BINDING_REQUEST, os.urandom(12), [], integrity_key=b"k")
    assert decide(no_username, CLIENT, TableView(), AUTH, NOW) == Drop("stun_no_username")
    no_integrity = build_message(BINDING_REQUEST, os.urandom(12), [(ATTR_USERNAME, f"{ufrag()}:c".encode())])
    assert decide(no_integrity, CLIENT, TableView(), AUTH, NOW) == Drop("stun_no_integrity")


def test_username_without_colon() -> None:
    u = ufrag()
    assert decide(binding_request(u, username=u), CLIENT, TableView(), AUTH, NOW) == Drop("stun_bad_username")
    assert decide(binding_request(u, username=":x"), CLIENT, TableView(), AUTH, NOW) == Drop("stun_bad_username")


def test_truncated_attributes() -> None:
    valid = binding_request(ufrag())
    truncated = bytearray(valid[:40])
    truncated[2:4] = (len(truncated) - 20).to_bytes(2, "big")
    decision = decide(bytes(truncated), CLIENT, TableView(), AUTH, NOW)
    assert isinstance(decision, Drop) and decision.reason in {"stun_attr_truncated", "stun_bad_length"}


def test_forged_token() -> None:
    forged = issue_token(RouteKeyring({1: b"attacker-secret!!"}, 1), *TARGET, NOW)
    request = binding_request(forged, password="x" * 22)
    assert decide(request, CLIENT, TableView(), AUTH, NOW) == Drop("token_bad_mac")


def test_not_a_token() -> None:
    assert decide(binding_request("abcd", password="x" * 22), CLIENT, TableView(), AUTH, NOW) == Drop("token_bad_length")


def test_valid_token_wrong_integrity() -> None:
    u = ufrag()
    assert decide(binding_request(u, password="wrong-password-000000"), CLIENT, TableView(), AUTH, NOW) == Drop("stun_bad_integrity")


def test_tampered_after_signing_fails_integrity() -> None:
    request = bytearray(binding_request(ufrag(), fingerprint=False))
    request[30] ^= 0x01  # a ufrag char: the token MAC or the charset check must catch it
    decision = decide(bytes(request), CLIENT, TableView(), AUTH, NOW)
    assert isinstance(decision, Drop) and decision.reason.startswith("token_")


def test_bad_fingerprint() -> None:
    request = bytearray(binding_request(ufrag()))
    request[-1] ^= 0xFF
    assert decide(bytes(request), CLIENT, TableView(), AUTH, NOW) == Drop("stun_bad_fingerprint")


def test_expired_token_unless_session_known() -> None:
    u = ufrag(now=NOW - 1000)
    request = binding_request(u)
    assert decide(request, CLIENT, TableView(), AUTH, NOW) == Drop("token_expired")
    # NAT rebinding of a live call: the session is in the table, so age does not matter.
    assert isinstance(decide(request, CLIENT, TableView(sessions={u}), AUTH, NOW), Learn)


def test_unknown_key_id() -> None:
    other = RouteKeyring({9: b"r" * 32}, 9)
    u = issue_token(other, *TARGET, NOW)
    assert decide(binding_request(u, derive_password(other, u)), CLIENT, TableView(), AUTH, NOW) == Drop("token_unknown_key")


EDGE_ROUTES = ClusterRoutes(parse_cluster_routes({"5": ["10.5.0.1:3479", "10.5.0.2:3479"]}))
EDGE = AuthPolicy(KEYRING, cluster=1, routes=EDGE_ROUTES, hop_limit=2)


def test_an_edge_forwards_another_clusters_session_to_a_relay_of_it() -> None:
    u = ufrag(cluster=5)
    decision = decide(binding_request(u), CLIENT, TableView(), EDGE, NOW)
    assert isinstance(decision, Learn) and decision.hop == EDGE_ROUTES.choose(5, u) and decision.hops == 0
    assert (decision.target_ip, decision.target_port) == TARGET  # the transceiver, for the cluster relay
    # Its own cluster's session, or a token without a cluster: its own transceivers.
    for own in (ufrag(cluster=1), ufrag()):
        assert decide(binding_request(own), CLIENT, TableView(), EDGE, NOW) == Learn(own, TARGET[0], TARGET[1], 1)


def test_an_edge_skips_cluster_relays_that_went_away() -> None:
    u = ufrag(cluster=5)
    first = EDGE_ROUTES.choose(5, u)
    view = TableView()
    view.gone_hops = {first}
    decision = decide(binding_request(u), CLIENT, view, EDGE, NOW)
    assert isinstance(decision, Learn) and decision.hop not in (None, first)
    view.gone_hops = set(EDGE_ROUTES.addresses(5))
    assert decide(binding_request(u), CLIENT, view, EDGE, NOW) == Drop("cluster_no_route")


def test_no_route_and_no_hop_left_are_dropped_and_named() -> None:
    assert decide(binding_request(ufrag(cluster=9)), CLIENT, TableView(), EDGE, NOW) == Drop("cluster_no_route")
    u = ufrag(cluster=5)
    # A frame an edge forwarded with no hop left: never forwarded again (routes cannot loop).
    assert decide(binding_request(u), CLIENT, TableView(), EDGE, NOW, hops_left=0) == Drop("hop_limit")
    three = AuthPolicy(KEYRING, cluster=1, routes=EDGE_ROUTES, hop_limit=3)
    decision = decide(binding_request(u), CLIENT, TableView(), three, NOW, hops_left=2)
    assert isinstance(decision, Learn) and decision.hops == 1
    # The checks come first: a forged request for another cluster is not forwarded anywhere.
    assert decide(binding_request(u, "wrong-password"), CLIENT, TableView(), EDGE, NOW) == Drop("stun_bad_integrity")


def test_token_for_another_cluster() -> None:
    u = ufrag(cluster=5)
    request = binding_request(u)
    assert decide(request, CLIENT, TableView(), AuthPolicy(KEYRING, cluster=6), NOW) == Drop("token_wrong_cluster")
    assert isinstance(decide(request, CLIENT, TableView(), AuthPolicy(KEYRING, cluster=5), NOW), Learn)


def test_replay_from_another_source_is_a_new_flow_of_the_same_session() -> None:
    # The relay cannot tell a replay from a NAT rebinding; it stays bounded by the per-session
    # flow cap in the table, and the attacker only reaches the session's own transceiver.
    u = ufrag()
    request = binding_request(u)
    other_source = (socket.inet_aton("127.0.0.3"), 40000)
    assert decide(request, other_source, TableView(), AUTH, NOW) == Learn(u, TARGET[0], TARGET[1], 1)


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_learn_and_never_raise(datagram: bytes) -> None:
    decision = decide(datagram, CLIENT, TableView(), AUTH, NOW)
    assert isinstance(decision, Drop) and decision.reason in DECISION_DROP_REASONS


@settings(max_examples=1500, deadline=None)
@given(st.data())
def test_mutations_of_a_valid_request_never_learn(data: st.DataObject) -> None:
    # Every byte up to the end of MESSAGE-INTEGRITY is covered by the HMAC. The 8 FINGERPRINT
    # bytes after it are not: a flipped type byte there makes an unknown optional attribute
    # that RFC 8489 says to ignore, which is not a forgery (the signed part is intact).
    valid = bytearray(binding_request(ufrag()))
    index = data.draw(st.integers(0, len(valid) - 9))
    flip = data.draw(st.integers(1, 255))
    valid[index] ^= flip
    decision = decide(bytes(valid), CLIENT, TableView(), AUTH, NOW)
    assert isinstance(decision, Drop), (index, flip)
    assert decision.reason in DECISION_DROP_REASONS


def test_every_decision_drop_reason_is_named() -> None:
    assert all(r.replace("_", "").isalnum() and r.islower() for r in DECISION_DROP_REASONS)
