"""A pipeline's state, handed from a call's old session to its new one through the client.

When a transceiver asks a call to move (drain), it asks the session's pipeline for its state
(``Pipeline.handoff``), seals it and sends it in the ``migrate`` message; the client puts it
in the ``Rtcrelay-Handoff`` header of the offer it makes to another transceiver, which opens
it and gives it to the new session's pipeline (``Pipeline.resume``) before the call starts.
The client carries it, so no transceiver needs to reach another.

A sealed state: base64url of ``version (1) | key id (1) | expiry, unix s (4) | state | MAC (16)``,
the MAC an HMAC-SHA256 under a key derived from the route secret of that id (every
transceiver of the deployment has it), so a client cannot forge or alter a state, and one is
accepted only until it expires (the drain's deadline plus a margin). The state is not
encrypted: the client can read it. Keep it small (at most MAX_STATE_BYTES: it travels in an
HTTP header) — a conversation id in the backend's own store, or the state itself when small.

Sans-IO: bytes and a clock in, a token or a HandoffError out.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import struct

from wire.route_token import RouteKeyring

__all__ = ["HANDOFF_ERROR_REASONS", "HANDOFF_HEADER", "MAX_STATE_BYTES", "HandoffError", "seal_state", "open_state"]

HANDOFF_HEADER = "Rtcrelay-Handoff"
MAX_STATE_BYTES = 4096
VERSION = 1
MAC_LEN = 16
KEY_LABEL = b"rtcrelay pipeline-handoff v1"
_HEAD = struct.Struct("!BBI")
HANDOFF_ERROR_REASONS = frozenset({"handoff_malformed", "handoff_unknown_key", "handoff_forged", "handoff_expired"})


class HandoffError(ValueError):
    """A handoff token that cannot be used: ``reason`` names why (for the 400's first line)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _mac(keyring: RouteKeyring, key_id: int, body: bytes) -> bytes | None:
    key = keyring.purpose_key(key_id, KEY_LABEL)
    return None if key is None else hmac.digest(key, body, "sha256")[:MAC_LEN]


def seal_state(keyring: RouteKeyring, state: bytes, now: float, ttl_s: float) -> str:
    if len(state) > MAX_STATE_BYTES:
        raise ValueError(f"a handed-off state is at most {MAX_STATE_BYTES} bytes, not {len(state)}")
    key_id = keyring.active_key_id
    body = _HEAD.pack(VERSION, key_id, int(now + ttl_s) & 0xFFFFFFFF) + state
    mac = _mac(keyring, key_id, body)
    assert mac is not None  # the active key has a secret
    return base64.urlsafe_b64encode(body + mac).rstrip(b"=").decode("ascii")


def open_state(keyring: RouteKeyring, token: str, now: float) -> bytes:
    """The state a token carries; HandoffError if it is malformed, forged, or expired."""
    if len(token) > (MAX_STATE_BYTES + _HEAD.size + MAC_LEN) * 4 // 3 + 4:
        raise HandoffError("handoff_malformed", "too long")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise HandoffError("handoff_malformed", "not base64url") from None
    if len(raw) < _HEAD.size + MAC_LEN:
        raise HandoffError("handoff_malformed", "too short")
    body, mac = raw[:-MAC_LEN], raw[-MAC_LEN:]
    version, key_id, expires = _HEAD.unpack_from(body)
    if version != VERSION:
        raise HandoffError("handoff_malformed", f"version {version}")
    expected = _mac(keyring, key_id, body)
    if expected is None:
        raise HandoffError("handoff_unknown_key", f"key id {key_id} is not in this transceiver's keyring")
    if not hmac.compare_digest(mac, expected):
        raise HandoffError("handoff_forged", "its MAC does not match")
    if now > expires:
        raise HandoffError("handoff_expired", f"expired {now - expires:.0f} s ago")
    return body[_HEAD.size:]
