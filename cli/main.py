"""The `rtcrelay` command (placeholder until the services exist)."""
from __future__ import annotations

from typing import Annotated

import typer

from cli import __version__

app = typer.Typer(no_args_is_help=True, help="rtcrelay: a UDP relay for WebRTC servers, and the transceiver behind it.")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rtcrelay {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """rtcrelay command line."""
