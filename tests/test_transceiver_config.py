"""transceiver/service.py: TransceiverConfig validation and loading (TOML < environment < flags)."""

from __future__ import annotations

import base64
import re

import msgspec
import pytest

from daemon.config_file import ConfigError
from transceiver.service import TransceiverConfig, load_transceiver_config

SECRET = b"s" * 32


def make(**fields: object) -> TransceiverConfig:
    base: dict[str, object] = {"relay_public_addresses": ["192.0.2.1:3478"], "route_secrets": {1: SECRET}}
    return msgspec.convert({**base, **fields}, TransceiverConfig)


def test_defaults_and_derived_values() -> None:
    cfg = make(relay_public_addresses=["192.0.2.1:3478", "[2001:db8::1]:3478"], relay_tunnel_addresses=["10.0.0.5:4000"])
    assert cfg.relay_public == [("192.0.2.1", 3478), ("2001:db8::1", 3478)]
    assert cfg.relay_tunnels == [("10.0.0.5", 4000)]
    assert cfg.relay_networks == ["127.0.0.0/8", "::1/128"]
    assert cfg.connect_timeout == 20.0 and cfg.keyring().active_key_id == 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"relay_public_addresses": []}, "relay_public_addresses"),
        ({"relay_public_addresses": ["relay.example:3478"]}, "relay_public_addresses"),
        ({"relay_public_addresses": ["192.0.2.1:1", "192.0.2.2:2"]}, "one address per family"),
        ({"tunnel_host": "0.0.0.0"}, "tunnel_advertise_host"),
        ({"relay_networks": ["not-a-net"]}, "relay_networks"),
        ({"route_secrets": {1: b"short"}}, "route_secrets"),
        ({"route_key_id": 2}, "route_key_id"),
        ({"max_sessions": 0}, "max_sessions"),
        ({"connect_timeout": 0}, "connect_timeout"),
        ({"admission_cpu_budget": -0.1}, "admission_cpu_budget"),
        ({"admission_max_loop_lag": -1}, "admission_max_loop_lag"),
        ({"admission_call_cpu": 0}, "admission_call_cpu"),
        ({"no_such_key": 1}, "no_such_key"),
    ],
)
def test_errors_name_the_key(fields: dict[str, object], message: str) -> None:
    with pytest.raises((msgspec.ValidationError, ValueError), match=message):
        make(**fields)


def test_wildcard_tunnel_with_an_advertised_address_is_fine() -> None:
    assert make(tunnel_host="0.0.0.0", tunnel_advertise_host="10.0.0.7").tunnel_advertise_host == "10.0.0.7"


def test_load_from_toml_environment_and_overrides(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "transceiver.toml"
    path.write_text(
        'relay_public_addresses = ["192.0.2.1:3478"]\n'
        "max_sessions = 7\n"
        f'[route_secrets]\n1 = "{base64.b64encode(SECRET).decode()}"\n'
    )
    env = {"RTCRELAY_TRANSCEIVER_MAX_SESSIONS": "9", "RTCRELAY_TRANSCEIVER_RELAY_NETWORKS": "10.0.0.0/8, 127.0.0.0/8"}
    cfg = load_config_with(str(path), env, {"http_port": 8181})
    assert cfg.max_sessions == 9 and cfg.http_port == 8181
    assert cfg.relay_networks == ["10.0.0.0/8", "127.0.0.0/8"]
    assert cfg.route_secrets == {1: SECRET}
    path.write_text('relay_public_addresses = ["192.0.2.1:3478"]\nmax_sesions = 3\n')
    with pytest.raises(ConfigError, match="max_sesions"):
        load_config_with(str(path), {}, None)


def load_config_with(path: str, env: dict[str, str], overrides: dict | None) -> TransceiverConfig:
    from daemon.config_file import load_config
    from transceiver.service import ENV_PREFIX

    # load_transceiver_config reads os.environ; the same call with an explicit environment:
    return load_config(TransceiverConfig, path, env_prefix=ENV_PREFIX, overrides=overrides, environ=env)


def test_load_transceiver_config_uses_the_process_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("RTCRELAY_TRANSCEIVER_RELAY_PUBLIC_ADDRESSES", "192.0.2.9:3478")
    monkeypatch.setenv("RTCRELAY_TRANSCEIVER_ROUTE_KEYS_FILE", str(tmp_path / "missing.toml"))
    cfg = load_transceiver_config(None)
    assert cfg.relay_public == [("192.0.2.9", 3478)]
    with pytest.raises(ConfigError, match=re.escape("missing.toml")):
        cfg.keyring()
