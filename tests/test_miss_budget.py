"""The miss budget (relay/miss_budget.py): new sessions never take more than half a busy
worker's time, and all of an idle one's."""
from __future__ import annotations

import pytest

from relay.miss_budget import MISS_CPU_SHARE, MISS_CREDIT_MAX_S, MISS_SLICE_S, MissBudget


def test_a_slice_is_short_and_the_credit_is_spent() -> None:
    budget = MissBudget(0.0)
    deadline = budget.start(0.0, established=10)
    assert deadline == pytest.approx(MISS_SLICE_S)
    budget.spent(MISS_CREDIT_MAX_S + 0.002)  # a burst overran the credit
    assert budget.start(0.0001, established=20) is None  # calls had traffic: hits only now
    assert budget.wait_s() == pytest.approx((0.002 - 0.0001 * MISS_CPU_SHARE) / MISS_CPU_SHARE, rel=0.05)


def test_the_credit_accrues_at_the_share_and_is_capped() -> None:
    budget = MissBudget(0.0)
    budget.spent(MISS_CREDIT_MAX_S)
    budget.start(1.0, established=1)
    assert budget.credit == pytest.approx(MISS_CREDIT_MAX_S)  # a long pause refills it, no more


def test_a_worker_with_nothing_else_to_do_gives_misses_all_its_time() -> None:
    budget = MissBudget(0.0)
    budget.start(0.0, established=5)
    budget.spent(1.0)
    assert budget.start(0.001, established=5) is not None  # no established datagram since: alone
    assert budget.wait_s() == 0.0
