"""The one error a benchmark step raises."""
from __future__ import annotations


class BenchError(RuntimeError):
    """A benchmark step failed; the message says which and why."""
