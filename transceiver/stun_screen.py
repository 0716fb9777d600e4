"""What a STUN datagram must be before aioice sees it (sans-IO: bytes in, a verdict out).

aioice trusts its input: a correctly signed Binding Request whose PRIORITY has length 0 makes
it raise ``struct.error`` inside the tunnel endpoint, once per datagram, for as long as any
client of a live session cares to send it. So every datagram whose first byte says STUN
(RFC 7983: 0-3) is parsed here first with the project's own parser (wire/stun.py, fuzzed),
and only what passes reaches aioice:

- anything: framing, attribute bounds, and the fixed-size attributes aioice unpacks
  (PRIORITY 4 bytes, ICE-CONTROLLING/-CONTROLLED 8, XOR-MAPPED-ADDRESS);
- a request: a Binding Request, FINGERPRINT present and right (RFC 8445 section 7.3: checks
  carry it), USERNAME ``<our ufrag>:<theirs>``, MESSAGE-INTEGRITY with our password;
- a response: FINGERPRINT right if present (aioice checks its integrity against the
  transaction it sent).

Each refusal has a reason; the caller counts it.
"""

from __future__ import annotations

from dataclasses import dataclass

from wire.stun import StunError, StunMessage, parse

__all__ = ["SCREEN_REASONS", "Screened", "screen"]

SCREEN_REASONS = frozenset(
    {
        "stun_malformed",  # framing or an attribute aioice would choke on (wire.stun's reasons)
        "stun_not_binding",  # a request or indication of another method
        "stun_no_fingerprint",  # a request without FINGERPRINT
        "stun_bad_fingerprint",
        "stun_bad_username",  # USERNAME missing or not for this session's ufrag
        "stun_bad_integrity",  # MESSAGE-INTEGRITY missing or not signed with our password
    }
)

_CLASS_REQUEST = 0
_CLASS_INDICATION = 1
_METHOD_BINDING = 0x001


@dataclass(frozen=True, slots=True)
class Screened:
    """A STUN datagram that may go to aioice; ``request`` when it is a Binding Request."""

    message: StunMessage
    request: bool


def _attributes_ok(msg: StunMessage) -> bool:
    try:
        msg.priority  # noqa: B018 - the accessors are the length checks
        msg.ice_controlling  # noqa: B018
        msg.ice_controlled  # noqa: B018
        msg.xor_mapped_address()
        msg.username  # noqa: B018
    except StunError:
        return False
    return True


def screen(data: bytes, ufrag: str, password: bytes) -> Screened | str:
    """``data`` (first byte 0-3) as :class:`Screened`, or the reason (one of SCREEN_REASONS)."""
    try:
        msg = parse(data)
    except StunError:
        return "stun_malformed"
    if not _attributes_ok(msg):
        return "stun_malformed"
    if msg.method != _METHOD_BINDING:
        return "stun_not_binding"
    if msg.has_fingerprint and not msg.verify_fingerprint():
        return "stun_bad_fingerprint"
    if msg.message_class == _CLASS_INDICATION:
        return Screened(msg, request=False)  # keepalives: aioice ignores them
    if msg.message_class != _CLASS_REQUEST:
        return Screened(msg, request=False)  # responses: aioice matches them to its transactions
    if not msg.has_fingerprint:
        return "stun_no_fingerprint"
    username = msg.username
    if username is None or username.partition(":")[0] != ufrag or ":" not in username:
        return "stun_bad_username"
    if not msg.verify_integrity(password):
        return "stun_bad_integrity"
    return Screened(msg, request=True)
