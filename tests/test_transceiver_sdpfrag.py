"""transceiver/sdpfrag.py: RFC 8840 fragments as WHIP's PATCH carries them."""

from __future__ import annotations

import pytest

from transceiver.sdpfrag import FragmentError, build_answer_fragment, parse_fragment

CHROMIUM_RESTART = (
    "a=ice-ufrag:EsAw\r\n"
    "a=ice-pwd:P2uYro0UCOQ4zxjKXaWCBui1\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"
    "a=mid:0\r\n"
    "a=candidate:1387637174 1 udp 2122260223 192.0.2.1 61764 typ host generation 0 ufrag EsAw\r\n"
    "a=end-of-candidates\r\n"
)


def test_a_restart_fragment() -> None:
    frag = parse_fragment(CHROMIUM_RESTART)
    assert frag.credentials == ("EsAw", "P2uYro0UCOQ4zxjKXaWCBui1")
    assert (frag.media, frag.mid, frag.end_of_candidates) == ("m=audio 9 UDP/TLS/RTP/SAVPF 111", "0", True)
    assert frag.candidates == ["candidate:1387637174 1 udp 2122260223 192.0.2.1 61764 typ host generation 0 ufrag EsAw"]
    answer = build_answer_fragment(frag, "Srv1", "S" * 22, ["candidate:1 1 udp 2130706431 203.0.113.7 3478 typ host"])
    assert answer.split("\r\n") == [
        "a=ice-ufrag:Srv1", f"a=ice-pwd:{'S' * 22}", "m=audio 9 UDP/TLS/RTP/SAVPF 111", "a=mid:0",
        "a=candidate:1 1 udp 2130706431 203.0.113.7 3478 typ host", "a=end-of-candidates", "",
    ]
    assert parse_fragment(answer).credentials == ("Srv1", "S" * 22)


def test_a_trickle_fragment_has_no_credentials() -> None:
    frag = parse_fragment("a=candidate:1 1 udp 1 192.0.2.1 1 typ host\na=end-of-candidates\n")
    assert frag.credentials is None and len(frag.candidates) == 1


@pytest.mark.parametrize("text, why", [
    ("v=0\r\n", "not an SDP fragment line"),
    ("a=ice-ufrag:abc\r\na=ice-pwd:" + "p" * 22 + "\r\n", "4-256"),
    ("a=ice-ufrag:abcd\r\na=ice-pwd:short\r\n", "22-256"),
    ("a=ice-ufrag:abcd\r\n", "together"),
    ("a=ice-ufrag:ab cd\r\na=ice-pwd:" + "p" * 22 + "\r\n", "4-256"),
])
def test_bad_fragments_say_why(text: str, why: str) -> None:
    with pytest.raises(FragmentError, match=why):
        parse_fragment(text)
