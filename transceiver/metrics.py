"""Transceiver metrics and their Prometheus text rendering (no client library needed for this few)."""

from __future__ import annotations

import bisect
import collections
from collections.abc import Iterable

from transceiver.admission import LoadAdmission
from transceiver.handoff import HANDOFF_ERROR_REASONS
from transceiver.rtp_stats import RtpCounts
from transceiver.sdp import OFFER_ERROR_REASONS
from transceiver.stun_screen import SCREEN_REASONS
from transceiver.tunnel import TunnelCounters

__all__ = ["Histogram", "TransceiverMetrics", "render"]

# Offer -> connected, seconds: ~40 ms on loopback, seconds when many offers arrive at once.
SETUP_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0)

# Why a session ended; "connect_timeout" and "failed" are failures.
CLOSE_REASONS = ("deleted", "peer_closed", "failed", "connect_timeout", "drain_deadline", "shutdown", "error")
# Why an offer got no session, besides the SDP reasons.
REJECT_REASONS = (
    *sorted(OFFER_ERROR_REASONS),
    "unsupported_media_type",
    *sorted(HANDOFF_ERROR_REASONS),
    "at_capacity",
    "overloaded",
    "subject_limit",
    "draining",
    "internal_error",
)


AUTH_FAILURES = ("missing", "invalid_request", "invalid_token", "insufficient_scope")

# Why a session's datagram never reached aioice; "aioice_error": aioice raised on it.
ICE_DROP_REASONS = SCREEN_REASONS | {"aioice_error"}


class IceCounters:
    """Of every session of the process, read by /metrics."""

    def __init__(self) -> None:
        self.drops: collections.Counter[str] = collections.Counter(dict.fromkeys(ICE_DROP_REASONS, 0))
        self.path_moves = 0  # media moved to a client's new address
        self.replayed_checks = 0  # authenticated checks with a transaction id seen before


class Histogram:
    def __init__(self, buckets: Iterable[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # last: +Inf
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1


class TransceiverMetrics:
    def __init__(self) -> None:
        self.sessions_created = 0
        self.sessions_connected = 0
        self.closed: collections.Counter[str] = collections.Counter(dict.fromkeys(CLOSE_REASONS, 0))
        self.rejected: collections.Counter[str] = collections.Counter(dict.fromkeys(REJECT_REASONS, 0))
        self.setup_seconds = Histogram(SETUP_BUCKETS)
        self.ice = IceCounters()  # of every session's ICE
        self.ice_restarts = 0  # WHIP PATCH restarts answered
        self.migrations_asked = 0  # calls asked to move elsewhere (drain)
        self.handoffs_sealed = 0  # pipeline states sent with a migrate request
        self.handoffs_resumed = 0  # pipeline states a new session resumed from
        self.rtp_ended = RtpCounts()  # RTP counters of the calls that ended (live ones are read at render)
        self.audio_dropped_ended = 0  # outgoing audio frames the ended calls' queues dropped
        # WHIP requests refused for their bearer token: missing, invalid_request, invalid_token,
        # insufficient_scope (another subject's session)
        self.auth_failures: collections.Counter[str] = collections.Counter(dict.fromkeys(AUTH_FAILURES, 0))


def _num(value: float) -> str:
    # Counters stay exact integers (":g" would print 1234567 as 1.23457e+06).
    return str(value) if isinstance(value, int) else repr(float(value))


def render(metrics: TransceiverMetrics, tunnel: TunnelCounters, *, sessions: int, capacity: int, draining: bool,
           admission: LoadAdmission | None = None, media: tuple[RtpCounts, int] | None = None) -> str:
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(f"{name}{labels} {_num(value)}" for labels, value in samples)

    metric("rtcrelay_transceiver_sessions", "gauge", "Sessions open now.", [("", sessions)])
    metric("rtcrelay_transceiver_capacity", "gauge", "Most sessions at once.", [("", capacity)])
    metric("rtcrelay_transceiver_draining", "gauge", "1 while draining.", [("", int(draining))])
    if admission is not None:
        metric("rtcrelay_transceiver_cpu_cores", "gauge", "The process's CPU use over the last second, in cores.",
               [("", admission.cpu_cores)])
        metric("rtcrelay_transceiver_call_cpu_cores", "gauge",
               "What admission counts one call to cost, in cores (measured, or admission_call_cpu).",
               [("", admission.cost_per_call)])
        metric("rtcrelay_transceiver_loop_lag_seconds", "gauge",
               "How late the event loop runs a timer: 90th percentile over the last 2 s.",
               [("", admission.loop_lag)])
    metric("rtcrelay_transceiver_sessions_created_total", "counter", "Offers answered.",
           [("", metrics.sessions_created)])
    metric("rtcrelay_transceiver_ice_restarts_total", "counter", "ICE restarts answered (WHIP PATCH).",
           [("", metrics.ice_restarts)])
    metric("rtcrelay_transceiver_migrations_asked_total", "counter",
           "Calls asked to move to another transceiver (drain), on their control data channel.",
           [("", metrics.migrations_asked)])
    metric("rtcrelay_transceiver_handoffs_total", "counter",
           "Pipeline states handed to the client with a migrate request (sealed), and resumed by new sessions.",
           [('{direction="sealed"}', metrics.handoffs_sealed), ('{direction="resumed"}', metrics.handoffs_resumed)])
    metric("rtcrelay_transceiver_auth_failures_total", "counter",
           "WHIP requests refused for their bearer token (401, 403), by reason.",
           [(f'{{reason="{r}"}}', n) for r, n in sorted(metrics.auth_failures.items())])
    metric("rtcrelay_transceiver_sessions_connected_total", "counter", "Sessions that reached connected.",
           [("", metrics.sessions_connected)])
    metric(
        "rtcrelay_transceiver_sessions_closed_total",
        "counter",
        "Sessions ended, by reason.",
        [(f'{{reason="{r}"}}', n) for r, n in sorted(metrics.closed.items())],
    )
    metric(
        "rtcrelay_transceiver_offers_rejected_total",
        "counter",
        "Offers refused, by reason.",
        [(f'{{reason="{r}"}}', n) for r, n in sorted(metrics.rejected.items())],
    )
    h = metrics.setup_seconds
    cumulative = 0
    samples: list[tuple[str, float]] = []
    for bound, count in zip((*h.buckets, float("inf")), h.counts):
        cumulative += count
        samples.append((f'_bucket{{le="{"+Inf" if bound == float("inf") else f"{bound:g}"}"}}', cumulative))
    samples += [("_sum", h.total), ("_count", h.count)]
    out.append("# HELP rtcrelay_transceiver_setup_seconds Offer received to connected (ICE + DTLS).")
    out.append("# TYPE rtcrelay_transceiver_setup_seconds histogram")
    out.extend(f"rtcrelay_transceiver_setup_seconds{suffix} {_num(value)}" for suffix, value in samples)
    for name, value, help_text in (
        ("datagrams_in", tunnel.datagrams_in, "Datagrams received on the tunnel socket."),
        ("frames_in", tunnel.frames_in, "Data frames delivered to sessions."),
        ("frames_out", tunnel.frames_out, "Data frames sent to relays."),
        ("bytes_in", tunnel.bytes_in, "Payload bytes delivered to sessions."),
        ("bytes_out", tunnel.bytes_out, "Payload bytes sent to relays."),
        ("control_out", tunnel.control_out, "Heartbeat, SessionClosed and Drain frames sent."),
        ("flows_moved", tunnel.flows_moved, "Flows now reached through another relay address or handle."),
    ):
        metric(f"rtcrelay_transceiver_tunnel_{name}_total", "counter", help_text, [("", value)])
    metric(
        "rtcrelay_transceiver_tunnel_drops_total",
        "counter",
        "Tunnel datagrams dropped, by reason.",
        [(f'{{reason="{r}"}}', n) for r, n in sorted(tunnel.drops.items())],
    )
    if media is not None:
        rtp, dropped = media
        metric("rtcrelay_transceiver_rtp_packets_total", "counter", "RTP packets of the calls, by direction.",
               [('{direction="in"}', rtp.received), ('{direction="out"}', rtp.sent)])
        metric("rtcrelay_transceiver_rtp_lost_total", "counter",
               "Incoming RTP packets lost on the way (missing sequence numbers).", [("", rtp.lost)])
        metric("rtcrelay_transceiver_audio_dropped_total", "counter",
               "Outgoing audio frames dropped because the pipeline produced them faster than real time.",
               [("", dropped)])
    ice = metrics.ice
    metric(
        "rtcrelay_transceiver_ice_drops_total",
        "counter",
        "Session datagrams that never reached aioice (malformed or unauthenticated STUN, aioice errors), by reason.",
        [(f'{{reason="{r}"}}', n) for r, n in sorted(ice.drops.items())],
    )
    metric("rtcrelay_transceiver_path_moves_total", "counter",
           "Sessions whose media moved to the client's new address (NAT rebinding, network change).",
           [("", ice.path_moves)])
    metric("rtcrelay_transceiver_replayed_checks_total", "counter",
           "Authenticated connectivity checks with a transaction id seen before (never move media).",
           [("", ice.replayed_checks)])
    return "\n".join(out) + "\n"
