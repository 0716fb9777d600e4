"""cli/call_client.py's first call outlives a 503: a transceiver at capacity (or overloaded for a
moment) answers 503 + Retry-After, and the caller tries again until there is room. (Its
browser twin, cli/static/rtcrelay-call.js, does the same in its start().)"""

from __future__ import annotations

import asyncio
import time

from test_transceiver_calls import Harness, run

from cli.call_client import ReconnectingCall

REFUSED = 'rtcrelay_transceiver_offers_rejected_total{reason="at_capacity"} 1'


def test_a_first_call_refused_with_503_is_made_once_there_is_room() -> None:
    async def main() -> None:
        async with Harness(max_sessions=1) as h:
            first = await h.call(audio=False)
            call = ReconnectingCall(h.url())
            try:
                started = time.monotonic()
                dialling = asyncio.ensure_future(call.start())
                deadline = time.monotonic() + 10
                while REFUSED not in await h.metrics():
                    assert time.monotonic() < deadline and not dialling.done(), "no offer was refused"
                    await asyncio.sleep(0.05)
                assert not dialling.done()  # refused, and still trying
                async with h.http.delete(h.url(first.location)) as response:
                    assert response.status == 204
                await asyncio.wait_for(dialling, 15)
                assert call.pc is not None and call.pc.connectionState == "connected"
                assert time.monotonic() - started >= 2.0  # after the 503's Retry-After (2 s)
                (session,) = h.manager.sessions.values()
                assert call.location is not None and call.location.endswith(session.id)
            finally:
                await call.close()

    run(main)
