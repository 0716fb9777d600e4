"""Voice-grade Opus: the patched encoder makes mono packets, smaller, that decode to the tone."""
from __future__ import annotations

import fractions

import aiortc.codecs
import numpy as np
from aiortc.codecs.opus import OpusDecoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from av import AudioFrame

from transceiver import opus_voice

OPUS = RTCRtpCodecParameters(mimeType="audio/opus", clockRate=48000, channels=2, payloadType=111)


def tone_frames(count: int, layout: str = "stereo") -> list[AudioFrame]:
    frames = []
    channels = 2 if layout == "stereo" else 1
    for n in range(count):
        t = (np.arange(960) + n * 960) / 48000
        mono = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
        data = np.repeat(mono, channels).reshape(1, -1)
        frame = AudioFrame.from_ndarray(data, format="s16", layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = 48000, n * 960, fractions.Fraction(1, 48000)
        frames.append(frame)
    return frames


def encode_all(encoder, frames: list[AudioFrame]) -> list[bytes]:
    packets: list[bytes] = []
    for frame in frames:
        payloads, _ts = encoder.encode(frame)
        packets += payloads
    return packets


def test_install_makes_aiortc_pick_the_voice_encoder() -> None:
    opus_voice.install()
    assert isinstance(aiortc.codecs.get_encoder(OPUS), opus_voice.VoiceOpusEncoder)


def test_voice_packets_are_mono_smaller_and_decode_to_the_tone() -> None:
    frames = tone_frames(50)
    voice = encode_all(opus_voice.VoiceOpusEncoder(), frames)
    stock = encode_all(opus_voice.STOCK(), frames)
    assert len(voice) >= 45
    assert all(packet[0] & 0x04 == 0 for packet in voice), "TOC stereo flag set on a voice packet"
    assert all(packet[0] & 0x04 for packet in stock[5:]), "stock packets should be stereo"
    assert sum(map(len, voice)) < 0.6 * sum(map(len, stock))
    decoder = OpusDecoder()  # aiortc's own, as a browser-side stand-in: stereo output
    rms = []
    for i, packet in enumerate(voice):
        for frame in decoder.decode(JitterFrame(data=packet, timestamp=i * 960)):
            samples = frame.to_ndarray().astype(np.float64)
            rms.append(float(np.sqrt(np.mean(samples * samples))))
    assert max(rms[10:]) > 3000  # the 440 Hz tone at amplitude 8000 comes through (RMS ~5600)
