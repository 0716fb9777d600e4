"""Which client → transceiver hit path the workers run: the C one (relay/_fastpath.c) or Python's.

The C extension is optional at install time (setup.py): without a compiler the relay still
runs, on the Python line in relay/worker.py. ``hot_path = "c"`` makes its absence an error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from daemon.config_file import ConfigError

if TYPE_CHECKING:
    from relay._fastpath import PublicFastPath
else:
    PublicFastPath = Any


class HotPathError(ConfigError):
    """``hot_path = "c"`` but the extension is not there: worded for an operator."""


def fast_path_type(choice: str) -> Any | None:
    """``relay._fastpath.PublicFastPath`` if ``choice`` wants it and it was built, else None."""
    if choice == "python":
        return None
    try:
        from relay._fastpath import PublicFastPath
    except ImportError as exc:
        if choice == "c":
            raise HotPathError(
                f'`hot_path` = "c", but the C extension relay._fastpath is not built ({exc}). '
                'Install gcc and the Python headers (Debian: apt-get install gcc python3-dev) and '
                'reinstall rtcrelay, or set hot_path = "auto"'
            ) from None
        return None
    return PublicFastPath


def describe(choice: str) -> str:
    """For the start-up log: which path serves, and why (raises HotPathError as
    :func:`fast_path_type` does)."""
    if fast_path_type(choice) is not None:
        return "C (relay._fastpath)"
    return "Python (hot_path = \"python\")" if choice == "python" else "Python (relay._fastpath is not built)"
