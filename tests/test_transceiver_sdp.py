"""transceiver/sdp.py: offer shape checks and candidate stripping, on plain text."""

from __future__ import annotations

import pytest

from transceiver.sdp import MAX_OFFER_BYTES, NotBundledError, OfferError, prepare_offer

OFFER = """v=0
o=- 1 1 IN IP4 0.0.0.0
s=-
t=0 0
a=group:BUNDLE 0 1
a=msid-semantic:WMS *
m=audio 50000 UDP/TLS/RTP/SAVPF 96
c=IN IP4 127.0.0.1
a=sendrecv
a=mid:0
a=rtcp-mux
a=rtpmap:96 opus/48000/2
a=candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host
a=candidate:2 1 udp 2130706431 5b2c9f3e-1111-2222-3333-444455556666.local 50001 typ host
a=end-of-candidates
a=ice-ufrag:abcd
a=ice-pwd:abcdefghijklmnopqrstuvwxyz
a=fingerprint:sha-256 AA:BB
a=setup:actpass
m=application 50000 UDP/DTLS/SCTP webrtc-datachannel
c=IN IP4 127.0.0.1
a=mid:1
a=sctp-port:5000
a=candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host
a=end-of-candidates
a=ice-ufrag:abcd
a=ice-pwd:abcdefghijklmnopqrstuvwxyz
a=fingerprint:sha-256 AA:BB
a=setup:actpass
"""


def crlf(text: str) -> str:
    return text.replace("\n", "\r\n")


@pytest.mark.parametrize("text", [OFFER, crlf(OFFER)])
def test_strips_candidates_and_end_of_candidates(text: str) -> None:
    out = prepare_offer(text)
    assert "a=candidate" not in out
    assert "end-of-candidates" not in out
    assert ".local" not in out
    assert out.endswith("\r\n") and "\n" not in out.replace("\r\n", "")
    # Everything else is kept, in order.
    kept = [line for line in OFFER.splitlines() if not line.startswith(("a=candidate", "a=end-of-candidates"))]
    assert out.split("\r\n")[:-1] == kept


def test_session_level_ice_credentials_are_enough() -> None:
    text = OFFER.replace("a=ice-ufrag:abcd\na=ice-pwd:abcdefghijklmnopqrstuvwxyz\n", "")
    text = text.replace("a=msid-semantic:WMS *\n", "a=msid-semantic:WMS *\na=ice-ufrag:abcd\na=ice-pwd:abcdefghijklmnopqrstuvwxyz\n")
    assert "a=ice-ufrag" in prepare_offer(text)


def test_audio_only_and_data_channel_only_offers_are_fine() -> None:
    audio_only = OFFER.split("m=application")[0].replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 0")
    assert "m=audio" in prepare_offer(audio_only)
    head, app = OFFER.split("m=audio")[0], "m=application" + OFFER.split("m=application")[1]
    assert "m=application" in prepare_offer(head.replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 1") + app)


def reason(text: str) -> str:
    with pytest.raises(OfferError) as info:
        prepare_offer(text)
    return info.value.reason


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "sdp_empty"),
        ("  \r\n", "sdp_empty"),
        ("hello world", "sdp_malformed"),
        ("\x00\x01\x02binary", "sdp_malformed"),
        ("v=1\r\n", "sdp_malformed"),
        (OFFER.replace("m=audio 50000 UDP/TLS/RTP/SAVPF 96", "m=audio"), "sdp_malformed"),
        (OFFER.replace("m=audio 50000", "m=audio port"), "sdp_malformed"),
        (OFFER.replace("a=sendrecv", "garbage line"), "sdp_malformed"),
        (OFFER.replace("m=audio", "m=video").split("m=application")[0].replace("BUNDLE 0 1", "BUNDLE 0"), "sdp_no_media"),
        ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n", "sdp_no_media"),
        (OFFER.replace("a=mid:1\n", ""), "sdp_no_mid"),
        (OFFER.replace("a=ice-pwd:abcdefghijklmnopqrstuvwxyz\n", "", 1), "sdp_no_ice_credentials"),
        ("v=0\r\n" + "a=x:" + "y" * MAX_OFFER_BYTES, "sdp_too_large"),
    ],
)
def test_named_errors(text: str, expected: str) -> None:
    assert reason(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        OFFER.replace("a=group:BUNDLE 0 1\n", ""),
        OFFER.replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 0"),
        OFFER.replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 0\na=group:BUNDLE 1"),
        OFFER.replace("a=group:BUNDLE 0 1", "a=group:LS 0 1"),
    ],
)
def test_non_bundle_offers_are_refused(text: str) -> None:
    with pytest.raises(NotBundledError) as info:
        prepare_offer(text)
    assert info.value.reason == "sdp_not_bundle"
    assert "BUNDLE" in str(info.value)
