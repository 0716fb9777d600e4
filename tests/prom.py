"""/metrics as Prometheus itself reads it: the official client's text parser (a format error
raises here), samples by name and labels."""
from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample: (name, its labels) -> value."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def sample(text: str, name: str, **labels: str) -> float:
    """One sample's value (KeyError if the text has no such sample)."""
    return samples(text)[(name, frozenset(labels.items()))]


def families(text: str) -> dict[str, str]:
    """Metric family name -> type (counter, gauge, histogram, ...)."""
    return {family.name: family.type for family in text_string_to_metric_families(text)}
