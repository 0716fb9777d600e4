"""Route token: round trips, every named error, rotation, derived password."""
from __future__ import annotations

import base64
import re
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wire.route_token import (
    MAC_LEN,
    TOKEN_ERROR_REASONS,
    RouteKeyring,
    TokenError,
    decode_token,
    derive_password,
    issue_token,
)

NOW = 1_800_000_000.0
V4 = socket.inet_aton("10.1.2.3")
V6 = socket.inet_pton(socket.AF_INET6, "fd00::42")
ICE_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


@pytest.fixture
def keyring() -> RouteKeyring:
    return RouteKeyring({7: b"k" * 32}, active_key_id=7)


def reason(fn) -> str:
    with pytest.raises(TokenError) as info:
        fn()
    assert info.value.reason in TOKEN_ERROR_REASONS
    return info.value.reason


def test_ipv4_round_trip_is_short_and_ice_chars(keyring: RouteKeyring) -> None:
    ufrag = issue_token(keyring, V4, 7000, NOW)
    assert len(ufrag) == 38 and set(ufrag) <= ICE_CHARS
    token = decode_token(keyring, ufrag, NOW + 1)
    assert (token.key_id, token.target_ip, token.target_port, token.cluster) == (7, V4, 7000, None)
    assert token.target_host == "10.1.2.3" and token.issued_at == int(NOW)


def test_ipv6_with_cluster_round_trip(keyring: RouteKeyring) -> None:
    ufrag = issue_token(keyring, V6, 443, NOW, cluster=9)
    assert 4 <= len(ufrag) <= 256 and set(ufrag) <= ICE_CHARS
    token = decode_token(keyring, ufrag, NOW, cluster=9)
    assert token.target_host == "fd00::42" and token.cluster == 9


def test_nonce_makes_tokens_unique(keyring: RouteKeyring) -> None:
    assert len({issue_token(keyring, V4, 7000, NOW) for _ in range(200)}) == 200


def test_password_is_derived_deterministically(keyring: RouteKeyring) -> None:
    ufrag = issue_token(keyring, V4, 7000, NOW)
    pwd = derive_password(keyring, ufrag)
    assert 22 <= len(pwd) <= 256 and set(pwd) <= ICE_CHARS and "=" not in pwd
    assert pwd == derive_password(RouteKeyring({7: b"k" * 32}, 7), ufrag)
    assert pwd != derive_password(RouteKeyring({7: b"j" * 32}, 7), ufrag)
    assert pwd != derive_password(keyring, issue_token(keyring, V4, 7000, NOW))


def test_bad_length(keyring: RouteKeyring) -> None:
    ufrag = issue_token(keyring, V4, 7000, NOW)
    assert reason(lambda: decode_token(keyring, ufrag[:-4], NOW)) == "token_bad_length"
    assert reason(lambda: decode_token(keyring, "abcd", NOW)) == "token_bad_length"
    assert reason(lambda: decode_token(keyring, ufrag + "A", NOW)) == "token_bad_length"  # len % 4 == 1


def test_bad_charset(keyring: RouteKeyring) -> None:
    ufrag = issue_token(keyring, V4, 7000, NOW)
    assert reason(lambda: decode_token(keyring, ufrag[:-1] + "-", NOW)) == "token_bad_charset"
    assert reason(lambda: decode_token(keyring, ufrag[:-1] + "é", NOW)) == "token_bad_charset"


def test_non_canonical_base64_is_refused(keyring: RouteKeyring) -> None:
    ufrag = issue_token(keyring, V4, 7000, NOW)  # 28 bytes: the last char carries 4 unused bits
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    twin = ufrag[:-1] + alphabet[alphabet.index(ufrag[-1]) ^ 1]
    assert base64.b64decode(twin + "==") == base64.b64decode(ufrag + "==")
    assert reason(lambda: decode_token(keyring, twin, NOW)) == "token_bad_charset"


def test_bad_version(keyring: RouteKeyring) -> None:
    raw = bytearray(base64.b64decode(issue_token(keyring, V4, 7000, NOW) + "=="))
    raw[0] = (2 << 4) | (raw[0] & 0xF)
    forged = base64.b64encode(bytes(raw)).rstrip(b"=").decode()
    assert reason(lambda: decode_token(keyring, forged, NOW)) == "token_bad_version"


def test_unknown_key_and_rotation() -> None:
    old = RouteKeyring({1: b"a" * 32}, 1)
    both = RouteKeyring({1: b"a" * 32, 2: b"b" * 32}, 2)
    new_only = RouteKeyring({2: b"b" * 32}, 2)
    from_old = issue_token(old, V4, 7000, NOW)
    from_new = issue_token(both, V4, 7000, NOW)
    assert decode_token(both, from_old, NOW).key_id == 1  # old sessions keep working during rotation
    assert decode_token(new_only, from_new, NOW).key_id == 2
    assert reason(lambda: decode_token(new_only, from_old, NOW)) == "token_unknown_key"
    assert reason(lambda: derive_password(new_only, from_old)) == "token_unknown_key"
    assert derive_password(both, from_old) == derive_password(old, from_old)


def test_bad_mac_on_any_flipped_bit(keyring: RouteKeyring) -> None:
    raw = base64.b64decode(issue_token(keyring, V4, 7000, NOW) + "==")
    for index in range(2, len(raw)):  # past version/key id, whose errors are named differently
        tampered = bytearray(raw)
        tampered[index] ^= 0x01
        text = base64.b64encode(bytes(tampered)).rstrip(b"=").decode()
        assert reason(lambda text=text: decode_token(keyring, text, NOW)) == "token_bad_mac", index
    wrong_secret = RouteKeyring({7: b"z" * 32}, 7)
    assert reason(lambda: decode_token(wrong_secret, issue_token(keyring, V4, 1, NOW), NOW)) == "token_bad_mac"


def test_expiry_and_future(keyring: RouteKeyring) -> None:
    ufrag = issue_token(keyring, V4, 7000, NOW)
    assert decode_token(keyring, ufrag, NOW + 299, max_age=300).target_port == 7000
    assert reason(lambda: decode_token(keyring, ufrag, NOW + 301, max_age=300)) == "token_expired"
    assert decode_token(keyring, ufrag, NOW + 10_000, max_age=None).target_port == 7000  # known session
    assert reason(lambda: decode_token(keyring, ufrag, NOW - 120)) == "token_not_yet_valid"


def test_wrong_cluster(keyring: RouteKeyring) -> None:
    ufrag = issue_token(keyring, V4, 7000, NOW, cluster=3)
    assert reason(lambda: decode_token(keyring, ufrag, NOW, cluster=4)) == "token_wrong_cluster"
    assert reason(lambda: decode_token(keyring, ufrag, NOW)) == "token_wrong_cluster"
    assert decode_token(keyring, issue_token(keyring, V4, 7000, NOW), NOW, cluster=4).cluster is None


def test_keyring_validation() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        RouteKeyring({1: b"short"}, 1)
    with pytest.raises(ValueError, match="active key id 2"):
        RouteKeyring({1: b"a" * 16}, 2)
    with pytest.raises(ValueError, match=re.escape("outside 0..255")):
        RouteKeyring({256: b"a" * 16}, 256)


@settings(max_examples=300, deadline=None)
@given(
    ip=st.one_of(st.binary(min_size=4, max_size=4), st.binary(min_size=16, max_size=16)),
    port=st.integers(1, 65535),
    cluster=st.one_of(st.none(), st.integers(0, 65535)),
)
def test_round_trip_property(ip: bytes, port: int, cluster: int | None) -> None:
    keyring = RouteKeyring({3: b"s" * 20}, 3)
    token = decode_token(keyring, issue_token(keyring, ip, port, NOW, cluster=cluster), NOW, cluster=cluster)
    assert (token.target_ip, token.target_port, token.cluster) == (ip, port, cluster)


@settings(max_examples=1000, deadline=None)
@given(st.text(max_size=80))
def test_arbitrary_text_only_raises_token_error(text: str) -> None:
    keyring = RouteKeyring({3: b"s" * 20}, 3)
    with pytest.raises(TokenError):
        decode_token(keyring, text, NOW)


def test_mac_is_truncated_to_80_bits() -> None:
    assert MAC_LEN * 8 == 80
