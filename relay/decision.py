"""What the relay does with a client datagram it has no local flow for. Sans-IO.

The worker's hit path is a dict lookup by source address; only a miss comes here. The answer
is one of three small records:

- :class:`Forward`: the source already has a flow (found by the view, e.g. in another
  worker's partition after a restart or a reuseport rehash): adopt it and forward.
- :class:`Learn`: an authenticated STUN Binding Request with a valid route token: create the
  flow for this source, then forward the request to ``target`` (or, for a session of another
  cluster on an edge relay, to ``hop``: a relay of that cluster).
- :class:`Drop`: anything else, with a reason the worker counts.
- :class:`Answer`: a check that passed every test, for a session whose transceiver is gone
  (it stopped heartbeating): the relay answers it itself with a signed Binding error (403),
  so the client's ICE gives the pair up at once (libwebrtc kills a connection on an error
  response to its check) instead of after its consent timeout, and the client can call
  again, through a live transceiver. Counted as ``transceiver_gone``.

A flow is created only after all of these held, in this order (cheapest first, so junk costs
little): RFC 7983 says STUN; the header and attributes parse; it is a Binding Request with
USERNAME and MESSAGE-INTEGRITY; the server ufrag (USERNAME before ':') is a route token whose
MAC verifies with a known key, for this cluster, not expired (unless its session is already
known: a NAT rebinding mid-call must still get through); MESSAGE-INTEGRITY verifies with the
password derived from that ufrag; FINGERPRINT, when present, verifies.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from relay.cluster_routes import ClusterRoutes
from shm.layout import ip16
from wire.demux import PacketKind, classify
from wire.route_token import TOKEN_ERROR_REASONS, RouteKeyring, RouteToken, TokenError, check_age, decode_token
from wire.stun import STUN_ERROR_REASONS, StunError, build_binding_error, parse_binding_request

FlowT = TypeVar("FlowT")
FlowT_co = TypeVar("FlowT_co", covariant=True)

DECISION_DROP_REASONS = (
    frozenset(
        {
            "empty",
            "not_webrtc",  # first byte outside STUN/DTLS/RTP ranges
            "unknown_flow",  # DTLS/RTP/RTCP or STUN response from a source with no flow
            "stun_bad_integrity",
            "stun_bad_fingerprint",
            "stun_no_fingerprint",  # RFC 8445 section 7.3: a connectivity check carries FINGERPRINT
            "stun_bad_username",
            "session_closed",  # the session ended (DELETE, hang-up, ICE restart): no flow again
            "transceiver_gone",  # the session's transceiver stopped: answered with a Binding error
            "cluster_no_route",  # an edge relay has no route to the token's cluster
            "hop_limit",  # a frame from an edge relay with no hop left, for another cluster
        }
    )
    | STUN_ERROR_REASONS
    | TOKEN_ERROR_REASONS
)


class CheckWatch(Protocol):
    """What this worker changed that could make a passed check stale (relay/check_changes.py)."""

    def mark(self) -> int:
        """Where the changes stand now."""

    def stale(self, since: int, ufrag: str, target: tuple[bytes, int]) -> bool:
        """True when a change after ``since`` names session ``ufrag`` or its flow's ``target``."""


class FlowView(Protocol[FlowT_co]):
    """What the decision needs to know of existing state (the shm table, read-only)."""

    def find(self, source: tuple[bytes, int]) -> FlowT_co | None:
        """The flow of this client address (packed IP, port), in any partition, or None."""

    def session_known(self, ufrag: str) -> bool:
        """True when the table already holds a session for this server ufrag."""

    def session_closed(self, ufrag: str, now: float) -> bool:
        """True when this server ufrag's session ended and its token is still young enough."""

    def transceiver_gone(self, target_ip: bytes, target_port: int, issued_at: int) -> bool:
        """True when the transceiver at this tunnel address went away after it issued a token
        at ``issued_at`` (unix s): a process started since at that address is another one."""

    def hops_unavailable(self) -> frozenset[tuple[str, int]]:
        """Cluster relays (hop addresses) that stopped answering: no new session goes there."""


@dataclass(frozen=True, slots=True)
class Forward(Generic[FlowT]):
    flow: FlowT


@dataclass(frozen=True, slots=True)
class Learn:
    ufrag: str
    target_ip: bytes
    target_port: int
    key_id: int
    #: a session of another cluster: the relay of that cluster to forward it to (ip text,
    #: port), with ``hops`` left in the HopData frames; None: the token's transceiver is ours
    hop: tuple[str, int] | None = None
    hops: int = 0

    @property
    def destination(self) -> tuple[bytes, int]:
        """Where the flow's datagrams go (packed IP, port): the token's transceiver, or (another
        cluster's session on an edge) the cluster relay chosen for it."""
        if self.hop is None:
            return self.target_ip, self.target_port
        return ipaddress.ip_address(self.hop[0]).packed, self.hop[1]


@dataclass(frozen=True, slots=True)
class Drop:
    reason: str


@dataclass(frozen=True, slots=True)
class Answer:
    """Send ``datagram`` back to the source (and count ``reason``); learn nothing."""

    datagram: bytes
    reason: str


Decision = Forward[FlowT] | Learn | Drop | Answer

GONE_CODE = 403  # Forbidden: "the request was valid but cannot be performed"
GONE_REASON = "transceiver gone"


@dataclass(frozen=True, slots=True)
class AuthPolicy:
    """The relay's side of authentication: its keys, its cluster, how old a new token may be,
    and (an edge relay) the routes to other clusters and the hops a session may cross."""

    keyring: RouteKeyring
    token_max_age: float = 300.0
    cluster: int | None = None
    routes: ClusterRoutes | None = None
    hop_limit: int = 2


def screen(datagram: bytes) -> Drop | None:
    """The part of :func:`decide` that needs no state and costs ~0.1 µs: a worker drops junk
    with it at once instead of queueing it behind real misses."""
    if not datagram:
        return Drop("empty")
    if classify(datagram) is PacketKind.OTHER:
        return Drop("not_webrtc")
    return None


def decide(datagram: bytes, source: tuple[bytes, int], flows: FlowView[FlowT], auth: AuthPolicy,
           now: float, hops_left: int | None = None) -> Decision[FlowT]:
    """Decide for a datagram from ``source`` (packed IP, port) that missed the local flow dict.
    ``hops_left``: a datagram an edge relay forwarded (HopData), with the hops it has left;
    None: straight from a client (``auth.hop_limit`` - 1 left after this relay)."""
    return run_steps(decide_steps(datagram, source, flows, auth, now, hops_left))


def decide_steps(datagram: bytes, source: tuple[bytes, int], flows: FlowView[FlowT], auth: AuthPolicy,
                 now: float, hops_left: int | None = None) -> Generator[None, None, Decision[FlowT]]:
    """:func:`decide` in steps: it yields between its costly parts (measured in a worker at
    2,000 new sessions/s: the table lookup ~20 µs, the STUN parse ~17, the token ~35, the
    password and integrity ~27, the closed-session read ~25; the learning after it, ~55, is a
    step of its own: :func:`decide_then_learn_steps`) and returns the decision. A worker
    serves its established flows' datagrams at each yield, so they never wait behind a whole
    check."""
    junk = screen(datagram)
    if junk is not None:
        return junk
    known = flows.find(source)
    if known is not None:
        return Forward(known)
    if classify(datagram) is not PacketKind.STUN:
        return Drop("unknown_flow")
    yield
    return (yield from authenticate_steps(datagram, flows, auth, now,
                                          auth.hop_limit - 1 if hops_left is None else hops_left))


def decide_then_learn_steps(datagram: bytes, source: tuple[bytes, int], flows: FlowView[FlowT], auth: AuthPolicy,
                            clock: Callable[[], float], hops_left: int | None, changes: CheckWatch,
                            ) -> Generator[None, None, Decision[FlowT]]:
    """:func:`decide_steps`, and one step more before the caller learns a Learn: the checks
    end with the closed-session read and the learning costs ~55 µs, ~85 µs in one step (the
    longest of a new session's: what an established datagram waits behind under churn). If
    this worker meanwhile recorded the session closed or its transceiver (or hop) gone,
    ``changes`` says so and the session is checked again."""
    while True:
        seen = changes.mark()
        decision = yield from decide_steps(datagram, source, flows, auth, clock(), hops_left)
        if not isinstance(decision, Learn):
            return decision
        yield
        if not changes.stale(seen, decision.ufrag, decision.destination):
            return decision


T = TypeVar("T")


def run_steps(steps: Generator[None, None, T]) -> T:
    """Run a generator of steps to its end: what it returns."""
    try:
        while True:
            next(steps)
    except StopIteration as done:
        return done.value


def authenticate_steps(datagram: bytes, flows: FlowView[object], auth: AuthPolicy, now: float,
                       hops_left: int = 0) -> Generator[None, None, Learn | Drop | Answer]:
    """Check a STUN datagram from an unknown source; Learn only when every check held."""
    try:
        message = parse_binding_request(datagram)
        username = message.username
    except StunError as exc:
        # A STUN response or indication from an unknown source is not ours to learn from.
        return Drop("unknown_flow" if exc.reason == "stun_not_request" else exc.reason)
    assert username is not None  # parse_binding_request guarantees USERNAME
    server_ufrag, colon, _client_ufrag = username.partition(":")
    if not colon or not server_ufrag:
        return Drop("stun_bad_username")
    yield
    try:
        token = decode_token(auth.keyring, server_ufrag, now, max_age=None, cluster=auth.cluster,
                             any_cluster=auth.routes is not None)
    except TokenError as exc:
        return Drop(exc.reason)
    yield
    # A session the relay already knows (NAT rebinding mid-call) is not age-checked: only a
    # token too old for a new session costs the shm read (and only a signed token reaches the
    # table: junk ufrags must not fill its caches).
    try:
        check_age(token, now, auth.token_max_age)
    except TokenError as exc:
        if not flows.session_known(server_ufrag):
            return Drop(exc.reason)
    password = auth.keyring.password(token.key_id, server_ufrag)
    assert password is not None  # decode_token checked the key id
    if not message.verify_integrity(password.encode("ascii")):
        return Drop("stun_bad_integrity")
    if not message.has_fingerprint:
        return Drop("stun_no_fingerprint")
    if not message.verify_fingerprint():
        return Drop("stun_bad_fingerprint")
    yield
    # Last: a closed session is a shm read in every partition, paid only by signed checks.
    if flows.session_closed(server_ufrag, now):
        return Drop("session_closed")
    if token.cluster is not None and token.cluster != auth.cluster:  # an edge relay (routes set)
        return _next_hop(server_ufrag, token.cluster, token.key_id, flows, auth, hops_left, token)
    if flows.transceiver_gone(token.target_ip, token.target_port, token.issued_at):
        key = password.encode("ascii")
        return Answer(build_binding_error(message.transaction_id, GONE_CODE, GONE_REASON, key), "transceiver_gone")
    return Learn(server_ufrag, token.target_ip, token.target_port, token.key_id)


def learn_from_directory(ufrag: str, flows: FlowView[object], auth: AuthPolicy, now: float) -> Learn | Drop:
    """A route directory's entry (relay/directory.py, its MAC already checked) names ``ufrag``
    for a 5-tuple this relay has no flow for: what this relay's own check of that session would
    have learned — the token must be ours (keys, cluster), its session not closed here, its
    transceiver not gone; an edge routes another cluster's session as for a check."""
    try:
        token = decode_token(auth.keyring, ufrag, now, max_age=None, cluster=auth.cluster,
                             any_cluster=auth.routes is not None)
    except TokenError as exc:
        return Drop(exc.reason)
    if flows.session_closed(ufrag, now):
        return Drop("session_closed")
    if token.cluster is not None and token.cluster != auth.cluster:
        return _next_hop(ufrag, token.cluster, token.key_id, flows, auth, auth.hop_limit - 1, token)
    if flows.transceiver_gone(token.target_ip, token.target_port, token.issued_at):
        return Drop("transceiver_gone")
    return Learn(ufrag, token.target_ip, token.target_port, token.key_id)


def _next_hop(ufrag: str, cluster: int, key_id: int, flows: FlowView[object], auth: AuthPolicy, hops_left: int,
              token: RouteToken) -> Learn | Drop:
    """A session of another cluster: the relay of that cluster to forward it to."""
    if hops_left < 1:
        return Drop("hop_limit")
    assert auth.routes is not None
    hop = auth.routes.choose(cluster, ufrag, flows.hops_unavailable())
    if hop is None:
        return Drop("cluster_no_route")
    return Learn(ufrag, token.target_ip, token.target_port, key_id, hop=hop, hops=hops_left - 1)


def sender_token(ufrag: str, sender: tuple[bytes, int], auth: AuthPolicy, now: float) -> RouteToken | None:
    """The route token ``ufrag`` when it is ours and names ``sender`` (the transceiver's packed
    tunnel IP, port): one transceiver must not close or rename another's sessions."""
    try:
        token = decode_token(auth.keyring, ufrag, now, max_age=None, cluster=auth.cluster)
    except TokenError:
        return None
    if (ip16(token.target_ip), token.target_port) != (ip16(sender[0]), sender[1]):
        return None
    return token


def closed_until(ufrag: str, sender: tuple[bytes, int], auth: AuthPolicy, now: float) -> float | None:
    """A ``SessionClosed`` for ``ufrag`` from ``sender``: until when (unix s) the session must
    open no flow again, or None when there is nothing to remember: not the sender's token
    (:func:`sender_token`), or a token already too old to be learned."""
    token = sender_token(ufrag, sender, auth, now)
    if token is None:
        return None
    until = token.issued_at + auth.token_max_age + 1.0  # (+1 s: check_age refuses only past it)
    return until if until > now else None
