"""The `rtcrelay` command: run the services, inspect them, benchmark them."""
from __future__ import annotations

import logging
import sys
from typing import Annotated, NoReturn, Optional

import typer

from cli import __version__

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="rtcrelay: a UDP relay for WebRTC servers in containers, and the transceiver behind it.",
)
keys_app = typer.Typer(no_args_is_help=True, help="Route secrets: generate and check.")
app.add_typer(keys_app, name="keys")


def fail(message: str, code: int = 1) -> NoReturn:
    """One clear line on stderr and a non-zero exit: no traceback for an operator's mistake."""
    typer.echo(f"rtcrelay: {message}", err=True)
    raise typer.Exit(code)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rtcrelay {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """rtcrelay command line."""


ConfigOpt = Annotated[Optional[str], typer.Option("--config", "-c", help="TOML config file.", show_default=False)]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]


@app.command()
def relay(
    config: ConfigOpt = None,
    listen: Annotated[Optional[list[str]], typer.Option(help="Public UDP address HOST:PORT (repeat for several).", show_default=False)] = None,
    workers: Annotated[Optional[int], typer.Option(help="Worker processes (0: one per CPU).", show_default=False)] = None,
    name: Annotated[Optional[str], typer.Option(help="Instance name (names the shm table).", show_default=False)] = None,
    route_keys: Annotated[Optional[str], typer.Option("--route-keys", help="Route keys file (TOML).", show_default=False)] = None,
    admin: Annotated[Optional[str], typer.Option(help="Admin HTTP HOST:PORT ('' disables).", show_default=False)] = None,
    tunnel_host: Annotated[Optional[str], typer.Option(help="Tunnel socket address.", show_default=False)] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run the relay: supervisor + SO_REUSEPORT workers on the public UDP port."""
    from relay.config import load_relay_config
    from relay.config_file import ConfigError
    from relay.supervisor import run_relay

    setup_logging(verbose)
    overrides = {"listen": listen or None, "workers": workers, "name": name, "route_keys_file": route_keys, "admin_listen": admin, "tunnel_host": tunnel_host}
    try:
        cfg = load_relay_config(config, overrides)
        run_relay(cfg)
    except ConfigError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{exc.strerror or exc} ({getattr(exc, 'filename', '') or 'socket'})")


@keys_app.command("generate")
def keys_generate(key_id: Annotated[int, typer.Option("--key-id", help="Key id 0..255.")] = 1) -> None:
    """Print a new route keys file (TOML) with one random 256-bit secret."""
    from relay.keys import generate_keys_toml

    if not 0 <= key_id <= 255:
        fail("--key-id must be 0..255")
    typer.echo(generate_keys_toml(key_id), nl=False)


if __name__ == "__main__":
    app()
