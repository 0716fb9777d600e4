"""daemon.networks: the one allowed-networks check both tunnel ends use."""

import pytest

from daemon.networks import VERDICT_CACHE_MAX, AllowedNetworks


def test_ipv4_mapped_and_scoped_addresses_are_judged_by_their_address() -> None:
    allowed = AllowedNetworks.parse(["10.0.0.0/8", "fe80::/10"], "relay_networks")
    assert allowed.allows("10.1.2.3")
    assert allowed.allows("::ffff:10.1.2.3")  # IPv4 relay seen by a dual-stack socket
    assert allowed.allows("fe80::1%eth0")
    assert not allowed.allows("11.0.0.1")
    assert not allowed.allows("::ffff:11.0.0.1")
    # packed, as the relay's sockaddr keys carry addresses
    assert allowed.allows(bytes([10, 1, 2, 3]))
    assert allowed.allows(bytes(10) + b"\xff\xff" + bytes([10, 1, 2, 3]))
    assert not allowed.allows(bytes([11, 0, 0, 1]))


def test_bad_network_names_the_key() -> None:
    with pytest.raises(ValueError, match="`transceiver_networks`: 'not-a-net'"):
        AllowedNetworks.parse(["127.0.0.0/8", "not-a-net"], "transceiver_networks")


def test_verdict_cache_is_bounded_and_agrees_with_allows() -> None:
    allowed = AllowedNetworks.parse(["127.0.0.0/8"], "k")
    for i in range(VERDICT_CACHE_MAX + 10):
        host = f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        assert allowed.verdict(host, host) is False
    assert len(allowed.verdicts) <= VERDICT_CACHE_MAX
    assert allowed.verdict(b"any key form", "127.0.0.1") is True
    assert allowed.verdicts[b"any key form"] is True
