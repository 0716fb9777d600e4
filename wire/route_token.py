"""Route token: the server ICE ufrag that tells a stateless relay which transceiver owns a session.

Sans-IO: bytes and integers in, a typed token or a named error out. The clock is passed in.

Wire layout (before base64, all integers big-endian)::

    0      1        2 .. 2+A     +2     [+2]       +4          +6       +10
    | v|f | key id | target ip  | port | cluster | issued at | nonce  | mac |

- ``v|f``: high nibble the token version (1), low nibble flags (bit 0: IPv6 target,
  bit 1: cluster id present).
- ``key id``: which route secret signed it; several may be valid at once (rotation).
- ``issued at``: unix seconds (u32). The relay accepts a token for a *new* session only
  within ``max_age`` of it; flows of a session it already knows are not age-checked, so a
  NAT rebinding an hour into a call still gets through.
- ``mac``: HMAC-SHA256 over everything before it, truncated to 80 bits (RFC 2104's floor;
  an online forger needs ~2^79 tries, each a datagram).

The ufrag is the standard base64 of those bytes without padding: 38 chars for an IPv4 target,
54 for IPv6, all ICE chars (``A-Za-z0-9+/``). The ICE password is derived from the secret and
the ufrag, so the relay can check MESSAGE-INTEGRITY with no per-session state:
``pwd = b64(HMAC-SHA256(secret, b"pwd" + ufrag))`` (43 chars).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import os
import struct
from collections.abc import Mapping
from typing import NamedTuple

from wire.hmac_fast import HmacKey

TOKEN_VERSION = 1
_FLAG_IPV6 = 0x1
_FLAG_CLUSTER = 0x2
NONCE_LEN = 6
MAC_LEN = 10
MIN_SECRET_LEN = 16
# Clock skew tolerated between the transceiver that issued a token and the relay.
MAX_FUTURE_SKEW_S = 30
MIN_UFRAG_LEN = 38  # IPv4 target, no cluster
MAX_UFRAG_LEN = 56  # IPv6 target with cluster

_HEAD = struct.Struct("!BB")
_PORT = struct.Struct("!H")
_TAIL = struct.Struct("!I6s")  # issued_at, nonce
_B64_ALPHABET = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")

# Drop reasons a relay counts, one per way a token can be wrong.
TOKEN_ERROR_REASONS = frozenset(
    {
        "token_bad_length",
        "token_bad_charset",
        "token_bad_version",
        "token_unknown_key",
        "token_bad_mac",
        "token_expired",
        "token_not_yet_valid",
        "token_wrong_cluster",
    }
)


class TokenError(Exception):
    """A ufrag that is not a valid route token; ``reason`` is one of TOKEN_ERROR_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in TOKEN_ERROR_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class RouteToken(NamedTuple):
    version: int
    key_id: int
    target_ip: bytes  # packed, 4 or 16 bytes
    target_port: int
    cluster: int | None
    issued_at: int
    nonce: bytes

    @property
    def target_host(self) -> str:
        return str(ipaddress.ip_address(self.target_ip))


class RouteKeyring:
    """The route secrets a relay or transceiver knows, by key id; one of them signs new tokens."""

    def __init__(self, secrets: Mapping[int, bytes], active_key_id: int) -> None:
        if not secrets:
            raise ValueError("a keyring needs at least one route secret")
        for key_id, secret in secrets.items():
            if not 0 <= key_id <= 255:
                raise ValueError(f"key id {key_id} is outside 0..255")
            if len(secret) < MIN_SECRET_LEN:
                raise ValueError(f"route secret {key_id} is {len(secret)} bytes; at least {MIN_SECRET_LEN} are needed")
        if active_key_id not in secrets:
            raise ValueError(f"active key id {active_key_id} has no secret")
        self.active_key_id = active_key_id
        self._secrets = dict(secrets)
        # Domain-separated MAC keys so the token MAC and the password never share an HMAC input space.
        self._mac = {k: HmacKey(hmac.digest(s, b"rtcrelay route-token v1", "sha256"), "sha256")
                     for k, s in secrets.items()}
        self._password = {k: HmacKey(s, "sha256") for k, s in secrets.items()}

    @property
    def key_ids(self) -> frozenset[int]:
        return frozenset(self._secrets)

    def mac(self, key_id: int, body: bytes) -> bytes | None:
        key = self._mac.get(key_id)
        if key is None:
            return None
        return key.digest(body)[:MAC_LEN]

    def purpose_key(self, key_id: int, label: bytes) -> bytes | None:
        """A key of its own for another use of the shared secret (domain-separated by ``label``)."""
        secret = self._secrets.get(key_id)
        return None if secret is None else hmac.digest(secret, label, "sha256")

    def password(self, key_id: int, ufrag: str) -> str | None:
        key = self._password.get(key_id)
        if key is None:
            return None
        if not ufrag.isascii():
            raise TokenError("token_bad_charset", "a ufrag is ASCII")
        return _b64(key.digest(b"pwd" + ufrag.encode("ascii")))


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).rstrip(b"=").decode("ascii")


def issue_token(
    keyring: RouteKeyring,
    target_ip: bytes,
    target_port: int,
    now: float,
    *,
    cluster: int | None = None,
    nonce: bytes | None = None,
) -> str:
    """Make a new server ufrag routing to ``target_ip:target_port`` (packed IP, 4 or 16 bytes)."""
    if len(target_ip) not in (4, 16):
        raise ValueError("target_ip must be a packed IPv4 (4 bytes) or IPv6 (16 bytes) address")
    if not 0 < target_port < 65536:
        raise ValueError(f"target port {target_port} is outside 1..65535")
    flags = (_FLAG_IPV6 if len(target_ip) == 16 else 0) | (_FLAG_CLUSTER if cluster is not None else 0)
    body = bytearray(_HEAD.pack((TOKEN_VERSION << 4) | flags, keyring.active_key_id))
    body += target_ip
    body += _PORT.pack(target_port)
    if cluster is not None:
        if not 0 <= cluster < 65536:
            raise ValueError(f"cluster id {cluster} is outside 0..65535")
        body += _PORT.pack(cluster)
    body += _TAIL.pack(int(now) & 0xFFFFFFFF, nonce if nonce is not None else os.urandom(NONCE_LEN))
    mac = keyring.mac(keyring.active_key_id, bytes(body))
    assert mac is not None
    return _b64(bytes(body) + mac)


def _parse(ufrag: str) -> tuple[RouteToken, bytes, bytes]:
    """The token's fields, its signed body and its MAC; checks length, charset and version only."""
    if not MIN_UFRAG_LEN <= len(ufrag) <= MAX_UFRAG_LEN or len(ufrag) % 4 == 1:
        raise TokenError("token_bad_length", f"{len(ufrag)} chars")
    raw_text = ufrag.encode("ascii", "replace")
    if not _B64_ALPHABET.issuperset(raw_text):
        raise TokenError("token_bad_charset")
    try:
        raw = base64.b64decode(raw_text + b"=" * (-len(raw_text) % 4), validate=True)
    except binascii.Error as exc:  # pragma: no cover - the alphabet check above catches these
        raise TokenError("token_bad_charset", str(exc)) from None
    if _b64(raw) != ufrag:  # non-canonical trailing bits: one token, one spelling
        raise TokenError("token_bad_charset", "non-canonical base64")
    vf, key_id = raw[0], raw[1]
    if vf >> 4 != TOKEN_VERSION:
        raise TokenError("token_bad_version", f"version {vf >> 4}")
    ip_len = 16 if vf & _FLAG_IPV6 else 4
    has_cluster = bool(vf & _FLAG_CLUSTER)
    expected = 2 + ip_len + 2 + (2 if has_cluster else 0) + _TAIL.size + MAC_LEN
    if len(raw) != expected:
        raise TokenError("token_bad_length", f"{len(raw)} bytes, layout needs {expected}")
    body, mac = raw[:-MAC_LEN], raw[-MAC_LEN:]
    pos = 2
    target_ip = body[pos : pos + ip_len]
    pos += ip_len
    (port,) = _PORT.unpack_from(body, pos)
    pos += 2
    cluster = None
    if has_cluster:
        (cluster,) = _PORT.unpack_from(body, pos)
        pos += 2
    issued_at, nonce = _TAIL.unpack_from(body, pos)
    return RouteToken(vf >> 4, key_id, target_ip, port, cluster, issued_at, nonce), body, mac


def inspect_token(ufrag: str) -> RouteToken:
    """What a ufrag claims, WITHOUT checking its MAC (for tools that have no secret)."""
    return _parse(ufrag)[0]


def decode_token(
    keyring: RouteKeyring,
    ufrag: str,
    now: float,
    *,
    max_age: float | None = 300.0,
    cluster: int | None = None,
    any_cluster: bool = False,
) -> RouteToken:
    """Check a ufrag and return what it says, or raise TokenError naming the first failed check.

    ``max_age=None`` skips the age check (a flow of a session the relay already knows).
    ``cluster``: this relay's cluster id; a token naming another cluster is refused, unless
    ``any_cluster`` (an edge relay, which forwards other clusters' sessions, decides itself).
    """
    token, body, mac = _parse(ufrag)
    good = keyring.mac(token.key_id, body)
    if good is None:
        raise TokenError("token_unknown_key", f"key id {token.key_id}")
    if not hmac.compare_digest(good, mac):
        raise TokenError("token_bad_mac")
    if token.cluster is not None and token.cluster != cluster and not any_cluster:
        raise TokenError("token_wrong_cluster", f"token cluster {token.cluster}, relay cluster {cluster}")
    if max_age is not None:
        check_age(token, now, max_age)
    return token


def check_age(token: RouteToken, now: float, max_age: float) -> None:
    """TokenError unless the token was issued within ``max_age`` seconds (and not in the future)."""
    age = now - token.issued_at
    if age > max_age:
        raise TokenError("token_expired", f"issued {age:.0f} s ago, max age {max_age:.0f} s")
    if age < -MAX_FUTURE_SKEW_S:
        raise TokenError("token_not_yet_valid", f"issued {-age:.0f} s in the future")


def derive_password(keyring: RouteKeyring, ufrag: str, key_id: int | None = None) -> str:
    """The ICE password that belongs to a ufrag (the key id is read from the token unless given)."""
    if key_id is None:
        key_id = _peek_key_id(ufrag)
    pwd = keyring.password(key_id, ufrag)
    if pwd is None:
        raise TokenError("token_unknown_key", f"key id {key_id}")
    return pwd


def _peek_key_id(ufrag: str) -> int:
    try:
        return base64.b64decode(ufrag[:4], validate=True)[1]
    except (binascii.Error, IndexError, ValueError):
        raise TokenError("token_bad_charset") from None
