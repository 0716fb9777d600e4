"""The one error a benchmark step raises."""
from __future__ import annotations


class BenchError(RuntimeError):
    """A benchmark step failed; the message says which and why."""


def describe_error(e: Exception) -> str:
    """A failed step's message for a report: a BenchError says it; anything else is named."""
    return str(e) if isinstance(e, BenchError) else f"{type(e).__name__}: {e}"
