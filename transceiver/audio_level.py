"""A numpy version of aiortc's per-frame audio level (RFC 6465), patched in once.

aiortc's ``RTCRtpSender`` computes the audio-level header extension of every outgoing audio
frame with ``aiortc.rtp.compute_audio_level_dbov``, a pure-Python loop over every sample
(~1.5 ms per 20 ms stereo frame: a third of an echo call's CPU). The sender looks the
function up on the module at each call, so replacing the module attribute is enough.

The result is bit-for-bit aiortc's: the sum of squares of int16 samples is an integer below
2**53, which aiortc's float accumulation and numpy's int64 sum both hold exactly; the rest is
the same float arithmetic. ``tests/test_transceiver_audio_level.py`` holds them to each other.
"""

from __future__ import annotations

import math

import aiortc
import aiortc.rtp
import numpy as np
from av import AudioFrame

__all__ = ["compute_audio_level_dbov", "install", "ORIGINAL"]

if not aiortc.__version__.startswith("1.16."):
    raise ImportError(
        f"transceiver.audio_level replaces aiortc.rtp.compute_audio_level_dbov of aiortc 1.16.x; "
        f"aiortc {aiortc.__version__} is installed: check that function and update the pin"
    )

#: aiortc's own implementation, kept for the equivalence test.
ORIGINAL = aiortc.rtp.compute_audio_level_dbov

_MAX_SAMPLE_VALUE = 32767
_MIN_AUDIO_LEVEL = -127


def compute_audio_level_dbov(frame: AudioFrame) -> int:
    """RFC 6465 Appendix A level of an s16 frame, in -dBov (0 loudest, -127 silent)."""
    # Like aiortc: every int16 of plane 0 (all channels, packed), divided by samples per channel.
    samples = np.frombuffer(frame.planes[0], dtype=np.int16).astype(np.int64)
    energy = float(np.dot(samples, samples))
    rms = math.sqrt(energy / (frame.samples * _MAX_SAMPLE_VALUE * _MAX_SAMPLE_VALUE))
    db = min(max(20 * math.log10(rms), _MIN_AUDIO_LEVEL), 0) if rms > 0 else _MIN_AUDIO_LEVEL
    return round(db)


def install() -> None:
    """Make aiortc's senders use the vectorised level (idempotent)."""
    aiortc.rtp.compute_audio_level_dbov = compute_audio_level_dbov
