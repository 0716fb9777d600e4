"""The files a bench gives the relay it starts: route keys and a config file."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from daemon.config_file import toml_text
from daemon.keys import generate_keys_toml


def write_route_keys(path: Path) -> Path:
    """A route keys file with one new secret (the transceiver under test reads it too)."""
    path.write_text(generate_keys_toml())
    return path


def write_relay_config(path: Path, settings: Mapping[str, object]) -> Path:
    """A relay config file (TOML) with these top-level settings."""
    path.write_text(toml_text(settings))
    return path
