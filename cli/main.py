"""The `rtcrelay` command: run the services, inspect them, benchmark them."""
from __future__ import annotations

from cli import bench_commands, observe, services  # noqa: F401  (each registers its commands)
from cli.app import app

__all__ = ["app"]

if __name__ == "__main__":
    app()
