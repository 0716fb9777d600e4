"""Edge relays' routes to other clusters (relay/cluster_routes.py), without sockets."""
from __future__ import annotations

import collections

import pytest

from relay.cluster_routes import ClusterRoutes, HopTarget, parse_cluster_routes


def test_parse_literals_and_names() -> None:
    routes = parse_cluster_routes({"7": ["10.20.0.5:3479", "[2001:db8::5]:3479", "relays.c7.svc.cluster.local:3479"]})
    assert routes == {7: [HopTarget("10.20.0.5", 3479), HopTarget("2001:db8::5", 3479),
                          HopTarget("relays.c7.svc.cluster.local", 3479)]}
    assert [t.literal for t in routes[7]] == [True, True, False]


@pytest.mark.parametrize(("raw", "message"), [
    ({"x": ["10.0.0.1:1"]}, r"cluster_routes.x`: a cluster id"),
    ({"70000": ["10.0.0.1:1"]}, "0 to 65535"),
    ({"7": []}, "at least one relay"),
    ({"7": ["10.0.0.1"]}, r"cluster_routes.7\[0\]"),
    ({"7": ["relays..svc:3479"]}, "is not host:port"),
    ({"7": ["relays.svc:99999"]}, "is not host:port"),
])
def test_bad_routes_name_the_entry(raw: dict[str, list[str]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_cluster_routes(raw)


def test_a_session_goes_to_the_same_cluster_relay_from_every_edge() -> None:
    targets = [f"10.20.0.{i}:3479" for i in range(1, 6)]
    edge_a = ClusterRoutes(parse_cluster_routes({"7": targets}))
    edge_b = ClusterRoutes(parse_cluster_routes({"7": list(reversed(targets))}))  # listed in another order
    ufrags = [f"session-{i}" for i in range(500)]
    assert all(edge_a.choose(7, u) == edge_b.choose(7, u) for u in ufrags)
    spread = collections.Counter(edge_a.choose(7, u) for u in ufrags)
    assert len(spread) == 5 and min(spread.values()) > 500 / 5 / 2  # every relay gets its share
    assert edge_a.choose(8, "session-1") is None  # no route: never forwarded


def test_a_relay_that_goes_away_moves_only_its_own_sessions() -> None:
    routes = ClusterRoutes(parse_cluster_routes({"7": [f"10.20.0.{i}:3479" for i in range(1, 6)]}))
    ufrags = [f"session-{i}" for i in range(500)]
    before = {u: routes.choose(7, u) for u in ufrags}
    gone = ("10.20.0.3", 3479)
    after = {u: routes.choose(7, u, frozenset({gone})) for u in ufrags}
    assert all(after[u] == before[u] for u in ufrags if before[u] != gone)
    assert all(after[u] != gone for u in ufrags)
    everyone_gone = frozenset(routes.addresses(7))
    assert routes.choose(7, "session-1", everyone_gone) is None


def test_names_are_resolved_and_a_failed_lookup_keeps_the_last_answer() -> None:
    routes = ClusterRoutes(parse_cluster_routes({"7": ["10.20.0.1:3479", "relays.c7:3479"]}))
    name = HopTarget("relays.c7", 3479)
    assert routes.names() == [name]
    assert routes.addresses(7) == [("10.20.0.1", 3479)]  # before the first answer: the literals
    routes.update({name: ["10.20.1.1", "10.20.1.2"]})
    assert routes.addresses(7) == [("10.20.0.1", 3479), ("10.20.1.1", 3479), ("10.20.1.2", 3479)]
    routes.update({name: []})  # DNS trouble
    assert ("10.20.1.2", 3479) in routes.addresses(7)
    routes.update({name: ["10.20.1.3"]})  # pods replaced
    assert routes.addresses(7) == [("10.20.0.1", 3479), ("10.20.1.3", 3479)]
