"""Configuration loading shared by both services: TOML file < RTCRELAY_* environment < flags.

Each service declares its settings as a msgspec Struct (forbid_unknown_fields), so a wrong
key or type is reported with its path (``$.workers``) and the source it came from. Values
from the environment are strings and are converted leniently ("4" → 4, "true" → True);
list values from the environment are comma-separated. A renamed key's old name is still read
(file and environment), as the new one, with a warning that names both.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import tomllib
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

T = TypeVar("T", bound=msgspec.Struct)

log = logging.getLogger("rtcrelay.config")


class ConfigError(Exception):
    """A configuration problem, worded for an operator: which key, from where, what is wrong."""


def load_config(
    struct_type: type[T],
    path: str | None,
    *,
    env_prefix: str,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] = os.environ,
    renamed: Mapping[str, str] | None = None,
) -> T:
    """``renamed``: old key → new key. The old one is read as the new one (a warning at load);
    both in one source with different values is an error."""
    renamed = renamed or {}
    seen_old: set[str] = set()
    merged: dict[str, Any] = {}
    if path:
        source = f"config file {path}"
        try:
            with open(path, "rb") as handle:
                merged.update(tomllib.load(handle))
        except FileNotFoundError:
            raise ConfigError(f"{source}: not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
        _rename(merged, renamed, source, seen_old)
        _convert(struct_type, merged, source)
    fields = {f.encode_name: f for f in msgspec.structs.fields(struct_type)}
    from_env: dict[str, Any] = {}
    for name in (*fields, *renamed):
        value = environ.get(env_prefix + name.upper())
        if value is None:
            continue
        field = fields[renamed.get(name, name)]
        from_env[name] = [v.strip() for v in value.split(",") if v.strip()] if _is_list(field.type) else value
    if from_env:
        source = f"environment ({env_prefix}*)"
        _rename(from_env, renamed, source, seen_old)
        _convert(struct_type, {**merged, **from_env}, source)
        merged.update(from_env)
    if overrides:
        merged.update({k: v for k, v in overrides.items() if v is not None})
    for old in sorted(seen_old):
        log.warning("config: `%s` is deprecated, read as `%s` (same values): rename it", old, renamed[old])
    return _convert(struct_type, merged, "command line")


def _rename(data: dict[str, Any], renamed: Mapping[str, str], source: str, seen_old: set[str]) -> None:
    """In one source's ``data``: each old key's value moved to its new key."""
    for old, new in renamed.items():
        if old not in data:
            continue
        value = data.pop(old)
        if new in data and data[new] != value:
            raise ConfigError(f"{source}: `{old}` (the old name of `{new}`) and `{new}` are both set, "
                              f"to {value!r} and {data[new]!r}: keep `{new}` only")
        data[new] = value
        seen_old.add(old)


def _is_list(annotation: Any) -> bool:
    return getattr(annotation, "__origin__", None) is list


def _convert(struct_type: type[T], data: dict[str, Any], source: str) -> T:
    try:
        return msgspec.convert(data, type=struct_type, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except ValueError as exc:  # raised by a Struct's __post_init__ checks, which name the key
        raise ConfigError(f"{source}: {exc}") from None


def parse_host_port(text: str, key: str) -> tuple[str, int]:
    """'1.2.3.4:5', '[::1]:5' → (host, port); ValueError naming ``key`` otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"`{key}`: {text!r} is not HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"`{key}`: {host!r} is not an IP address") from None
    return host, int(port)



def toml_text(values: Mapping[str, object]) -> str:
    """Top-level settings as TOML (what a config file written by a program looks like)."""
    return "".join(f"{key} = {_toml_value(value)}\n" for key, value in values.items())


def _toml_value(value: object) -> str:
    # JSON's strings, numbers, booleans and arrays are TOML's too; a table is written inline.
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value)
