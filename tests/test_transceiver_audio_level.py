"""transceiver/audio_level.py: the numpy audio level equals aiortc's own, and is what aiortc calls."""

from __future__ import annotations

import inspect
import time

import aiortc.rtcrtpsender
import aiortc.rtp
import numpy as np
import pytest
from av import AudioFrame

from transceiver import audio_level


def make_frame(samples: np.ndarray, layout: str) -> AudioFrame:
    frame = AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout=layout)
    frame.sample_rate = 48000
    return frame


def random_frames(seed: int) -> list[AudioFrame]:
    rng = np.random.default_rng(seed)
    frames = []
    for layout, channels in (("mono", 1), ("stereo", 2)):
        for samples in (160, 480, 960, 1920):
            for amplitude in (0, 1, 3, 100, 3000, 20000, 32767):
                data = rng.integers(-amplitude, amplitude + 1, samples * channels, dtype=np.int64)
                frames.append(make_frame(np.clip(data, -32768, 32767).astype(np.int16), layout))
    # Full-scale extremes, including -32768, which the 32767 reference makes > 0 dBov.
    frames.append(make_frame(np.full(960, -32768, np.int16), "mono"))
    frames.append(make_frame(np.full(1920, 32767, np.int16), "stereo"))
    # A sine around the -20 dBov mark, where rounding flips are likeliest.
    t = np.arange(960)
    frames.append(make_frame((3276.7 * np.sqrt(2) * np.sin(2 * np.pi * 440 * t / 48000)).astype(np.int16), "mono"))
    return frames


@pytest.mark.parametrize("seed", range(5))
def test_equals_aiortc_original(seed: int) -> None:
    for frame in random_frames(seed):
        assert audio_level.compute_audio_level_dbov(frame) == audio_level.ORIGINAL(frame)


def test_silence_and_full_scale() -> None:
    assert audio_level.compute_audio_level_dbov(make_frame(np.zeros(960, np.int16), "mono")) == -127
    assert audio_level.compute_audio_level_dbov(make_frame(np.full(960, 32767, np.int16), "mono")) == 0


def test_installed_where_the_sender_looks() -> None:
    import transceiver.session  # noqa: F401  (installs at import)

    assert aiortc.rtp.compute_audio_level_dbov is audio_level.compute_audio_level_dbov
    assert audio_level.ORIGINAL is not audio_level.compute_audio_level_dbov
    # The sender calls it through the module, so the patch applies to every sender.
    assert "rtp.compute_audio_level_dbov(" in inspect.getsource(aiortc.rtcrtpsender.RTCRtpSender._next_encoded_frame)


def test_faster_than_the_original() -> None:
    frame = make_frame(np.random.default_rng(1).integers(-3000, 3000, 1920).astype(np.int16), "stereo")

    def best_of(fn, rounds: int = 5, calls: int = 20) -> float:  # type: ignore[no-untyped-def]
        best = float("inf")
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(calls):
                fn(frame)
            best = min(best, (time.perf_counter() - start) / calls)
        return best

    fast, slow = best_of(audio_level.compute_audio_level_dbov), best_of(audio_level.ORIGINAL)
    assert fast * 5 < slow, (fast, slow)
