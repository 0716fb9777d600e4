"""Commands that look: flows, sessions, stats, ufrag decode. Read-only on shared memory."""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from cli import inspect
from cli.app import JsonOpt, NameOpt, TableDirOpt, app, fail, flows_app, ufrag_app
from wire.route_token import TokenError, decode_token, inspect_token

# Piped output (scripts, grep) gets wide lines instead of wrapped addresses.
console = Console(width=None if sys.stdout.isatty() else 200)


def emit_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True))


@contextmanager
def relay_view(name: str, table_dir: str) -> Iterator[Any]:
    table_path, _ = inspect.table_paths(table_dir, name)
    inspect.yield_to_the_relay()
    try:
        with inspect.open_view(table_path) as view:
            yield view
    except inspect.InspectError as exc:
        fail(str(exc))


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def flows_table(rows: list[dict[str, Any]], rates: dict[int, tuple[float, float]] | None = None) -> Table:
    table = Table(title=f"{len(rows)} flows", header_style="bold")
    for col in ("client", "ufrag", "transceiver", "worker", "age", "idle", "pkts in/out", "bytes in/out"):
        table.add_column(col, justify="right" if col in ("worker", "age", "idle") else "left",
                         no_wrap=col in ("client", "transceiver"))
    if rates is not None:
        table.add_column("pps in/out", justify="right")
    for r in rows:
        cells = [r["client"], r["ufrag"][:16] + ("…" if len(r["ufrag"]) > 16 else ""), r["transceiver"],
                 str(r["worker"]), f"{r['age_s']:.0f}s", f"{r['idle_s']:.1f}s", f"{r['packets_in']}/{r['packets_out']}",
                 f"{human_bytes(r['bytes_in'])}/{human_bytes(r['bytes_out'])}"]
        if rates is not None:
            pin, pout = rates.get(r["handle"], (0.0, 0.0))
            cells.append(f"{pin:.0f}/{pout:.0f}")
        table.add_row(*cells)
    return table


UfragOpt = Annotated[str | None, typer.Option("--ufrag", help="Only flows of this server ufrag.", show_default=False)]
TransceiverOpt = Annotated[str | None,
                           typer.Option("--transceiver", help="Only flows to this IP:PORT.", show_default=False)]
WorkerOpt = Annotated[int | None, typer.Option("--worker", help="Only flows owned by this worker.", show_default=False)]
SortOpt = Annotated[str, typer.Option("--sort", help="age | idle | packets | bytes | client")]


def check_sort(sort: str) -> None:
    if sort not in inspect.SORT_KEYS:
        fail(f"--sort must be one of: {', '.join(inspect.SORT_KEYS)}")


@flows_app.command("list")
def flows_list(name: NameOpt = "default", table_dir: TableDirOpt = "/dev/shm", ufrag: UfragOpt = None,
               transceiver: TransceiverOpt = None, worker: WorkerOpt = None, sort: SortOpt = "age",
               as_json: JsonOpt = False) -> None:
    """List flows: client, ufrag, transceiver, worker, age, idle, packets/bytes each way."""
    check_sort(sort)
    with relay_view(name, table_dir) as view:
        rows = inspect.list_flows(view, ufrag=ufrag, transceiver=transceiver, worker=worker, sort=sort)
    if as_json:
        emit_json(rows)
    else:
        console.print(flows_table(rows))


@flows_app.command("show")
def flows_show(client: Annotated[str, typer.Argument(help="The client's IP:PORT as the relay sees it.")],
               name: NameOpt = "default", table_dir: TableDirOpt = "/dev/shm", as_json: JsonOpt = False) -> None:
    """One flow in full, by client address."""
    with relay_view(name, table_dir) as view:
        rows = [r for r in inspect.list_flows(view) if r["client"] == client]
    if not rows:
        fail(f"no flow for client {client}")
    if as_json:
        emit_json(rows if len(rows) > 1 else rows[0])
        return
    for row in rows:
        table = Table(show_header=False, title=f"flow {row['client']}")
        for key, value in row.items():
            table.add_row(key, str(value))
        console.print(table)


@flows_app.command("watch")
def flows_watch(name: NameOpt = "default", table_dir: TableDirOpt = "/dev/shm", ufrag: UfragOpt = None,
                transceiver: TransceiverOpt = None, worker: WorkerOpt = None, sort: SortOpt = "packets",
                interval: Annotated[float, typer.Option(help="Seconds between refreshes.")] = 1.0,
                frames: Annotated[int, typer.Option(help="Stop after this many refreshes (0: until Ctrl-C).")] = 0,
) -> None:
    """A live view of the flows with packet rates (Ctrl-C to leave)."""
    check_sort(sort)
    if interval <= 0:
        fail("--interval must be > 0")
    previous: dict[int, tuple[float, int, int]] = {}
    shown = 0
    with relay_view(name, table_dir) as view, Live(console=console, auto_refresh=False, screen=False) as live:
        try:
            while frames == 0 or shown < frames:
                now = time.monotonic()
                rows = inspect.list_flows(view, ufrag=ufrag, transceiver=transceiver, worker=worker, sort=sort)
                rates: dict[int, tuple[float, float]] = {}
                current: dict[int, tuple[float, int, int]] = {}
                for r in rows:
                    current[r["handle"]] = (now, r["packets_in"], r["packets_out"])
                    if r["handle"] in previous:
                        t0, pin, pout = previous[r["handle"]]
                        dt = max(1e-3, now - t0)
                        rates[r["handle"]] = ((r["packets_in"] - pin) / dt, (r["packets_out"] - pout) / dt)
                previous = current
                live.update(flows_table(rows, rates), refresh=True)
                shown += 1
                if frames == 0 or shown < frames:
                    time.sleep(interval)
        except KeyboardInterrupt:
            pass


@app.command()
def sessions(name: NameOpt = "default", table_dir: TableDirOpt = "/dev/shm", as_json: JsonOpt = False) -> None:
    """Sessions (server ufrags): flows per session, transceiver, workers, age."""
    with relay_view(name, table_dir) as view:
        rows = inspect.list_sessions(view)
    if as_json:
        emit_json(rows)
        return
    table = Table(title=f"{len(rows)} sessions", header_style="bold")
    for col in ("ufrag", "transceiver", "flows", "workers", "age", "idle"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["ufrag"], r["transceiver"], str(r["flows"]), ",".join(map(str, r["workers"])),
                      f"{r['age_s']:.0f}s", f"{r['idle_s']:.1f}s")
    console.print(table)


@app.command()
def stats(name: NameOpt = "default", table_dir: TableDirOpt = "/dev/shm", as_json: JsonOpt = False) -> None:
    """Totals, per-worker counters (with CPU and RSS), drops by reason, table fill."""
    _, stats_path = inspect.table_paths(table_dir, name)
    with relay_view(name, table_dir) as view:
        try:
            result = inspect.totals(view, inspect.worker_stats(stats_path))
        except inspect.InspectError as exc:
            fail(str(exc))
    if as_json:
        emit_json(result)
        return
    t = result["table"]
    console.print(f"[bold]flows[/bold] {t['flows']} / {t['flow_limit']} ({result['table_fill']:.1%} of the load cap)   "
                  f"[bold]sessions[/bold] {t['sessions']}   [bold]refused[/bold] {t['refused_table_full']} table full, "
                  f"{t['refused_session_flow_limit']} session limit")
    console.print(f"[bold]forwarded[/bold] {result['packets_to_transceivers']} pkts / "
                  f"{human_bytes(result['bytes_to_transceivers'])} to transceivers, "
                  f"{result['packets_to_clients']} pkts / {human_bytes(result['bytes_to_clients'])} to clients"
                  f"   [bold]in the kernel[/bold] {result['kernel_packets_to_transceivers']} / "
                  f"{result['kernel_packets_to_clients']} pkts")
    table = Table(title="workers", header_style="bold")
    for col in ("worker", "pid", "alive", "ready", "flows", "in kernel", "cpu %", "rss", "learned", "expired",
                "closed"):
        table.add_column(col, justify="right")
    for w in result["workers"]:
        table.add_row(str(w["worker"]), str(w.get("pid", 0)), "yes" if w["alive"] else "no", str(w.get("ready", 0)),
                      str(w.get("flows", 0)), str(w.get("kernel_flows", 0)), f"{w.get('cpu_percent', 0.0):.1f}",
                      human_bytes(w.get("rss_bytes", 0)),
                      str(w.get("flows_learned", 0)), str(w.get("flows_expired", 0)), str(w.get("flows_closed", 0)))
    console.print(table)
    if result["drops"]:
        drops = Table(title="drops by reason", header_style="bold")
        drops.add_column("reason")
        drops.add_column("count", justify="right")
        for reason, count in result["drops"].items():
            drops.add_row(reason, str(count))
        console.print(drops)
    else:
        console.print("no drops")


@ufrag_app.command("decode")
def ufrag_decode(ufrag: Annotated[str, typer.Argument(help="A server ufrag (route token).")],
                 route_keys: Annotated[str | None, typer.Option("--route-keys",
                                                                help="Route keys file: verify the MAC too.",
                                                                show_default=False)] = None,
                 max_age: Annotated[float, typer.Option(help="Age limit for a new session, seconds.")] = 300.0,
                 cluster: Annotated[int | None,
                                    typer.Option(help="This relay's cluster id.", show_default=False)] = None,
                 as_json: JsonOpt = False) -> None:
    """What a route token says (target, key id, issued) and whether it is valid."""
    from daemon.config_file import ConfigError
    from daemon.keys import load_keyring

    try:
        token = inspect_token(ufrag)
    except TokenError as exc:
        fail(f"not a route token: {exc}")
    result: dict[str, Any] = {
        "version": token.version, "key_id": token.key_id, "target": f"{token.target_host}:{token.target_port}",
        "cluster": token.cluster, "issued_at": token.issued_at,
        "issued": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(token.issued_at)),
        "age_s": round(time.time() - token.issued_at, 1), "nonce": token.nonce.hex(),
    }
    if route_keys is None:
        result["verified"] = False
        result["check"] = "not verified (no --route-keys)"
    else:
        try:
            decode_token(load_keyring(route_keys), ufrag, time.time(), max_age=max_age, cluster=cluster)
            result["verified"], result["check"] = True, "valid"
        except ConfigError as exc:
            fail(str(exc))
        except TokenError as exc:
            result["verified"], result["check"] = False, exc.reason
    if as_json:
        emit_json(result)
        return
    for key, value in result.items():
        typer.echo(f"{key:10} {value}")
    if route_keys is not None and not result["verified"]:
        raise typer.Exit(2)
