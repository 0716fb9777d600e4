"""The Grafana dashboard (deploy/grafana/rtcrelay.json) asks only for what the services export:
every metric a query names, every label it matches or groups by, every label value it matches
exactly, is in the /metrics of a real relay and a real transceiver (`rtcrelay up`, one call
made), as parsed by the official Prometheus client's text parser."""
from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prom import families
from prometheus_client.parser import text_string_to_metric_families
from up_process import run_up

from cli.call_client import ReconnectingCall

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "rtcrelay.json"
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped sample
METRIC = re.compile(r"\brtcrelay_[a-z0-9_]+\b")
SELECTOR = re.compile(r"\b(rtcrelay_[a-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """/metrics of the relay, a transceiver and up's front, after one call."""
    for up in run_up(tmp_path_factory.mktemp("dash"), transceivers=1):
        backend = re.search(r"front for .*?(http://127\.0\.0\.1:\d+)", up.log()).group(1)  # type: ignore[union-attr]

        async def one_call(front: str) -> None:
            import aioice.ice

            aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]
            call = ReconnectingCall(f"{front}/v1/sessions")
            try:
                await call.start()
                for _ in range(100):
                    if len(call.arrivals) > 25:
                        break
                    await asyncio.sleep(0.05)
                assert len(call.arrivals) > 25
            finally:
                await call.close()

        asyncio.run(asyncio.wait_for(one_call(up.front), 60))
        yield {"relay": _get(f"http://127.0.0.1:{up.ports['--admin-port']}/metrics"),
               "transceiver": _get(f"{backend}/metrics"), "front": _get(f"{up.front}/metrics")}


def _labels_by_sample(texts: list[str]) -> dict[str, list[dict[str, str]]]:
    """Sample name (with its _total/_bucket/... suffix) -> the label sets it was exported with."""
    out: dict[str, list[dict[str, str]]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out.setdefault(s.name, []).append(dict(s.labels))
    return out


def _queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        out += [(panel["title"], target["expr"]) for target in panel["targets"]]
    return out


def test_both_services_metrics_parse_as_prometheus_text(exported: dict[str, str]) -> None:
    relay, transceiver = families(exported["relay"]), families(exported["transceiver"])
    assert relay["rtcrelay_packets"] == "counter" and relay["rtcrelay_flows"] == "gauge"
    assert transceiver["rtcrelay_transceiver_setup_seconds"] == "histogram"
    assert transceiver["rtcrelay_transceiver_rtp_packets"] == "counter"
    assert families(exported["front"]).keys() == transceiver.keys()  # up's front sums, keeps every family


def test_every_dashboard_query_names_what_the_services_export(exported: dict[str, str]) -> None:
    labels = _labels_by_sample([exported["relay"], exported["transceiver"]])
    queries = _queries()
    assert len(queries) >= 20
    named: set[str] = set()
    for title, expr in queries:
        names = set(METRIC.findall(expr))
        assert names, f"{title}: {expr} names no rtcrelay metric"
        named |= names
        missing = names - labels.keys()
        assert not missing, f"{title}: {sorted(missing)} not exported ({expr})"
        for name, matchers in SELECTOR.findall(expr):
            for key, op, value in MATCHER.findall(matchers):
                if key in TARGET_LABELS:
                    continue
                values = {sample.get(key) for sample in labels[name]} - {None}
                assert values, f"{title}: {name} has no label {key!r}"
                if op == "=":
                    assert value in values, f"{title}: {name}{{{key}={value!r}}} matches nothing of {sorted(values)}"
                elif op == "=~":
                    assert any(re.fullmatch(value, v) for v in values), f"{title}: {key}=~{value!r} matches nothing"
        for group in GROUPING.findall(expr):
            for key in (k.strip() for k in group.split(",") if k.strip()):
                if key in TARGET_LABELS:
                    continue
                assert any(key in sample for name in names for sample in labels[name]), \
                    f"{title}: no metric of {sorted(names)} has the label {key!r} it groups by"
    # The dashboard covers what an operator needs: drops by reason, table fill, setup, audio loss.
    for needed in ("rtcrelay_drops_total", "rtcrelay_table", "rtcrelay_transceiver_setup_seconds_bucket",
                   "rtcrelay_transceiver_rtp_lost_total", "rtcrelay_flows_learned_total"):
        assert needed in named, needed


def test_a_query_for_a_metric_nobody_exports_is_caught(exported: dict[str, str]) -> None:
    """The check above can fail: a renamed metric or label value is reported."""
    labels = _labels_by_sample([exported["relay"]])
    assert "rtcrelay_packets_total" in labels and "rtcrelay_packet_total" not in labels
    assert "flow_limit" in {s.get("field") for s in labels["rtcrelay_table"]}
    assert "flows_limit" not in {s.get("field") for s in labels["rtcrelay_table"]}
