"""The typer application object, its sub-apps and shared helpers (no commands here)."""
from __future__ import annotations

import logging
import sys
from typing import Annotated, NoReturn

import typer

from cli import __version__

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="rtcrelay: a UDP relay for WebRTC servers in containers, and the transceiver behind it.",
)
keys_app = typer.Typer(no_args_is_help=True, help="Route secrets and WHIP token keys: generate them.")
whip_token_app = typer.Typer(no_args_is_help=True, help="WHIP bearer tokens: issue one for a subject.")
flows_app = typer.Typer(no_args_is_help=True, help="Flows (client 5-tuples) straight from the relay's shared memory.")
ufrag_app = typer.Typer(no_args_is_help=True, help="Server ufrags (route tokens).")
bench_app = typer.Typer(no_args_is_help=True,
                        help="Benchmarks (figures as ratios to a reference measured in the same run).")
app.add_typer(keys_app, name="keys")
app.add_typer(whip_token_app, name="whip-token")
app.add_typer(flows_app, name="flows")
app.add_typer(ufrag_app, name="ufrag")
app.add_typer(bench_app, name="bench")


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
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """rtcrelay command line."""


ConfigOpt = Annotated[str | None, typer.Option("--config", "-c", help="TOML config file.", show_default=False)]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]
NameOpt = Annotated[str, typer.Option("--name", "-n", envvar="RTCRELAY_RELAY_NAME", help="Relay instance name.")]
TableDirOpt = Annotated[str, typer.Option("--table-dir", envvar="RTCRELAY_RELAY_TABLE_DIR",
                                          help="Where the relay's shm files live.")]
