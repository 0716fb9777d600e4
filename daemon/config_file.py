"""Configuration loading shared by both services: TOML file < RTCRELAY_* environment < flags.

Each service declares its settings as a msgspec Struct (forbid_unknown_fields), so a wrong
key or type is reported with its path (``$.workers``) and the source it came from. Values
from the environment are strings and are converted leniently ("4" → 4, "true" → True);
list values from the environment are comma-separated.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

T = TypeVar("T", bound=msgspec.Struct)


class ConfigError(Exception):
    """A configuration problem, worded for an operator: which key, from where, what is wrong."""


def load_config(
    struct_type: type[T],
    path: str | None,
    *,
    env_prefix: str,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] = os.environ,
) -> T:
    merged: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as handle:
                merged.update(tomllib.load(handle))
        except FileNotFoundError:
            raise ConfigError(f"config file {path}: not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None
        _convert(struct_type, merged, f"config file {path}")
    fields = {f.encode_name: f for f in msgspec.structs.fields(struct_type)}
    from_env: dict[str, Any] = {}
    for name, field in fields.items():
        value = environ.get(env_prefix + name.upper())
        if value is None:
            continue
        from_env[name] = [v.strip() for v in value.split(",") if v.strip()] if _is_list(field.type) else value
    if from_env:
        _convert(struct_type, {**merged, **from_env}, f"environment ({env_prefix}*)")
        merged.update(from_env)
    if overrides:
        merged.update({k: v for k, v in overrides.items() if v is not None})
    return _convert(struct_type, merged, "command line")


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

