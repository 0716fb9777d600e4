"""Route secrets from a file or a systemd credential, never from the command line.

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


class KeysFile(msgspec.Struct, forbid_unknown_fields=True):
    active: int
    keys: dict[str, str]


def resolve_keys_path(path: str | None) -> str:
    if path:
        return path
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory and os.path.exists(os.path.join(directory, CREDENTIAL_NAME)):
        return os.path.join(directory, CREDENTIAL_NAME)
    raise ConfigError(
        "route_keys_file: not set, and no systemd credential 'route-keys' "
        "(generate one with: rtcrelay keys generate > route-keys.toml)"
    )


def load_keyring(path: str | None) -> RouteKeyring:
    path = resolve_keys_path(path)
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"route keys {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"route keys {path}: not valid TOML: {exc}") from None
    try:
        parsed = msgspec.convert(raw, KeysFile)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"route keys {path}: {exc}") from None
    secrets_by_id: dict[int, bytes] = {}
    for key_id, text in parsed.keys.items():
        if not key_id.isdigit():
            raise ConfigError(f"route keys {path}: key id `keys.{key_id}` is not a number 0..255")
        try:
            secret = base64.b64decode(text, validate=True)
        except binascii.Error:
            raise ConfigError(f"route keys {path}: `keys.{key_id}` is not base64") from None
        if len(secret) < MIN_SECRET_LEN:
            raise ConfigError(f"route keys {path}: `keys.{key_id}` is {len(secret)} bytes, "
                              f"at least {MIN_SECRET_LEN} needed")
        secrets_by_id[int(key_id)] = secret
    try:
        return RouteKeyring(secrets_by_id, parsed.active)
    except ValueError as exc:
        raise ConfigError(f"route keys {path}: {exc}") from None


def generate_keys_toml(key_id: int = 1) -> str:
    secret = base64.b64encode(secrets.token_bytes(32)).decode()
    return ("# rtcrelay route secrets: keep private, same file on relays and transceivers\n"
            f'active = {key_id}\n[keys]\n{key_id} = "{secret}"\n')
