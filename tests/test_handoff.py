"""A moved call keeps its pipeline's state: sealed by the old session, carried by the client,
opened by the new one (transceiver/handoff.py, Pipeline.handoff/resume)."""
from __future__ import annotations

import asyncio
import base64

import pytest
from av import AudioFrame
from test_transceiver_calls import KEYRING, SDP, Harness, loopback_client, run  # noqa: F401 (fixture)
from webrtc_peer import Client, wait_for

from cli.call_client import ReconnectingCall
from transceiver.handoff import MAX_STATE_BYTES, HandoffError, open_state, seal_state
from transceiver.pipeline import EchoPipeline
from transceiver.session import move_interval
from wire.route_token import RouteKeyring

NOW = 1_800_000_000.0


# -- the token ---------------------------------------------------------------------------------


def test_a_sealed_state_opens_to_the_same_bytes_until_it_expires() -> None:
    token = seal_state(KEYRING, b"conversation 42", NOW, ttl_s=40)
    assert open_state(KEYRING, token, NOW + 39) == b"conversation 42"
    with pytest.raises(HandoffError, match="handoff_expired"):
        open_state(KEYRING, token, NOW + 41)


def test_an_altered_or_foreign_state_is_refused() -> None:
    token = seal_state(KEYRING, b"x" * 100, NOW, ttl_s=40)
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[10] ^= 1  # one bit of the state
    altered = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    with pytest.raises(HandoffError, match="handoff_forged"):
        open_state(KEYRING, altered, NOW)
    other = RouteKeyring({1: b"another-deployments-route-secret!!"}, 1)
    with pytest.raises(HandoffError, match="handoff_forged"):
        open_state(other, token, NOW)
    unknown = RouteKeyring({7: b"another-deployments-route-secret!!"}, 7)
    with pytest.raises(HandoffError, match="handoff_unknown_key"):
        open_state(unknown, token, NOW)


@pytest.mark.parametrize("token", ["", "!!!!", "AAAA", "A" * 8000])
def test_malformed_tokens_are_named(token: str) -> None:
    with pytest.raises(HandoffError, match="handoff_malformed"):
        open_state(KEYRING, token, NOW)


def test_a_state_too_large_for_a_header_is_refused_when_sealed() -> None:
    seal_state(KEYRING, b"x" * MAX_STATE_BYTES, NOW, ttl_s=1)
    with pytest.raises(ValueError, match="at most"):
        seal_state(KEYRING, b"x" * (MAX_STATE_BYTES + 1), NOW, ttl_s=1)


# -- a call that moves --------------------------------------------------------------------------


class CountingPipeline(EchoPipeline):
    """Echo, and count the caller's audio frames across moves (its 'conversation')."""

    def __init__(self) -> None:
        self.frames = 0
        self.resumed_from: int | None = None

    async def resume(self, state: bytes) -> None:
        self.resumed_from = self.frames = int(state)

    async def on_audio_frame(self, frame: AudioFrame) -> None:
        self.frames += 1
        await super().on_audio_frame(frame)

    async def handoff(self) -> bytes | None:
        return str(self.frames).encode()


def test_a_moved_call_resumes_its_pipeline_state_on_the_new_session() -> None:
    async def main() -> None:
        async with Harness(pipeline=CountingPipeline) as h:
            call = ReconnectingCall(h.url())
            try:
                await call.start()
                await wait_for(lambda: len(call.arrivals) > 25, 10, "audio on the call")
                (old,) = h.manager.sessions.values()
                assert await old.ask_to_migrate("test", 10.0)
                await wait_for(lambda: call.migrations == 1, 15, "the call to move")
                await wait_for(old.closed.is_set, 5, "the old session to be hung up")
                (new,) = h.manager.sessions.values()
                assert isinstance(new.pipeline, CountingPipeline) and isinstance(old.pipeline, CountingPipeline)
                assert new.pipeline.resumed_from is not None and new.pipeline.resumed_from >= 25
                assert new.pipeline.resumed_from <= old.pipeline.frames
                arrivals = len(call.arrivals)
                await wait_for(lambda: len(call.arrivals) > arrivals + 10, 5, "audio on the new call")
                metrics = await h.metrics()
                assert 'rtcrelay_transceiver_handoffs_total{direction="sealed"} 1' in metrics
                assert 'rtcrelay_transceiver_handoffs_total{direction="resumed"} 1' in metrics
            finally:
                await call.close()

    run(main)


def test_an_offer_with_a_forged_handoff_is_refused_with_its_reason() -> None:
    async def main() -> None:
        async with Harness() as h:
            token = seal_state(RouteKeyring({1: b"another-deployments-route-secret!!"}, 1), b"x", NOW, 40)
            client = Client()
            h.clients.append(client)
            status, _, text = await h.post(await client.offer(), {**SDP, "Rtcrelay-Handoff": token})
            assert status == 400 and text.startswith("handoff_forged"), text
            assert not h.manager.sessions
            assert 'rtcrelay_transceiver_offers_rejected_total{reason="handoff_forged"} 1' in await h.metrics()

    run(main)


def test_a_failing_handoff_still_moves_the_call() -> None:
    class Broken(EchoPipeline):
        async def handoff(self) -> bytes | None:
            raise RuntimeError("the backend is down")

    async def main() -> None:
        async with Harness(pipeline=Broken) as h:
            call = ReconnectingCall(h.url())
            try:
                await call.start()
                (old,) = h.manager.sessions.values()
                await wait_for(lambda: old.control is not None and old.control.readyState == "open", 10, "control channel")
                assert await old.ask_to_migrate("test", 10.0)
                await wait_for(lambda: call.migrations == 1, 15, "the call to move")
            finally:
                await call.close()

    run(main)


def test_drain_asks_calls_to_move_at_its_pace_and_within_half_the_deadline() -> None:
    async def main() -> None:
        async with Harness(drain_deadline=6.0, drain_move_rate=2.0) as h:
            calls = [ReconnectingCall(h.url()) for _ in range(3)]
            try:
                for call in calls:
                    await call.start()
                sessions = list(h.manager.sessions.values())
                await wait_for(lambda: all(s.control is not None and s.control.readyState == "open" for s in sessions),
                               10, "every control channel open")
                drain = asyncio.ensure_future(h.manager.drain(6.0, move_rate=2.0))
                await asyncio.sleep(0.25)
                assert h.manager.metrics.migrations_asked == 1  # one at once, then one per 0.5 s
                await asyncio.sleep(0.5)
                assert h.manager.metrics.migrations_asked == 2
                await wait_for(lambda: h.manager.metrics.migrations_asked == 3, 2, "the third ask")
                drain.cancel()
            finally:
                for call in calls:
                    await call.close()

    run(main)


def test_the_drain_pace_is_its_rate_unless_half_the_deadline_is_too_short() -> None:
    assert move_interval(10, 30.0, 20.0) == pytest.approx(0.05)
    assert move_interval(1000, 30.0, 20.0) == pytest.approx(0.015)  # 1000 calls in 15 s
    assert move_interval(0, 30.0, 20.0) == pytest.approx(0.05)
