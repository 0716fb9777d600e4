"""Route secrets (and WHIP bearer-token keys, the same format) from a file or a systemd
credential, never from the command line.

File format (TOML)::

    active = 2                 # the key id that signs new tokens
    [keys]
    1 = "base64 secret"        # still accepted while sessions signed with it live
    2 = "base64 secret"

Under systemd, ``LoadCredential=route-keys:/etc/rtcrelay/route-keys.toml`` puts it in
``$CREDENTIALS_DIRECTORY/route-keys``; that is the default when no path is configured.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import tomllib

import msgspec

from daemon.config_file import ConfigError
from wire.route_token import MIN_SECRET_LEN, RouteKeyring

CREDENTIAL_NAME = "route-keys"


class KeyFileKind(msgspec.Struct, frozen=True):
    """Which secrets a keys file holds: how errors name it, its config key, its credential."""

    what: str
    config_key: str
    credential: str


ROUTE_KEYS = KeyFileKind("route keys", "route_keys_file", CREDENTIAL_NAME)
WHIP_KEYS = KeyFileKind("WHIP token keys", "whip_token_keys_file", "whip-token-keys")


class KeysFile(msgspec.Struct, forbid_unknown_fields=True):
    active: int
    keys: dict[str, str]


def resolve_keys_path(path: str | None, kind: KeyFileKind = ROUTE_KEYS) -> str:
    if path:
        return path
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory and os.path.exists(os.path.join(directory, kind.credential)):
        return os.path.join(directory, kind.credential)
    raise ConfigError(
        f"{kind.config_key}: not set, and no systemd credential '{kind.credential}' "
        f"(generate one with: rtcrelay keys generate > {kind.credential}.toml)"
    )


def load_keyring(path: str | None, kind: KeyFileKind = ROUTE_KEYS) -> RouteKeyring:
    path = resolve_keys_path(path, kind)
    what = kind.what
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {path}: not valid TOML: {exc}") from None
    try:
        parsed = msgspec.convert(raw, KeysFile)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{what} {path}: {exc}") from None
    secrets_by_id: dict[int, bytes] = {}
    for key_id, text in parsed.keys.items():
        if not key_id.isdigit():
            raise ConfigError(f"{what} {path}: key id `keys.{key_id}` is not a number 0..255")
        try:
            secret = base64.b64decode(text, validate=True)
        except binascii.Error:
            raise ConfigError(f"{what} {path}: `keys.{key_id}` is not base64") from None
        if len(secret) < MIN_SECRET_LEN:
            raise ConfigError(f"{what} {path}: `keys.{key_id}` is {len(secret)} bytes, "
                              f"at least {MIN_SECRET_LEN} needed")
        secrets_by_id[int(key_id)] = secret
    try:
        return RouteKeyring(secrets_by_id, parsed.active)
    except ValueError as exc:
        raise ConfigError(f"{what} {path}: {exc}") from None


def generate_keys_toml(key_id: int = 1) -> str:
    secret = base64.b64encode(secrets.token_bytes(32)).decode()
    return ("# rtcrelay route secrets: keep private, same file on relays and transceivers\n"
            f'active = {key_id}\n[keys]\n{key_id} = "{secret}"\n')
