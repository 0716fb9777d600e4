"""relay/housekeeping_steps.py: units run in steps of bounded wall time, each step's CPU time
counted in the histogram /metrics renders. Fake clocks: sans-IO."""

from __future__ import annotations

import re
from collections.abc import Iterator

from relay.housekeeping_steps import STEP_BUCKET_COUNTERS, StepRunner
from relay.metrics import COUNTER_INDEX, WORKER_COUNTERS, render_prometheus


class Clock:
    """Wall and CPU time that advance only when a unit runs."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def units(clock: Clock, costs_us: list[float]) -> Iterator[None]:
    for cost in costs_us:
        clock.now += cost / 1e6
        yield


def run(costs_us: list[float], step_us: float = 20.0) -> tuple[list[int], list[int]]:
    """(units per step, the worker's counter row after the tick)."""
    clock = Clock()
    counts = [0] * len(WORKER_COUNTERS)
    runner = StepRunner(counts, COUNTER_INDEX, step_s=step_us / 1e6, wall=clock, cpu=clock)
    work = units(clock, costs_us)
    per_step: list[int] = []
    ran = 0
    more = True
    while more:
        before = clock.now
        more = runner.step(work)
        per_step.append(round((clock.now - before) * 1e6))
        ran += 1
        assert ran < 100
    return per_step, counts


def test_a_step_runs_units_until_its_time_is_spent_then_yields() -> None:
    per_step, _ = run([5, 5, 5, 5, 5, 30, 5, 300, 2])
    # 5+5+5+5 reaches 20 µs; 5+30 passes it; 5+300; 2 then the end
    assert per_step == [20, 35, 305, 2]


def test_every_step_is_counted_by_its_cpu_time() -> None:
    _, counts = run([5, 5, 5, 5, 5, 30, 5, 300, 2])
    row = dict(zip(WORKER_COUNTERS, counts))
    assert row["housekeeping_step_max_us"] == 305
    assert row["housekeeping_step_us_total"] == 20 + 35 + 305 + 2
    assert [row[name] for name in STEP_BUCKET_COUNTERS] == [2, 1, 0, 0, 1, 0]  # <=25, <=50, ..., <=400, more


def test_metrics_render_the_steps_as_a_cumulative_histogram() -> None:
    _, counts = run([30, 30, 500, 10])
    text = render_prometheus([dict(zip(WORKER_COUNTERS, counts))])
    buckets = dict(re.findall(r'rtcrelay_housekeeping_step_seconds_bucket\{worker="0",le="([^"]+)"\} (\d+)', text))
    assert buckets == {"2.5e-05": "1", "5e-05": "3", "0.0001": "3", "0.0002": "3", "0.0004": "3", "+Inf": "4"}
    assert 'rtcrelay_housekeeping_step_seconds_count{worker="0"} 4' in text
    assert 'rtcrelay_housekeeping_step_seconds_sum{worker="0"} 0.00057' in text
    assert "# TYPE rtcrelay_housekeeping_step_seconds histogram" in text
