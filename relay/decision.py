"""What the relay does with a client datagram it has no local flow for. Sans-IO.

The worker's hit path is a dict lookup by source address; only a miss comes here. The answer
is one of three small records:

- :class:`Forward`: the source already has a flow (found by the view, e.g. in another
  worker's partition after a restart or a reuseport rehash): adopt it and forward.
- :class:`Learn`: an authenticated STUN Binding Request with a valid route token: create the
  flow for this source, then forward the request to ``target``.
- :class:`Drop`: anything else, with a reason the worker counts.

A flow is created only after all of these held, in this order (cheapest first, so junk costs
little): RFC 7983 says STUN; the header and attributes parse; it is a Binding Request with
USERNAME and MESSAGE-INTEGRITY; the server ufrag (USERNAME before ':') is a route token whose
MAC verifies with a known key, for this cluster, not expired (unless its session is already
known: a NAT rebinding mid-call must still get through); MESSAGE-INTEGRITY verifies with the
password derived from that ufrag; FINGERPRINT, when present, verifies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from wire.demux import PacketKind, classify
from wire.route_token import TOKEN_ERROR_REASONS, RouteKeyring, TokenError, check_age, decode_token
from wire.stun import STUN_ERROR_REASONS, StunError, parse_binding_request

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
            "stun_bad_username",
        }
    )
    | STUN_ERROR_REASONS
    | TOKEN_ERROR_REASONS
)


class FlowView(Protocol[FlowT_co]):
    """What the decision needs to know of existing state (the shm table, read-only)."""

    def find(self, source: tuple[bytes, int]) -> FlowT_co | None:
        """The flow of this client address (packed IP, port), in any partition, or None."""

    def session_known(self, ufrag: str) -> bool:
        """True when the table already holds a session for this server ufrag."""


@dataclass(frozen=True, slots=True)
class Forward(Generic[FlowT]):
    flow: FlowT


@dataclass(frozen=True, slots=True)
class Learn:
    ufrag: str
    target_ip: bytes
    target_port: int
    key_id: int


@dataclass(frozen=True, slots=True)
class Drop:
    reason: str


Decision = Forward[FlowT] | Learn | Drop


@dataclass(frozen=True, slots=True)
class AuthPolicy:
    """The relay's side of authentication: its keys, its cluster, how old a new token may be."""

    keyring: RouteKeyring
    token_max_age: float = 300.0
    cluster: int | None = None


def screen(datagram: bytes) -> Drop | None:
    """The part of :func:`decide` that needs no state and costs ~0.1 µs: a worker drops junk
    with it at once instead of queueing it behind real misses."""
    if not datagram:
        return Drop("empty")
    if classify(datagram) is PacketKind.OTHER:
        return Drop("not_webrtc")
    return None


def decide(datagram: bytes, source: tuple[bytes, int], flows: FlowView[FlowT], auth: AuthPolicy, now: float) -> Decision[FlowT]:
    """Decide for a datagram from ``source`` (packed IP, port) that missed the local flow dict."""
    junk = screen(datagram)
    if junk is not None:
        return junk
    known = flows.find(source)
    if known is not None:
        return Forward(known)
    if classify(datagram) is not PacketKind.STUN:
        return Drop("unknown_flow")
    return authenticate(datagram, flows, auth, now)


def authenticate(datagram: bytes, flows: FlowView[object], auth: AuthPolicy, now: float) -> Learn | Drop:
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
    try:
        token = decode_token(auth.keyring, server_ufrag, now, max_age=None, cluster=auth.cluster)
        # Only a signed token reaches the table (junk ufrags must not fill its caches); a
        # session the relay already knows (NAT rebinding mid-call) is not age-checked.
        if not flows.session_known(server_ufrag):
            check_age(token, now, auth.token_max_age)
    except TokenError as exc:
        return Drop(exc.reason)
    password = auth.keyring.password(token.key_id, server_ufrag)
    assert password is not None  # decode_token checked the key id
    if not message.verify_integrity(password.encode("ascii")):
        return Drop("stun_bad_integrity")
    if message.has_fingerprint and not message.verify_fingerprint():
        return Drop("stun_bad_fingerprint")
    return Learn(server_ufrag, token.target_ip, token.target_port, token.key_id)
