"""Commands that run things: relay, transceiver, up (the demo), keys."""
from __future__ import annotations

from typing import Annotated

import typer

from cli.app import ConfigOpt, VerboseOpt, app, fail, keys_app, setup_logging, whip_token_app
from daemon.config_file import ConfigError


@app.command()
def relay(
    config: ConfigOpt = None,
    listen: Annotated[list[str] | None, typer.Option(help="Public UDP address HOST:PORT (repeat for several).",
                                                     show_default=False)] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (0: one per CPU).", show_default=False)] = None,
    name: Annotated[str | None, typer.Option(help="Instance name (names the shm table).", show_default=False)] = None,
    route_keys: Annotated[str | None,
                          typer.Option("--route-keys", help="Route keys file (TOML).", show_default=False)] = None,
    admin: Annotated[str | None, typer.Option(help="Admin HTTP HOST:PORT ('' disables).", show_default=False)] = None,
    tunnel_host: Annotated[str | None, typer.Option(help="Tunnel socket address.", show_default=False)] = None,
    ephemeral: Annotated[bool, typer.Option(
        "--ephemeral", help="Remove the shm table on exit (default: keep it for a restart).")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Run the relay: supervisor + SO_REUSEPORT workers on the public UDP port."""
    from relay.config import load_relay_config
    from relay.supervisor import run_relay

    setup_logging(verbose)
    overrides = {"listen": listen or None, "workers": workers, "name": name, "route_keys_file": route_keys,
                 "admin_listen": admin, "tunnel_host": tunnel_host}
    from relay.supervisor import ActivationMismatch
    from shm import ShmError

    try:
        run_relay(load_relay_config(config, overrides), keep_table=not ephemeral)
    except (ConfigError, ActivationMismatch, ShmError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}")


@app.command()
def transceiver(
    config: ConfigOpt = None,
    http: Annotated[str | None, typer.Option(help="Signalling HTTP HOST:PORT.", show_default=False)] = None,
    relay_public: Annotated[list[str] | None,
                            typer.Option("--relay-public", help="Relay public address IP:PORT (the ICE candidate).",
                                         show_default=False)] = None,
    route_keys: Annotated[str | None,
                          typer.Option("--route-keys", help="Route keys file (TOML).", show_default=False)] = None,
    tunnel_host: Annotated[str | None, typer.Option(help="Tunnel socket address.", show_default=False)] = None,
    max_sessions: Annotated[int | None, typer.Option(help="Sessions at once before 503.", show_default=False)] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run a transceiver: aiortc sessions behind the relay, WHIP-style signalling over HTTP."""
    from daemon.config_file import parse_host_port
    from transceiver.service import load_transceiver_config, run_transceiver

    setup_logging(verbose)
    overrides: dict[str, object] = {"relay_public_addresses": relay_public or None, "route_keys_file": route_keys,
                                    "tunnel_host": tunnel_host, "max_sessions": max_sessions}
    try:
        if http:
            overrides["http_host"], overrides["http_port"] = parse_host_port(http, "--http")
        cfg = load_transceiver_config(config, overrides)
        cfg.keyring()  # a missing or bad keys file stops the start, naming it
        import uvloop

        uvloop.run(run_transceiver(cfg))
    except (ConfigError, ValueError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}")


@app.command()
def up(
    http_port: Annotated[int, typer.Option(help="Demo page port.")] = 8080,
    relay_port: Annotated[int, typer.Option(help="Relay public UDP port.")] = 3478,
    signalling_port: Annotated[int, typer.Option(help="Signalling HTTP port (the front for the transceivers).")] = 8081,
    admin_port: Annotated[int, typer.Option(help="Relay admin HTTP port (/metrics).")] = 9478,
    workers: Annotated[int, typer.Option(help="Relay worker processes.")] = 2,
    transceivers: Annotated[int, typer.Option(min=1, max=16, help="Transceiver processes.")] = 2,
    name: Annotated[str, typer.Option(help="Relay instance name (for `rtcrelay flows --name`).")] = "demo",
    route_keys: Annotated[str | None,
                          typer.Option("--route-keys", help="Route keys file; default: a fresh one for this run.",
                                       show_default=False)] = None,
    verbose: VerboseOpt = False,
) -> None:
    """The demo: relay + transceivers + a call page, all on 127.0.0.1; a service that dies is
    restarted. Ctrl-C stops everything."""
    from cli.up import DemoSettings, PortInUse, run_demo

    setup_logging(verbose)
    settings = DemoSettings(http_port=http_port, relay_port=relay_port, signalling_port=signalling_port,
                            admin_port=admin_port, workers=workers, transceivers=transceivers, name=name,
                            route_keys=route_keys, verbose=verbose)
    try:
        code = run_demo(settings)
    except PortInUse as exc:
        fail(str(exc))
    except ConfigError as exc:
        fail(str(exc))
    raise typer.Exit(code)


@keys_app.command("generate")
def keys_generate(key_id: Annotated[int, typer.Option("--key-id", help="Key id 0..255.")] = 1) -> None:
    """Print a new keys file (TOML) with one random 256-bit secret: route keys, or the keys
    that sign WHIP bearer tokens (the same format, a file of its own)."""
    from daemon.keys import generate_keys_toml

    if not 0 <= key_id <= 255:
        fail("--key-id must be 0..255")
    typer.echo(generate_keys_toml(key_id), nl=False)


@whip_token_app.command("issue")
def whip_token_issue(
    subject: Annotated[str, typer.Option(help="Who the token is for: it owns the sessions it opens.")],
    keys: Annotated[str, typer.Option("--keys", help="The WHIP token keys file (whip_token_keys_file).")],
    ttl: Annotated[float, typer.Option(help="Lifetime in seconds.")] = 3600.0,
) -> None:
    """Print a signed WHIP bearer token (what an application backend hands its client)."""
    import time

    from daemon.config_file import ConfigError
    from daemon.keys import WHIP_KEYS, load_keyring
    from transceiver.bearer import issue_bearer

    try:
        keyring = load_keyring(keys, WHIP_KEYS)
    except ConfigError as exc:
        fail(str(exc))
    if ttl <= 0:
        fail("--ttl must be > 0 seconds")
    try:
        typer.echo(issue_bearer(keyring, subject, time.time(), ttl))
    except ValueError as exc:
        fail(f"--subject: {exc}")
