"""Session lifecycle: offer -> answer -> connected -> closed, and the registry of sessions.

One :class:`Session` per call: an ``RTCPeerConnection`` (no ICE servers) whose ICE goes
through the tunnel (transceiver/ice_tunnel.py), a :class:`~transceiver.pipeline.Pipeline`, and
the tasks that feed it. A session ends exactly once, for one reason (metrics count them):

- ``deleted``          DELETE /v1/sessions/{id}
- ``peer_closed``      the client closed (DTLS close_notify: aiortc closes the connection)
- ``failed``           ICE or DTLS failed, including consent expiry mid-call (~30 s)
- ``connect_timeout``  never connected: the watchdog's job, since aioice keeps polling for
                       checks forever when the offer had no candidates (it cannot know the
                       client will never come)
- ``drain_deadline`` / ``shutdown`` / ``error``

On close the connection is closed first (so the DTLS close_notify still reaches the client
through the tunnel), then the tunnel link, which tells the relays ``SessionClosed(ufrag)``.

ICE restart (WHIP PATCH, :meth:`Session.restart_ice`): a new server ufrag (a new route token
for this same transceiver) and password; the connection keeps its nominated pair, so media,
DTLS and SRTP go on while the client checks its new candidates. Once the client checks with
the new credentials, the old ufrag is retired: ``SessionRenamed(old, new)`` has the relays
learn its flows again under the new ufrag (a client may restart on the same 5-tuple and keep
its flow) and refuse the old one from then on (at most RETIRE_WAIT_S after the PATCH).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Callable, Sequence

from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtcdatachannel import RTCDataChannel
from av import AudioFrame

from transceiver import audio_level, ice_tunnel, opus_voice
from transceiver.admission import LoadAdmission
from transceiver.handoff import seal_state
from transceiver.metrics import TransceiverMetrics
from transceiver.pipeline import OutgoingAudioTrack, Pipeline, PipelineFactory
from transceiver.rtp_stats import RtpCounts, rtp_counts
from transceiver.sdp import OfferError, prepare_offer
from transceiver.tunnel import SessionLink, TunnelEndpoint
from wire.route_token import RouteKeyring, derive_password, issue_token
from wire.tunnel_frame import Heartbeat

__all__ = ["Session", "SessionManager", "SessionRejected", "move_interval"]

log = logging.getLogger("rtcrelay.transceiver.session")

# aiortc spends ~1.5 ms of pure Python per outgoing audio frame on the level extension.
audio_level.install()
opus_voice.install()

Addr = tuple[str, int]
CLOSE_STEP_TIMEOUT_S = 5.0  # bound each close step: a stuck pipeline must not keep a session
MESSAGE_QUEUE = 256
# A data channel the client opens for the service's own messages (not the pipeline's): on
# drain the transceiver sends {"type": "migrate", ...} on it, and the client moves the call
# to another transceiver make-before-break (cli/static/call.js, cli/call_client.py).
CONTROL_CHANNEL = "rtcrelay-control"
RETIRE_POLL_S = 0.1  # after an ICE restart: how often to look for the client's first new check
RETIRE_WAIT_S = 30.0  # ... and for how long (then the old ufrag is retired anyway)
RETRY_AFTER_S = 2  # a refused offer's Retry-After (at capacity, overloaded)
HANDOFF_MARGIN_S = 30.0  # a sealed pipeline state outlives the drain deadline by this much
DRAIN_MOVE_RATE = 20.0  # calls asked to move per second on drain (transceiver config: drain_move_rate)


def move_interval(calls: int, deadline_s: float, move_rate: float) -> float:
    """Seconds between two calls asked to move on drain: ``move_rate`` per second, faster when
    that would not ask every call within half the deadline."""
    return min(1.0 / move_rate, deadline_s / 2 / max(1, calls))


class SessionRejected(Exception):
    """No new session now: ``reason`` is ``at_capacity``, ``overloaded``, ``subject_limit`` or ``draining``."""

    def __init__(self, reason: str, detail: str, retry_after_s: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail
        self.retry_after_s = retry_after_s


class Session:
    def __init__(self, manager: SessionManager, pipeline: Pipeline, subject: str | None = None) -> None:
        self.manager = manager
        self.id = secrets.token_urlsafe(12)
        self.subject = subject  # who opened it (WHIP bearer token), None without authentication
        self.ufrag = manager.new_token()
        self.pipeline = pipeline
        self.started = time.monotonic()  # offer received
        self.setup_seconds: float | None = None  # offer -> connected
        self.close_reason: str | None = None
        self.connected = asyncio.Event()
        self.closed = asyncio.Event()
        self.pc: RTCPeerConnection | None = None
        self.link: SessionLink | None = None
        self.ice: ice_tunnel.TunnelIce | None = None
        self.outgoing = OutgoingAudioTrack()
        self.channels: dict[str, RTCDataChannel] = {}  # the pipeline's
        self.control: RTCDataChannel | None = None
        self._messages: asyncio.Queue[tuple[str | bytes, str]] = asyncio.Queue(MESSAGE_QUEUE)
        self._tasks: set[asyncio.Task[None]] = set()
        self._close_task: asyncio.Task[None] | None = None
        self.ice_generation = 0  # ICE restarts so far: part of the ETag

    @property
    def etag(self) -> str:
        """A strong entity tag of the session's ICE state (RFC 9725: changes with a restart)."""
        return f'"{self.id}.{self.ice_generation}"'

    @property
    def remote_credentials(self) -> tuple[str | None, str | None]:
        conn = self.ice.connection if self.ice is not None else None
        return (conn.remote_username, conn.remote_password) if conn is not None else (None, None)

    @property
    def state(self) -> str:
        if self.close_reason is not None:
            return "closed"
        return self.pc.connectionState if self.pc is not None else "new"

    # -- negotiation --------------------------------------------------------------------

    async def negotiate(self, offer: str, handoff: bytes | None = None) -> str:
        """Apply a prepared offer, route ICE through the tunnel, return the SDP answer.
        ``handoff``: a moved call's pipeline state, for ``Pipeline.resume``."""
        pc = self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        pc.on("connectionstatechange", self._on_connection_state)
        pc.on("datachannel", self._on_datachannel)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        except Exception as exc:  # aiortc's parser raises anything from AssertionError to KeyError
            raise OfferError("sdp_rejected", f"{type(exc).__name__}: {exc}") from None

        self.link = self.manager.tunnel.register(self.ufrag)
        password = derive_password(self.manager.keyring, self.ufrag)
        self.ice = ice_tunnel.attach(
            pc,
            ufrag=self.ufrag,
            password=password,
            local_addresses=self.manager.relay_public,
            send=self.link.sendto,
            counters=self.manager.metrics.ice,
        )
        self.link.receive = self.ice.datagram_received

        # The first audio m-line carries the call; other audio/video m-lines are answered inactive
        # (a receiving track nobody reads would queue frames forever).
        audio = next((t for t in pc.getTransceivers() if t.kind == "audio"), None)
        if audio is not None:
            pc.addTrack(self.outgoing)  # joins that transceiver (sendrecv, or sendonly if the caller only listens)
        for transceiver in pc.getTransceivers():
            if transceiver is not audio:
                transceiver.direction = "inactive"
        incoming = audio.receiver.track if audio is not None else None
        if handoff is not None:
            await self.pipeline.resume(handoff)
            self.manager.metrics.handoffs_resumed += 1
        await self.pipeline.start(self)
        if incoming is not None:
            self._spawn(self._pump_audio(incoming))
        self._spawn(self._pump_messages())

        await pc.setLocalDescription(await pc.createAnswer())
        self._spawn(self._watchdog())
        return pc.localDescription.sdp

    # -- ICE restart ----------------------------------------------------------------------

    def restart_ice(self, remote_ufrag: str, remote_password: str) -> tuple[str, str, list[str]]:
        """The client restarts ICE with new credentials: ours in exchange (ufrag, password)
        and our candidates (``candidate:...`` values). RuntimeError when the session is over."""
        if self.ice is None or self.link is None or self.close_reason is not None:
            raise RuntimeError("the session has ended")
        manager = self.manager
        old = self.ufrag
        self.ufrag = manager.new_token()
        password = derive_password(manager.keyring, self.ufrag)
        manager.tunnel.add_ufrag(self.link, self.ufrag)
        self.ice.restart(self.ufrag, password, remote_ufrag, remote_password)
        self.ice_generation += 1
        manager.metrics.ice_restarts += 1
        self._spawn(self._retire_after_new_check(old))
        log.info("session %s: ICE restart, ufrag %s... -> %s...", self.id, old[:12], self.ufrag[:12])
        candidates = [f"candidate:{c.to_sdp()}" for c in self.ice.connection.local_candidates]
        return self.ufrag, password, candidates

    async def _retire_after_new_check(self, old: str) -> None:
        # Once the client checks with the new credentials (it applied our answer), the relays
        # relabel the old ufrag's flows and refuse it (SessionRenamed).
        assert self.link is not None
        new = self.ufrag
        deadline = time.monotonic() + RETIRE_WAIT_S
        while time.monotonic() < deadline and new not in self.link.checked:
            await asyncio.sleep(RETIRE_POLL_S)
        self.manager.tunnel.retire_ufrag(self.link, old)

    async def ask_to_migrate(self, reason: str, deadline_s: float) -> bool:
        """Ask the client to move the call elsewhere within ``deadline_s`` (it calls again, then
        hangs this one up), with the pipeline's state sealed for the new session; False when it
        has no control channel open (it will be cut at the drain deadline)."""
        if self.control is None or self.control.readyState != "open":
            return False
        request: dict[str, object] = {"type": "migrate", "reason": reason, "deadline_s": deadline_s}
        try:
            state = await asyncio.wait_for(self.pipeline.handoff(), CLOSE_STEP_TIMEOUT_S)
            if state is not None:
                request["handoff"] = seal_state(self.manager.keyring, state, self.manager.clock(),
                                                deadline_s + HANDOFF_MARGIN_S)
                self.manager.metrics.handoffs_sealed += 1
        except Exception:  # the call still moves, without its state
            log.exception("session %s: the pipeline's handoff failed", self.id)
        if self.control.readyState != "open":
            return False
        self.control.send(json.dumps(request))
        return True

    # -- PipelineIO -----------------------------------------------------------------------

    def send_audio(self, frame: AudioFrame) -> None:
        self.outgoing.push(frame)

    def send_message(self, message: str | bytes, channel: str | None = None) -> None:
        if channel is not None:
            target = self.channels.get(channel)
        else:
            target = next((c for c in self.channels.values() if c.readyState == "open"), None)
        if target is not None and target.readyState == "open":
            target.send(message)

    # -- events and tasks ---------------------------------------------------------------

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_connection_state(self) -> None:
        assert self.pc is not None
        state = self.pc.connectionState
        if state == "connected" and not self.connected.is_set():
            self.setup_seconds = time.monotonic() - self.started
            self.connected.set()
            self.manager._session_connected(self)
        elif state == "failed":
            self.close_soon("failed")
        elif state == "closed":
            self.close_soon("peer_closed")

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label == CONTROL_CHANNEL:
            self.control = channel
            return
        self.channels[channel.label] = channel

        @channel.on("message")
        def on_message(message: str | bytes) -> None:
            if self._messages.full():
                log.warning("session %s: data-channel backlog full, message dropped", self.id)
                return
            self._messages.put_nowait((message, channel.label))

    async def _pump_audio(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                await self.pipeline.on_audio_frame(frame)
        except MediaStreamError:
            pass  # the call's audio ended
        except Exception:
            log.exception("session %s: pipeline failed on audio", self.id)
            self.close_soon("error")

    async def _pump_messages(self) -> None:
        try:
            while True:
                message, label = await self._messages.get()
                await self.pipeline.on_message(message, label)
        except Exception:
            log.exception("session %s: pipeline failed on a message", self.id)
            self.close_soon("error")

    async def _watchdog(self) -> None:
        try:
            await asyncio.wait_for(self.connected.wait(), self.manager.connect_timeout)
        except TimeoutError:
            log.info("session %s: not connected after %.1f s, closing", self.id, self.manager.connect_timeout)
            self.close_soon("connect_timeout")

    # -- close ----------------------------------------------------------------------------

    def close_soon(self, reason: str) -> None:
        """Close from a callback or from one of the session's own tasks."""
        if self._close_task is None and self.close_reason is None:
            self._close_task = asyncio.ensure_future(self.close(reason))

    async def close(self, reason: str) -> None:
        """End the session (idempotent: later calls wait for the first one)."""
        if self.close_reason is not None:
            await self.closed.wait()
            return
        self.close_reason = reason
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        self.outgoing.stop()
        if self.pc is not None:  # its counters go on in the totals of ended calls (monotonic /metrics)
            self.manager.metrics.rtp_ended.add(rtp_counts([self.pc]))
        self.manager.metrics.audio_dropped_ended += self.outgoing.dropped
        for step, what in ((self.pipeline.close, "pipeline"), (self.pc.close if self.pc else None, "connection")):
            if step is None:
                continue
            try:
                await asyncio.wait_for(step(), CLOSE_STEP_TIMEOUT_S)
            except Exception:
                log.exception("session %s: closing the %s failed", self.id, what)
        if self.link is not None:
            self.link.close()  # after the connection: its DTLS close_notify still had a way out
        self.manager._session_closed(self, reason)
        self.closed.set()


class SessionManager:
    """All sessions of this process: admission, drain, and what the heartbeat says."""

    def __init__(
        self,
        *,
        tunnel: TunnelEndpoint,
        keyring: RouteKeyring,
        route_target: tuple[bytes, int],
        relay_public: Sequence[Addr],
        max_sessions: int,
        connect_timeout: float,
        pipeline_factory: PipelineFactory,
        metrics: TransceiverMetrics | None = None,
        clock: Callable[[], float] = time.time,
        admission: LoadAdmission | None = None,
        max_sessions_per_subject: int = 0,
        cluster_id: int | None = None,
    ) -> None:
        self.tunnel = tunnel
        self.keyring = keyring
        self.route_ip, self.route_port = route_target
        self.relay_public = list(relay_public)
        self.max_sessions = max_sessions
        self.connect_timeout = connect_timeout
        self.pipeline_factory = pipeline_factory
        self.metrics = metrics or TransceiverMetrics()
        self.clock = clock
        self.admission = admission  # None: admit by count only
        self.max_sessions_per_subject = max_sessions_per_subject  # 0: no limit
        self.cluster_id = cluster_id  # written into every route token: edge relays route by it
        self._pending_by: dict[str, int] = {}  # subject -> its offers being negotiated
        self.sessions: dict[str, Session] = {}
        self.draining = False
        self._pending = 0  # offers being negotiated: they count against capacity
        self._idle = asyncio.Event()
        self._idle.set()
        tunnel.heartbeat_source = self.heartbeat

    @property
    def load(self) -> int:
        return len(self.sessions) + self._pending

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(sessions=self.load, capacity=self.max_sessions, draining=self.draining)

    async def create(self, offer: str, handoff: bytes | None = None,
                     subject: str | None = None) -> tuple[Session, str]:
        """Answer an offer: (session, SDP answer). Raises SessionRejected or OfferError.
        ``handoff``: the pipeline state of the session this call moves from (opened);
        ``subject``: who asks (its sessions are limited to ``max_sessions_per_subject``)."""
        if self.draining:
            raise SessionRejected("draining", "the transceiver is draining")
        if self.load >= self.max_sessions:
            raise SessionRejected("at_capacity", f"{self.max_sessions} sessions (max_sessions)", RETRY_AFTER_S)
        if subject is not None and self.max_sessions_per_subject:
            held = sum(1 for s in self.sessions.values() if s.subject == subject) + self._pending_by.get(subject, 0)
            if held >= self.max_sessions_per_subject:
                raise SessionRejected("subject_limit", f"{subject} holds {held} sessions "
                                      f"(max_sessions_per_subject {self.max_sessions_per_subject})", RETRY_AFTER_S)
        why = self.admission.refusal(self._pending) if self.admission is not None else None
        if why is not None:
            raise SessionRejected("overloaded", why, RETRY_AFTER_S)
        self._pending += 1
        if subject is not None:
            self._pending_by[subject] = self._pending_by.get(subject, 0) + 1
        session: Session | None = None
        try:
            prepared = prepare_offer(offer)
            session = Session(self, self.pipeline_factory(), subject)
            answer = await session.negotiate(prepared, handoff)
        except BaseException:
            if session is not None:
                session.close_reason = "rejected"  # not a session yet: no metrics, just cleanup
                await _quiet_close(session)
            raise
        finally:
            self._pending -= 1
            if subject is not None:
                self._pending_by[subject] -= 1
                if not self._pending_by[subject]:
                    del self._pending_by[subject]
        self.sessions[session.id] = session
        self._idle.clear()
        self.metrics.sessions_created += 1
        if self.admission is not None:
            self.admission.admitted(time.monotonic())
        if self.draining:  # drain began while this offer was negotiated
            session.close_soon("drain_deadline")
        return session, answer

    def media_totals(self) -> tuple[RtpCounts, int]:
        """RTP packets in, lost and out, and outgoing audio frames dropped, of every call so far."""
        counts = RtpCounts()
        counts.add(self.metrics.rtp_ended)
        counts.add(rtp_counts(s.pc for s in self.sessions.values() if s.pc is not None and s.close_reason is None))
        dropped = self.metrics.audio_dropped_ended + sum(s.outgoing.dropped for s in self.sessions.values()
                                                          if s.close_reason is None)
        return counts, dropped

    def new_token(self) -> str:
        """A route token (a server ufrag) naming this transceiver, and its cluster if it has one."""
        return issue_token(self.keyring, self.route_ip, self.route_port, self.clock(), cluster=self.cluster_id)

    def connected_calls(self) -> int:
        return sum(1 for session in self.sessions.values() if session.connected.is_set())

    def get(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id)

    async def end(self, session_id: str, reason: str = "deleted") -> bool:
        session = self.sessions.get(session_id)
        if session is None:
            return False
        await session.close(reason)
        return True

    async def drain(self, deadline_s: float, move_rate: float = DRAIN_MOVE_RATE) -> None:
        """Take no new sessions, tell the relays, ask the calls to move (``move_rate`` per
        second), let calls end by themselves until the deadline, then close the rest."""
        self.draining = True
        self.tunnel.send_drain(deadline_s)
        self.tunnel.send_heartbeat()
        asking = asyncio.ensure_future(self._ask_to_move(deadline_s, move_rate))
        try:
            await asyncio.wait_for(self._idle.wait(), deadline_s)
        except TimeoutError:
            pass
        asking.cancel()
        await self.close_all("drain_deadline")

    async def _ask_to_move(self, deadline_s: float, move_rate: float) -> None:
        # Paced, not all at once: every moved call is a new offer (ICE, DTLS) on the other
        # transceivers, and a burst of them delays everyone's audio there (and meets their
        # admission). All are asked within half the deadline, however many there are.
        end = time.monotonic() + deadline_s
        sessions = list(self.sessions.values())
        interval = move_interval(len(sessions), deadline_s, move_rate)
        asked = 0
        for index, session in enumerate(sessions):
            if index:
                await asyncio.sleep(interval)
            if session.close_reason is None and await session.ask_to_migrate("drain", max(0.0, end - time.monotonic())):
                asked += 1
                self.metrics.migrations_asked += 1
        log.info("drain: %d of %d calls asked to move", asked, len(sessions))

    async def close_all(self, reason: str) -> None:
        await asyncio.gather(*(s.close(reason) for s in list(self.sessions.values())))

    def _session_connected(self, session: Session) -> None:
        if session.close_reason is None and session.setup_seconds is not None:
            self.metrics.sessions_connected += 1
            self.metrics.setup_seconds.observe(session.setup_seconds)

    def _session_closed(self, session: Session, reason: str) -> None:
        if self.sessions.pop(session.id, None) is not None:
            self.metrics.closed[reason] += 1
            log.info("session %s closed: %s", session.id, reason)
        if not self.sessions:
            self._idle.set()


async def _quiet_close(session: Session) -> None:
    # Undo a half-negotiated session; close() would count it, and it has nothing to count.
    session.outgoing.stop()
    for task in list(session._tasks):
        task.cancel()
    for step in (session.pipeline.close, session.pc.close if session.pc else None):
        if step is None:
            continue
        try:
            await asyncio.wait_for(step(), CLOSE_STEP_TIMEOUT_S)
        except Exception:
            log.exception("cleaning up a rejected offer failed")
    if session.link is not None:
        session.link.close()
    session.closed.set()
