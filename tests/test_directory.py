"""The route directory's entries, breaker and negative cache (relay/directory.py), without Redis."""
from __future__ import annotations

import pytest

from relay.directory import CircuitBreaker, DirectoryError, NegativeCache, flow_key, open_entry, seal_entry
from wire.route_token import RouteKeyring

KEYS = RouteKeyring({1: b"route-secret-of-the-directory-test"}, 1)
CLIENT = (bytes([198, 51, 100, 7]), 40000)
NOW = 1_800_000_000.0


def test_keys_name_the_cluster_and_the_client() -> None:
    assert flow_key(7, *CLIENT) == "rtcrelay:flow:7:198.51.100.7:40000"
    assert flow_key(None, bytes(15) + b"\x01", 5) == "rtcrelay:flow:-:::1:5"


def test_an_entry_opens_for_its_client_until_it_expires() -> None:
    value = seal_entry(KEYS, CLIENT, "the-ufrag", NOW, ttl_s=60)
    entry = open_entry(KEYS, value, CLIENT, NOW + 59)
    assert (entry.ufrag, entry.learned_at, entry.key_id) == ("the-ufrag", NOW, 1)
    with pytest.raises(DirectoryError, match="directory_expired"):
        open_entry(KEYS, value, CLIENT, NOW + 61)


def test_entries_not_signed_by_us_or_moved_to_another_client_are_refused() -> None:
    value = seal_entry(KEYS, CLIENT, "the-ufrag", NOW, ttl_s=60)
    other_keys = RouteKeyring({1: b"another-deployments-secret-value!!"}, 1)
    with pytest.raises(DirectoryError, match="directory_forged"):
        open_entry(other_keys, value, CLIENT, NOW)
    with pytest.raises(DirectoryError, match="directory_forged"):  # copied to another client's key
        open_entry(KEYS, value, (CLIENT[0], CLIENT[1] + 1), NOW)
    tampered = bytearray(value)
    tampered[-MAC_OFFSET] ^= 1
    with pytest.raises(DirectoryError, match="directory_forged"):
        open_entry(KEYS, bytes(tampered), CLIENT, NOW)
    for junk in (b"", b"x" * 16, b"\x00" * 40):
        with pytest.raises(DirectoryError, match=r"directory_malformed|directory_forged"):
            open_entry(KEYS, junk, CLIENT, NOW)


MAC_OFFSET = 20  # a byte of the body, before the 16-byte MAC


def test_the_breaker_opens_after_failures_and_probes_once_after_a_while() -> None:
    breaker = CircuitBreaker(threshold=3, open_s=5.0)
    for _ in range(3):
        assert breaker.allow(0.0)
        breaker.failed(0.0)
    assert breaker.is_open and not breaker.allow(1.0) and not breaker.allow(4.9)
    assert breaker.allow(5.1)  # one probe
    assert not breaker.allow(5.2)  # ... and only one at a time
    breaker.failed(5.3)
    assert not breaker.allow(6.0)
    assert breaker.allow(10.4)
    breaker.succeeded()
    assert not breaker.is_open and breaker.allow(10.5) and breaker.allow(10.6)


def test_the_negative_cache_forgets_after_its_ttl_and_is_bounded() -> None:
    cache = NegativeCache(capacity=3, ttl_s=2.0)
    cache.add(CLIENT, NOW)
    assert (CLIENT, NOW + 1.9) in cache
    assert (CLIENT, NOW + 2.0) not in cache
    for port in range(10):
        cache.add((CLIENT[0], port), NOW)
    assert len(cache) == 3 and ((CLIENT[0], 9), NOW) in cache and ((CLIENT[0], 0), NOW) not in cache
