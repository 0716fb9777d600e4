"""The relay's counters: their names (one row per worker in the counter block) and the
Prometheus text rendering. Pure: values in, text out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from relay.decision import DECISION_DROP_REASONS
from relay.housekeeping_steps import STEP_BUCKET_COUNTERS, STEP_BUCKETS_US
from wire.tunnel_frame import FRAME_ERROR_REASONS

# Drops the worker itself decides, beyond the decision function's and the frame decoder's.
WORKER_DROP_REASONS = frozenset(
    {
        "oversized",  # datagram larger than the receive buffer
        "table_full",  # partition at its load cap: new flow refused, old ones kept
        "session_table_full",
        "session_flow_limit",  # too many flows (5-tuples) for one ufrag
        "ufrag_too_long",
        "token_target_unreachable",  # the token's transceiver address family is not the tunnel's
        "tunnel_source_not_allowed",  # tunnel frame from outside transceiver_networks
        "tunnel_unexpected_frame",  # a frame kind the relay does not take
        "tunnel_unknown_flow",  # return frame whose handle names no live flow
        "tunnel_foreign_flow",  # handle live, but owned by another transceiver or client
        "send_failed",  # the kernel refused a send (buffer full, unreachable)
        "miss_queue_full",  # a new session's datagram while MISS_QUEUE_MAX misses wait: ICE retransmits it
        "closed_table_full",  # a SessionClosed not remembered: no room near its home in shm's closed set
    }
)
DROP_REASONS = tuple(sorted(DECISION_DROP_REASONS | FRAME_ERROR_REASONS | WORKER_DROP_REASONS))

STATE_COUNTERS = (
    "pid", "ready", "heartbeat_ms", "flows", "transceivers", "tunnel_links",
    "miss_queue",  # misses waiting behind the hits
    "housekeeping_step_max_us",  # the longest housekeeping step since the worker started
    "kernel_flows",  # flows the kernel fast path forwards (relay/kernel_flows.py)
)
TRAFFIC_COUNTERS = (
    "client_packets",  # client → transceiver, forwarded
    "client_bytes",
    "hit_path_packets",  # of client_packets: those the hit path sent itself (relay/hit_path.py)
    "kernel_to_transceiver",  # of client_packets: those the kernel fast path forwarded (relay/kernel_flows.py)
    "kernel_to_client",  # of transceiver_packets: the same, the other way
    "transceiver_packets",  # transceiver → client, forwarded
    "transceiver_bytes",
    "flows_learned",
    "flows_adopted",
    "flows_expired",
    "flows_closed",  # session closed or transceiver gone
    "heartbeats",
    "transceiver_refusals",  # ICMP port unreachable on a link: the transceiver is probed
    "housekeeping_stalls",  # ticks that came late (the worker did not run): they expired nothing
    "housekeeping_step_us_total",  # CPU time of every housekeeping step (relay/housekeeping_steps.py)
    *STEP_BUCKET_COUNTERS,  # the steps by CPU time (not cumulative)
    "internal_errors",  # batches lost to a bug (logged with a traceback): must stay 0
)
# The route directory (relay/worker_directory.py), by event: directory_<event>.
DIRECTORY_EVENTS = ("published", "publish_dropped", "lookups", "hits", "misses", "refused", "errors", "skipped")
WORKER_COUNTERS: tuple[str, ...] = (STATE_COUNTERS + TRAFFIC_COUNTERS
                                     + tuple(f"directory_{e}" for e in DIRECTORY_EVENTS)
                                     + tuple(f"drop_{r}" for r in DROP_REASONS))
COUNTER_INDEX = {name: i for i, name in enumerate(WORKER_COUNTERS)}


def render_prometheus(rows: Sequence[Mapping[str, int]], table_totals: Mapping[str, int] | None = None,
                      kernel_stats: Mapping[str, int] | None = None) -> str:
    out: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        out.append(f"# HELP rtcrelay_{name} {help_text}")
        out.append(f"# TYPE rtcrelay_{name} {kind}")

    family("packets_total", "counter", "Datagrams forwarded, by worker and direction.")
    for w, row in enumerate(rows):
        out.append(f'rtcrelay_packets_total{{worker="{w}",direction="to_transceiver"}} {row.get("client_packets", 0)}')
        out.append(f'rtcrelay_packets_total{{worker="{w}",direction="to_client"}} {row.get("transceiver_packets", 0)}')
    family("bytes_total", "counter", "Payload bytes forwarded, by worker and direction.")
    for w, row in enumerate(rows):
        out.append(f'rtcrelay_bytes_total{{worker="{w}",direction="to_transceiver"}} {row.get("client_bytes", 0)}')
        out.append(f'rtcrelay_bytes_total{{worker="{w}",direction="to_client"}} {row.get("transceiver_bytes", 0)}')
    family("kernel_packets_total", "counter",
           "Datagrams the in-kernel fast path forwarded (of packets_total), by worker and direction.")
    for w, row in enumerate(rows):
        out.append(f'rtcrelay_kernel_packets_total{{worker="{w}",direction="to_transceiver"}} '
                   f'{row.get("kernel_to_transceiver", 0)}')
        out.append(f'rtcrelay_kernel_packets_total{{worker="{w}",direction="to_client"}} '
                   f'{row.get("kernel_to_client", 0)}')
    family("drops_total", "counter", "Datagrams dropped, by worker and reason.")
    for w, row in enumerate(rows):
        out.extend(f'rtcrelay_drops_total{{worker="{w}",reason="{reason}"}} {row.get("drop_" + reason, 0)}'
                   for reason in DROP_REASONS)
    for name, help_text in (
        ("flows_learned", "Flows created from authenticated STUN."),
        ("flows_adopted", "Flows taken over from another worker's partition."),
        ("flows_expired", "Flows removed after the idle timeout."),
        ("flows_closed", "Flows removed because their session closed or their transceiver went silent."),
        ("heartbeats", "Transceiver heartbeats received."),
        ("transceiver_refusals", "ICMP port unreachable on a transceiver's link: it is probed, and its flows "
                                 "dropped when it does not answer within a second."),
        ("hit_path_packets", "Client datagrams the hit path (C or Python) forwarded itself (of packets_total)."),
        ("internal_errors", "Batches lost to an internal error (a bug; logged)."),
    ):
        family(f"{name}_total", "counter", help_text)
        for w, row in enumerate(rows):
            out.append(f'rtcrelay_{name}_total{{worker="{w}"}} {row.get(name, 0)}')
    family("directory_total", "counter", "Route directory (Redis/Valkey) events, by worker and event: entries "
           "published or dropped unwritten, lookups and their outcome, errors, lookups skipped (breaker open).")
    for w, row in enumerate(rows):
        out.extend(f'rtcrelay_directory_total{{worker="{w}",event="{e}"}} {row.get("directory_" + e, 0)}'
                   for e in DIRECTORY_EVENTS)
    family("flows", "gauge", "Flows in each worker's local table.")
    for w, row in enumerate(rows):
        out.append(f'rtcrelay_flows{{worker="{w}"}} {row.get("flows", 0)}')
    family("kernel_flows", "gauge", "Flows of each worker that the in-kernel fast path forwards.")
    for w, row in enumerate(rows):
        out.append(f'rtcrelay_kernel_flows{{worker="{w}"}} {row.get("kernel_flows", 0)}')
    if kernel_stats is not None:
        family("kernel_events_total", "counter",
               "The in-kernel fast path's outcomes: forwarded each way, and datagrams of known flows it left to "
               "the workers (no route or neighbour, a frame that did not match its flow, a packet it could not "
               "resize).")
        out.extend(f'rtcrelay_kernel_events_total{{event="{k}"}} {v}' for k, v in sorted(kernel_stats.items()))
    family("miss_queue", "gauge", "Datagrams of unknown sources waiting to be authenticated (served after the hits).")
    for w, row in enumerate(rows):
        out.append(f'rtcrelay_miss_queue{{worker="{w}"}} {row.get("miss_queue", 0)}')
    family("housekeeping_step_max_seconds", "gauge",
           "Longest housekeeping step (CPU time the worker's packet path waited for it), since it started.")
    for w, row in enumerate(rows):
        out.append(f'rtcrelay_housekeeping_step_max_seconds{{worker="{w}"}} '
                   f'{row.get("housekeeping_step_max_us", 0) / 1e6}')
    family("housekeeping_step_seconds", "histogram",
           "Housekeeping steps by the CPU time the worker's packet path waited for each.")
    for w, row in enumerate(rows):
        out.extend(_step_histogram(w, row))
    family("worker_ready", "gauge", "1 when the worker serves.")
    for w, row in enumerate(rows):
        out.append(f'rtcrelay_worker_ready{{worker="{w}"}} {row.get("ready", 0)}')
    family("transceivers", "gauge", "Transceivers heard from within the heartbeat timeout.")
    for w, row in enumerate(rows):
        out.append(f'rtcrelay_transceivers{{worker="{w}"}} {row.get("transceivers", 0)}')
    if table_totals:
        family("table", "gauge", "Shared flow table: entries, capacity and refusals.")
        for key, value in sorted(table_totals.items()):
            out.append(f'rtcrelay_table{{field="{key}"}} {value}')
    return "\n".join(out) + "\n"


def _step_histogram(worker: int, row: Mapping[str, int]) -> list[str]:
    """One worker's housekeeping steps as Prometheus histogram lines (cumulative buckets)."""
    lines: list[str] = []
    below = 0
    for bound, name in zip((*STEP_BUCKETS_US, None), STEP_BUCKET_COUNTERS):
        below += row.get(name, 0)
        le = "+Inf" if bound is None else repr(bound / 1e6)
        lines.append(f'rtcrelay_housekeeping_step_seconds_bucket{{worker="{worker}",le="{le}"}} {below}')
    lines.append(f'rtcrelay_housekeeping_step_seconds_sum{{worker="{worker}"}} '
                 f'{row.get("housekeeping_step_us_total", 0) / 1e6}')
    lines.append(f'rtcrelay_housekeeping_step_seconds_count{{worker="{worker}"}} {below}')
    return lines
