"""wire/hmac_fast.py gives hmac.digest's bytes, for every key length around the block size."""

from __future__ import annotations

import hmac
import os

import pytest

from wire.hmac_fast import BLOCK_SIZE, HmacKey, hmac_digest

KEY_LENGTHS = [0, 1, 16, 32, 43, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 200]
MESSAGE_LENGTHS = [0, 1, 40, 55, 56, 64, 100, 1000]


@pytest.mark.parametrize("hash_name", ["sha1", "sha256"])
@pytest.mark.parametrize("key_length", KEY_LENGTHS)
def test_the_same_bytes_as_the_standard_library(hash_name: str, key_length: int) -> None:
    key = os.urandom(key_length)
    prepared = HmacKey(key, hash_name)
    for length in MESSAGE_LENGTHS:
        message = os.urandom(length)
        expected = hmac.digest(key, message, hash_name)
        assert hmac_digest(key, message, hash_name) == expected
        assert prepared.digest(message) == expected
        assert prepared.digest(message) == expected  # (the prepared states are copied, not used up)


def test_rfc_4231_case_2() -> None:
    """RFC 4231 4.3: key "Jefe", "what do ya want for nothing?"."""
    expected = bytes.fromhex("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    assert HmacKey(b"Jefe", "sha256").digest(b"what do ya want for nothing?") == expected
    assert hmac_digest(b"Jefe", b"what do ya want for nothing?", "sha256") == expected


def test_an_unknown_hash_is_refused() -> None:
    with pytest.raises(KeyError):
        hmac_digest(b"k", b"m", "md5")
