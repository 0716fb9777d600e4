"""End to end on loopback: aiortc clients -> fake relay -> transceiver (tunnel, ICE patch, echo).

Each test runs its own uvloop event loop with the transceiver, the fake relay and the
clients in it. Clients gather on loopback only (aioice would otherwise use the machine's
other interfaces and skip 127.0.0.1) and have no STUN server.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import aioice.ice
import pytest
import uvloop
from av import AudioFrame
from fake_relay import FakeRelay
from prom import sample
from webrtc_peer import IN_PROCESS_ADMISSION, Client, SineTrack, wait_for

from transceiver.pipeline import EchoPipeline, Pipeline, PipelineFactory
from transceiver.service import Transceiver, TransceiverConfig
from wire.route_token import RouteKeyring
from wire.tunnel_frame import Drain

SECRETS = {1: b"route-secret-for-the-transceiver-tests"}
KEYRING = RouteKeyring(SECRETS, 1)
SDP = {"Content-Type": "application/sdp"}
SETUP_MS: list[float] = []  # offer -> connected on the server, all calls of this module


def run(main: Callable[[], Awaitable[None]], timeout: float = 60) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(main(), timeout)

    uvloop.run(bounded())


@pytest.fixture(autouse=True)
def loopback_client(monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the clients gather (the transceiver never does): keep them on the loopback.
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


class Harness:
    def __init__(self, relay_host: str = "127.0.0.1", pipeline: PipelineFactory = EchoPipeline, **config: Any) -> None:
        self.relay = FakeRelay(KEYRING, public_host=relay_host)
        self.pipeline = pipeline
        self.config = {**IN_PROCESS_ADMISSION, **config}
        self.clients: list[Client] = []

    async def __aenter__(self) -> Harness:
        await self.relay.start()
        host, port = self.relay.public_address
        public = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        cfg = TransceiverConfig(relay_public_addresses=[public], http_port=0, route_secrets=SECRETS, route_key_id=1, **self.config)
        self.tx = Transceiver(cfg, self.pipeline)
        await self.tx.start()
        assert self.tx.manager is not None
        self.manager = self.tx.manager
        self.http = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self.clients:
            await client.close()
        await self.tx.stop()
        self.relay.close()
        await self.http.close()

    def url(self, path: str = "/v1/sessions") -> str:
        assert self.tx.http_address is not None
        return f"http://127.0.0.1:{self.tx.http_address[1]}{path}"

    async def post(self, body: str | bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        async with self.http.post(self.url(), data=body, headers=SDP if headers is None else headers) as response:
            return response.status, dict(response.headers), await response.text()

    async def get(self, path: str) -> tuple[int, str]:
        async with self.http.get(self.url(path)) as response:
            return response.status, await response.text()

    async def call(self, audio: bool = True) -> Client:
        client = Client(audio)
        self.clients.append(client)
        status, headers, body = await self.post(await client.offer())
        assert status == 201, body
        assert headers["Content-Type"].startswith("application/sdp")
        client.location = headers["Location"]
        await client.accept(body)
        return client

    async def connected(self, client: Client, timeout: float = 10) -> None:
        await wait_for(lambda: client.pc.connectionState == "connected", timeout, "the client to connect")
        session = self.manager.get(client.location.rsplit("/", 1)[1])  # type: ignore[union-attr]
        assert session is not None
        await asyncio.wait_for(session.connected.wait(), timeout)
        assert session.setup_seconds is not None
        SETUP_MS.append(session.setup_seconds * 1000)

    async def metrics(self) -> str:
        return (await self.get("/metrics"))[1]


# -- calls --------------------------------------------------------------------------------


def test_call_connects_and_echoes_through_the_relay() -> None:
    async def main() -> None:
        async with Harness() as h:
            client = await h.call()
            await h.connected(client)
            assert await client.roundtrip("hello") == "hello"
            assert await client.roundtrip("second") == "second"
            # The client reaches the server at the relay's address and nowhere else.
            assert client.selected_remote() == h.relay.public_address
            assert next(line for line in client.answer.splitlines() if line.startswith("a=candidate:")).endswith(  # type: ignore[union-attr]
                f"{h.relay.public_address[0]} {h.relay.public_address[1]} typ host"
            )
            assert await client.hears_echo() > 1000
            (session,) = h.manager.sessions.values()
            assert session.ufrag == client.server_ufrag
            assert session.ice is not None and session.ice.selected_remote in h.relay.flows
            # The relay is heartbeated once the transceiver heard from it.
            await wait_for(lambda: bool(h.relay.heartbeats), 3, "a heartbeat")
            assert h.relay.heartbeats[-1][1].sessions == 1 and h.relay.heartbeats[-1][1].capacity == h.tx.config.max_sessions
            text = await h.metrics()
            assert "rtcrelay_transceiver_sessions 1" in text
            assert "rtcrelay_transceiver_setup_seconds_count 1" in text
            counters = h.tx.tunnel.counters  # type: ignore[union-attr]
            assert counters.frames_in > 20 and counters.frames_out > 20
            rtp_in = sample(text, "rtcrelay_transceiver_rtp_packets_total", direction="in")
            assert rtp_in > 20 and sample(text, "rtcrelay_transceiver_rtp_packets_total", direction="out") > 20
            assert sample(text, "rtcrelay_transceiver_rtp_lost_total") == 0  # loopback loses nothing

            # The client hangs up: DTLS close_notify reaches the server, which tells the relay.
            await client.pc.close()
            await wait_for(lambda: not h.manager.sessions, 5, "the session to end")
            # The ended call's packets stay in the totals (counters never go down).
            ended = sample(await h.metrics(), "rtcrelay_transceiver_rtp_packets_total", direction="in")
            assert ended >= rtp_in
            assert h.manager.metrics.closed["peer_closed"] == 1
            await wait_for(lambda: client.server_ufrag in h.relay.closed, 2, "SessionClosed")
            assert not h.relay.flows

    run(main)


def test_ten_concurrent_calls_in_one_process() -> None:
    async def main() -> None:
        async with Harness() as h:
            clients = await asyncio.gather(*(h.call() for _ in range(10)))
            await asyncio.gather(*(h.connected(c, timeout=20) for c in clients))
            assert len(h.manager.sessions) == 10 and len({c.server_ufrag for c in clients}) == 10
            echoes = await asyncio.gather(*(c.roundtrip(f"call {i}", timeout=10) for i, c in enumerate(clients)))
            assert echoes == [f"call {i}" for i in range(10)]
            levels = await asyncio.gather(*(c.hears_echo(timeout=15) for c in clients))
            assert all(level > 1000 for level in levels)
            assert all(c.selected_remote() == h.relay.public_address for c in clients)

    run(main, timeout=120)


def test_ipv6_relay_address(monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        async with Harness(relay_host="::1") as h:
            client = await h.call(audio=False)
            await h.connected(client)
            assert await client.roundtrip("v6") == "v6"
            assert client.selected_remote() == h.relay.public_address

    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["::1"])
    run(main)


def test_extra_media_lines_are_answered_inactive() -> None:
    async def main() -> None:
        async with Harness() as h:
            client = Client()
            client.pc.addTransceiver("video", direction="sendrecv")
            client.pc.addTransceiver("audio", direction="sendrecv")
            h.clients.append(client)
            status, headers, answer = await h.post(await client.offer())
            assert status == 201, answer
            client.location = headers["Location"]
            await client.accept(answer)
            directions = [
                next(line[2:] for line in section.splitlines() if line[2:] in ("sendrecv", "sendonly", "recvonly", "inactive"))
                for section in answer.split("m=")[1:]
                if not section.startswith("application")
            ]
            assert directions == ["sendrecv", "inactive", "inactive"]
            await h.connected(client)
            assert await client.hears_echo() > 1000
            assert await client.roundtrip("ok") == "ok"

    run(main)


class ShoutingPipeline(Pipeline):
    """A stand-in for a voice-AI backend: answers text in upper case, speaks a tone back."""

    async def start(self, io: Any) -> None:
        await super().start(io)
        self.heard = 0
        self.tone = SineTrack(amplitude=4000)

    async def on_audio_frame(self, frame: AudioFrame) -> None:
        self.heard += 1
        self.io.send_audio(await self.tone.recv())

    async def on_message(self, message: str | bytes, channel: str) -> None:
        self.io.send_message(f"{channel}:{str(message).upper()}")


def test_a_custom_pipeline_plugs_in() -> None:
    async def main() -> None:
        async with Harness(pipeline=ShoutingPipeline) as h:
            client = await h.call()
            await h.connected(client)
            assert await client.roundtrip("hello") == "echo:HELLO"
            assert await client.hears_echo() > 1000
            (session,) = h.manager.sessions.values()
            assert isinstance(session.pipeline, ShoutingPipeline) and session.pipeline.heard > 0

    run(main)


# -- signalling errors --------------------------------------------------------------------


def test_bad_offers_get_named_errors_and_leave_nothing_behind() -> None:
    async def main() -> None:
        async with Harness() as h:
            good = await Client().offer()
            h.clients.append(Client())  # closed at exit
            no_bundle = "".join(line for line in good.splitlines(keepends=True) if not line.startswith("a=group:BUNDLE"))
            cases: list[tuple[str | bytes, dict[str, str] | None, int, str]] = [
                ("", None, 400, "sdp_empty"),
                ("this is not sdp", None, 400, "sdp_malformed"),
                (b"\xff\xfe\x00garbage", None, 400, "sdp_malformed"),
                (good[: len(good) // 3], None, 400, ""),  # truncated: some named 400
                (good.replace("a=rtcp-mux\r\n", ""), None, 400, "sdp_rejected"),  # aiortc: RTCP mux needed
                (good.replace("UDP/TLS/RTP/SAVPF 96", "UDP/TLS/RTP/SAVPF 300 96"), None, 400, "sdp_rejected"),
                (re.sub(r"m=audio \d+", "m=audio x", good), None, 400, "sdp_malformed"),
                (no_bundle, None, 400, "sdp_not_bundle"),
                (good.replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 0"), None, 400, "sdp_not_bundle"),
                (good, {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
                (good, {"Content-Type": "application/json"}, 415, "unsupported_media_type"),
                ("v=0\r\n" + "a=x\r\n" * 20000, None, 413, "sdp_too_large"),
            ]
            for body, headers, status, reason in cases:
                got_status, got_headers, text = await h.post(body, headers)
                assert got_status == status, (reason, text)
                assert text.startswith(reason), (reason, text)
                assert got_headers.get("Access-Control-Allow-Origin") == "*"
            assert not h.manager.sessions and h.tx.tunnel.session_count == 0  # type: ignore[union-attr]
            assert h.manager.load == 0
            metrics = await h.metrics()
            assert 'rtcrelay_transceiver_offers_rejected_total{reason="sdp_not_bundle"} 2' in metrics
            assert 'rtcrelay_transceiver_offers_rejected_total{reason="unsupported_media_type"} 2' in metrics
            # And a good offer still works afterwards.
            client = await h.call(audio=False)
            await h.connected(client)

    run(main)


def test_capacity_cors_and_health() -> None:
    async def main() -> None:
        async with Harness(max_sessions=1) as h:
            assert await h.get("/healthz") == (200, "ok\n")
            assert (await h.get("/readyz"))[0] == 200
            await h.call(audio=False)
            status, headers, text = await h.post(await Client().offer())
            h.clients.append(Client())
            assert status == 503 and headers["Retry-After"] == "2" and text.startswith("at_capacity")
            async with h.http.options(h.url(), headers={"Origin": "http://127.0.0.1:1", "Access-Control-Request-Method": "POST"}) as r:
                assert r.status == 204
                assert r.headers["Access-Control-Allow-Origin"] == "*"
                assert "POST" in r.headers["Access-Control-Allow-Methods"]
                assert "Content-Type" in r.headers["Access-Control-Allow-Headers"]
            client = h.clients[0]
            assert client.location is not None and client.location.startswith("/v1/sessions/")
            async with h.http.delete(h.url(client.location)) as r:
                assert r.status == 204
                assert r.headers["Access-Control-Allow-Origin"] == "*"
                assert "Location" in r.headers["Access-Control-Expose-Headers"]
            async with h.http.delete(h.url("/v1/sessions/nope")) as r:
                assert r.status == 404

    run(main)


# -- lifecycle ------------------------------------------------------------------------------


def test_watchdog_closes_a_session_that_never_connects() -> None:
    async def main() -> None:
        relay = FakeRelay(KEYRING)
        await relay.start()
        async with Harness(connect_timeout=0.5, relay_tunnel_addresses=[f"127.0.0.1:{relay.tunnel_address[1]}"]) as h:
            client = Client()
            h.clients.append(client)
            status, _, answer = await h.post(await client.offer())  # the client never applies the answer
            assert status == 201
            ufrag = next(line.split(":", 1)[1] for line in answer.splitlines() if line.startswith("a=ice-ufrag:"))
            assert h.manager.sessions
            await wait_for(lambda: not h.manager.sessions, 3, "the watchdog")
            assert h.manager.metrics.closed["connect_timeout"] == 1
            # Nothing ever came through a relay, so only the configured relay hears of it.
            await wait_for(lambda: ufrag in relay.closed, 2, "SessionClosed")
            assert 'rtcrelay_transceiver_sessions_closed_total{reason="connect_timeout"} 1' in await h.metrics()
        relay.close()

    run(main)


def test_dtls_failure_closes_the_session() -> None:
    async def main() -> None:
        async with Harness() as h:
            client = Client(audio=False)
            h.clients.append(client)
            offer = await client.offer()
            # A fingerprint that does not match the client's certificate: ICE works, DTLS fails.
            lines = offer.splitlines()
            forged = "\r\n".join(
                line[: line.index(" ") + 1] + ":".join(["00"] * 32) if line.startswith("a=fingerprint:sha-256") else line for line in lines
            )
            forged = "\r\n".join(line for line in forged.splitlines() if not line.startswith("a=fingerprint:sha-") or "sha-256" in line) + "\r\n"
            status, _, answer = await h.post(forged)
            assert status == 201, answer
            await client.accept(answer)
            await wait_for(lambda: h.manager.metrics.closed["failed"] == 1, 10, "the session to fail")
            assert not h.manager.sessions
            await wait_for(lambda: client.server_ufrag in h.relay.closed, 2, "SessionClosed")

    run(main)


def test_patch_restarts_ice_with_rfc9725_statuses() -> None:
    """WHIP PATCH (RFC 9725 section 4.3): ETag on 201; 428/412/415/400/404; trickle-only 204;
    new credentials restart ICE: 200, a fragment with a new route token for this transceiver,
    a new ETag; the call goes on and the session answers to the new credentials only."""
    frag = {"Content-Type": "application/trickle-ice-sdpfrag"}
    restart_body = "a=ice-ufrag:Cl1ent\r\na=ice-pwd:aNewClientPasswordOf24ch\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n"

    async def main() -> None:
        async with Harness() as h:
            client = await h.call()
            await h.connected(client)
            (session,) = h.manager.sessions.values()
            url = h.url(client.location)  # type: ignore[arg-type]
            async with h.http.post(h.url(), data=await Client().offer(), headers=SDP) as r:
                etag = r.headers["ETag"]  # another session's: each has its own
                await h.manager.end(r.headers["Location"].rsplit("/", 1)[1])
            assert etag != session.etag and session.etag.startswith('"')

            async def patch(body: str, headers: dict[str, str]) -> tuple[int, Any, str]:
                async with h.http.patch(url, data=body, headers=headers) as r:
                    return r.status, r.headers.copy(), await r.text()  # (header names case-insensitive)

            assert (await patch(restart_body, frag))[0] == 428  # no If-Match
            assert (await patch(restart_body, {**frag, "If-Match": etag}))[0] == 412  # not this session's
            assert (await patch(restart_body, {"Content-Type": "application/sdp", "If-Match": "*"}))[0] == 415
            assert (await patch("v=0\r\n", {**frag, "If-Match": "*"}))[0] == 400
            async with h.http.patch(h.url("/v1/sessions/nope"), data=restart_body, headers={**frag, "If-Match": "*"}) as r:
                assert r.status == 404
            trickle = "a=candidate:1 1 udp 2122260223 192.0.2.1 61764 typ host\r\na=end-of-candidates\r\n"
            status, headers, _ = await patch(trickle, {**frag, "If-Match": session.etag})
            assert status == 204 and headers["ETag"] == session.etag
            old_ufrag, old_etag = session.ufrag, session.etag

            status, headers, body = await patch(restart_body, {**frag, "If-Match": "*"})
            assert status == 200, body
            assert headers["Content-Type"].startswith("application/trickle-ice-sdpfrag")
            assert headers["ETag"] == session.etag != old_etag
            lines = body.splitlines()
            new_ufrag = lines[0].removeprefix("a=ice-ufrag:")
            assert new_ufrag == session.ufrag != old_ufrag
            assert KEYRING.password(1, new_ufrag) == lines[1].removeprefix("a=ice-pwd:")  # derived, as the relay checks
            assert "m=audio 9 UDP/TLS/RTP/SAVPF 111" in lines and "a=mid:0" in lines
            assert any(line.startswith("a=candidate:") and line.endswith(f"{h.relay.public_address[1]} typ host")
                       for line in lines)
            assert lines[-1] == "a=end-of-candidates"
            assert session.remote_credentials == ("Cl1ent", "aNewClientPasswordOf24ch")
            assert await client.roundtrip("after the restart") == "after the restart"  # media never stopped
            assert "rtcrelay_transceiver_ice_restarts_total 1" in await h.metrics()
            # the same credentials again are no restart: 204
            assert (await patch(restart_body, {**frag, "If-Match": session.etag}))[0] == 204
            # the hang-up closes both ufrags at the relays (the client kept its 5-tuple, learned
            # under the old one: that one stays until the call ends)
            async with h.http.delete(url) as r:
                assert r.status == 204
            await wait_for(lambda: {old_ufrag, new_ufrag} <= set(h.relay.closed), 2, "SessionClosed for both")

    run(main)


def test_delete_mid_call() -> None:
    async def main() -> None:
        async with Harness() as h:
            client = await h.call()
            await h.connected(client)
            assert await client.roundtrip("before") == "before"
            async with h.http.delete(h.url(client.location)) as r:  # type: ignore[arg-type]
                assert r.status == 204
            assert not h.manager.sessions and h.manager.metrics.closed["deleted"] == 1
            await wait_for(lambda: client.server_ufrag in h.relay.closed, 2, "SessionClosed")
            # The server's close_notify went out before the tunnel link closed: the client sees it.
            await wait_for(lambda: client.pc.connectionState == "closed", 5, "the client to see the hang-up")
            async with h.http.delete(h.url(client.location)) as r:  # type: ignore[arg-type]
                assert r.status == 404

    run(main)


def test_drain_refuses_new_calls_and_lets_calls_run_until_the_deadline() -> None:
    async def main() -> None:
        async with Harness(drain_deadline=2.0) as h:
            client = await h.call()
            await h.connected(client)
            await client.hears_echo()
            started = time.monotonic()
            drain = asyncio.create_task(h.tx.drain())
            await wait_for(lambda: h.manager.draining, 1, "draining")
            status, _, text = await h.post(await Client().offer())
            h.clients.append(Client())
            assert status == 503 and text.startswith("draining")
            assert await h.get("/readyz") == (503, "draining\n")
            assert (await h.get("/healthz"))[0] == 200
            await wait_for(lambda: bool(h.relay.drains), 1, "Drain to the relay")
            assert h.relay.drains[0] == Drain(2.0)
            await wait_for(lambda: any(hb.draining for _, hb in h.relay.heartbeats), 1, "a draining heartbeat")
            # The call goes on meanwhile.
            assert await client.roundtrip("still here") == "still here"
            frames = len(client.rms)
            await asyncio.sleep(0.5)
            assert len(client.rms) > frames + 10
            await asyncio.wait_for(drain, 5)
            assert 1.9 <= time.monotonic() - started < 4
            assert not h.manager.sessions and h.manager.metrics.closed["drain_deadline"] == 1
            await wait_for(lambda: client.server_ufrag in h.relay.closed, 2, "SessionClosed")

    run(main)


def test_drain_ends_early_when_calls_hang_up() -> None:
    async def main() -> None:
        async with Harness(drain_deadline=20.0) as h:
            client = await h.call(audio=False)
            await h.connected(client)
            started = time.monotonic()
            drain = asyncio.create_task(h.tx.drain())
            await asyncio.sleep(0.2)
            await client.pc.close()
            await asyncio.wait_for(drain, 5)
            assert time.monotonic() - started < 5
            assert h.manager.metrics.closed["peer_closed"] == 1

    run(main)


# -- the process -------------------------------------------------------------------------


def test_run_transceiver_notifies_systemd_and_drains_on_sigterm(tmp_path: Any) -> None:
    notify_path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    sock.settimeout(30)
    code = textwrap.dedent(
        """
        from transceiver.service import TransceiverConfig, serve
        serve(TransceiverConfig(relay_public_addresses=["127.0.0.1:3478"], http_port=0,
                                route_secrets={1: b"x" * 32}, route_key_id=1, drain_deadline=5))
        """
    )
    env = {**os.environ, "NOTIFY_SOCKET": notify_path, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stderr=subprocess.PIPE)
    try:
        ready = sock.recv(4096).decode()
        assert "READY=1" in ready
        url = ready.split("http://", 1)[1].split()[0]

        async def readyz() -> int:
            async with aiohttp.ClientSession() as http, http.get(f"http://{url}/readyz") as r:
                return r.status

        assert uvloop.run(readyz()) == 200
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in sock.recv(4096).decode()
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        sock.close()
        if proc.stderr is not None:
            proc.stderr.close()


def test_report_setup_times() -> None:
    # Not an assertion on speed (shared CI machines): the numbers go in the -s / -rA output.
    if SETUP_MS:
        print(f"\noffer->connected ms over {len(SETUP_MS)} calls: median {statistics.median(SETUP_MS):.1f}, max {max(SETUP_MS):.1f}")
