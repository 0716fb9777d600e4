"""WHIP bearer tokens (RFC 9725 section 4.5, RFC 6750): who may open, change and end sessions.

Two sources, either or both (configured on the transceiver; none: no authentication):

- **Signed tokens**, verified without a database: ``rtw1.<key id>.<expiry>.<subject>.<mac>``,
  the MAC an HMAC-SHA256 (first 16 bytes, base64url) under a key derived from a WHIP token
  keyring: the same file format as the route keys (``rtcrelay keys generate``), a file of its
  own so that what issues WHIP tokens (the application's backend) never holds route secrets.
  Rotation as for route keys: add a key, make it ``active``, restart; tokens of the old id
  verify while it stays in the file. ``rtcrelay whip-token issue`` (or :func:`issue_bearer` in
  the backend) makes one for a subject and a lifetime.
- **A tokens file**: one ``subject token`` per line (``#`` comments), for services with a
  static credential; compared by SHA-256 digest in constant time.

The subject owns the sessions it opens: PATCH, DELETE and GET of another subject's session
get ``403`` (``insufficient_scope``). Sans-IO: strings and a clock in, a subject or a
:class:`BearerError` (its status and ``WWW-Authenticate`` value) out.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping

from daemon.config_file import ConfigError
from wire.route_token import RouteKeyring

__all__ = ["BearerError", "BearerVerifier", "issue_bearer", "load_tokens_file", "REALM"]

TOKEN_PREFIX = "rtw1"
KEY_LABEL = b"rtcrelay whip-bearer v1"
MAC_LEN = 16
REALM = "rtcrelay"
SUBJECT = re.compile(r"[A-Za-z0-9._@:+-]{1,128}")
MAX_TOKEN_LEN = 512


class BearerError(Exception):
    """Why a request is not authorized: ``status`` 401 (no or bad token) or 403 (not yours)."""

    def __init__(self, status: int, error: str | None, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error  # RFC 6750 error code; None when the request had no token at all
        self.description = description

    @property
    def reason(self) -> str:
        """For metrics: missing, invalid_token, insufficient_scope."""
        return self.error or "missing"

    def www_authenticate(self) -> str:
        if self.error is None:
            return f'Bearer realm="{REALM}"'
        return f'Bearer realm="{REALM}", error="{self.error}", error_description="{self.description}"'


def _mac(keyring: RouteKeyring, key_id: int, signed: str) -> str | None:
    key = keyring.purpose_key(key_id, KEY_LABEL)
    if key is None:
        return None
    digest = hmac.digest(key, signed.encode("ascii"), "sha256")[:MAC_LEN]
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def issue_bearer(keyring: RouteKeyring, subject: str, now: float, ttl_s: float) -> str:
    if not SUBJECT.fullmatch(subject):
        raise ValueError("a subject is 1-128 characters of A-Z a-z 0-9 . _ @ : + -")
    signed = f"{TOKEN_PREFIX}.{keyring.active_key_id}.{int(now + ttl_s)}.{subject}"
    mac = _mac(keyring, keyring.active_key_id, signed)
    assert mac is not None
    return f"{signed}.{mac}"


def load_tokens_file(path: str) -> dict[bytes, str]:
    """``subject token`` lines -> {sha256(token): subject}; ConfigError names the line."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"whip_tokens_file {path}: {exc.strerror}") from None
    tokens: dict[bytes, str] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not SUBJECT.fullmatch(parts[0]) or len(parts[1]) < 16:
            raise ConfigError(f"whip_tokens_file {path}:{number}: expected `subject token` "
                              "(a subject of A-Z a-z 0-9 . _ @ : + -, a token of 16+ characters)")
        tokens[hashlib.sha256(parts[1].encode()).digest()] = parts[0]
    return tokens


class BearerVerifier:
    """Who a request's ``Authorization`` header says it is."""

    def __init__(self, keyring: RouteKeyring | None, static_tokens: Mapping[bytes, str]) -> None:
        self.keyring = keyring
        self.static_tokens = dict(static_tokens)

    def subject(self, authorization: str | None, now: float) -> str:
        if not authorization:
            raise BearerError(401, None, "a bearer token is required")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise BearerError(401, "invalid_request", "the Authorization header is not `Bearer <token>`")
        if len(token) > MAX_TOKEN_LEN or not token.isascii():
            raise BearerError(401, "invalid_token", "malformed token")
        static = self._static(token)
        if static is not None:
            return static
        return self._signed(token, now)

    def _static(self, token: str) -> str | None:
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, subject in self.static_tokens.items():  # no early exit: constant time in the match
            if hmac.compare_digest(known, digest):
                found = subject
        return found

    def _signed(self, token: str, now: float) -> str:
        parts = token.split(".")
        if self.keyring is None or len(parts) != 5 or parts[0] != TOKEN_PREFIX:
            raise BearerError(401, "invalid_token", "unknown token")
        _, key_id, expiry, subject, mac = parts
        if not key_id.isdigit() or not expiry.isdigit() or not SUBJECT.fullmatch(subject):
            raise BearerError(401, "invalid_token", "malformed token")
        expected = _mac(self.keyring, int(key_id), token.rpartition(".")[0])
        if expected is None:
            raise BearerError(401, "invalid_token", "signed with a key this transceiver does not have")
        if not hmac.compare_digest(expected, mac):
            raise BearerError(401, "invalid_token", "bad signature")
        if now > int(expiry):
            raise BearerError(401, "invalid_token", "the token expired")
        return subject

    @staticmethod
    def forbid(subject: str) -> BearerError:
        return BearerError(403, "insufficient_scope", f"the session belongs to another subject than {subject}")
