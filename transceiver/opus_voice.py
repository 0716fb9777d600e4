"""Voice-grade Opus for outgoing audio: mono at 32 kb/s instead of aiortc's stereo 96 kb/s.

aiortc encodes every call's audio as stereo at 96 kb/s, which a voice call does not use
(browsers themselves send mono around 32 kb/s). Mono halves the samples the encoder reads
and writes; bench/transceiver.py measured about 215 -> 104 us per 20 ms frame. The SDP
still says opus/48000/2, as RFC 7587 requires: every Opus packet's TOC byte says whether it
is mono or stereo, and decoders follow it packet by packet.

``get_encoder`` in aiortc.codecs resolves ``OpusEncoder`` from its module globals at each
call, so replacing that name is enough. Guarded by the aiortc version it was written for.
"""
from __future__ import annotations

import aiortc
import aiortc.codecs
from aiortc.codecs.opus import SAMPLE_RATE, SAMPLES_PER_FRAME, OpusEncoder
from av import AudioResampler

__all__ = ["VOICE_BITRATE", "VoiceOpusEncoder", "install", "STOCK"]

if not aiortc.__version__.startswith("1.16."):
    raise ImportError(
        f"transceiver.opus_voice replaces aiortc.codecs.OpusEncoder of aiortc 1.16.x; "
        f"aiortc {aiortc.__version__} is installed: check OpusEncoder and update the pin"
    )

VOICE_BITRATE = 32_000
STOCK = OpusEncoder


class VoiceOpusEncoder(OpusEncoder):
    """aiortc's Opus encoder, set up for one voice channel (application stays "voip")."""

    def __init__(self) -> None:
        super().__init__()
        # The codec context opens on the first encode, so its parameters can still change.
        self.codec.layout = "mono"
        self.codec.bit_rate = VOICE_BITRATE
        self.resampler = AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE, frame_size=SAMPLES_PER_FRAME)


def install() -> None:
    """Make aiortc's senders encode voice-grade Opus (idempotent)."""
    aiortc.codecs.OpusEncoder = VoiceOpusEncoder
