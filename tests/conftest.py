"""Suite-wide options: `--long` selects the long stress/soak variants (deselected by default)."""
from __future__ import annotations

import pytest

# The network-namespace fixture (topology) for the tests that build their own networks.
pytest_plugins = ["netns"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long", action="store_true", default=False, help="also run tests marked long (stress/soak)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Deselect (not skip) long tests so a default run reports only what it really ran.
    if config.getoption("--long"):
        return
    kept = [item for item in items if "long" not in item.keywords]
    dropped = [item for item in items if "long" in item.keywords]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
