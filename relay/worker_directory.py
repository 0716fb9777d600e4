"""A worker's use of the route directory (relay/directory.py; Redis or Valkey through redis-py's
asyncio client). Never on the hit path:

- **Publish**: a flow learned or adopted is queued (``publish``) and written by a background
  task every PUBLISH_S in one pipeline (``SET key value PX ttl``); a flow that still carries
  traffic is written again after a third of its entry's TTL (ENTRY_TTL_FACTOR x idle_timeout),
  the flows looked at a few hundred per housekeeping tick. A full queue drops the oldest
  (counted).
- **Look up**: a datagram from a 5-tuple the relay has no flow for, that is no STUN check (the
  decision said ``unknown_flow``), is held (at most HELD_PER_SOURCE per source) while one
  lookup for that source runs, bounded by ``directory_timeout``. An entry that opens (its MAC,
  its 5-tuple, its expiry) and whose ufrag this relay would itself have learned
  (relay.decision.learn_from_directory) becomes a flow, and the held datagrams go on. Not
  found, refused or timed out: the held datagrams are dropped as ``unknown_flow`` and the
  source is not looked up again for a while (negative cache).
- **Trouble**: errors and timeouts count towards a circuit breaker; while it is open nothing
  is looked up (counted ``directory_skipped``) and the relay works as without a directory:
  clients are learned again from their next STUN check.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from relay.directory import (
    ENTRY_TTL_FACTOR,
    CircuitBreaker,
    DirectoryError,
    NegativeCache,
    flow_key,
    open_entry,
    seal_entry,
)
from relay.metrics import DIRECTORY_EVENTS

if TYPE_CHECKING:
    from relay.config import RelayConfig
    from relay.flows import FlowEntry, LocalFlows
    from wire.route_token import RouteKeyring

log = logging.getLogger("rtcrelay.relay")

PUBLISH_S = 0.1
PUBLISH_QUEUE_MAX = 65536
REFRESH_PER_TICK = 256  # flows looked at per housekeeping tick
REFRESHES_PER_TTL = 3  # a flow with traffic is written again after a third of its entry's TTL
HELD_PER_SOURCE = 8
LOOKUPS_MAX = 256  # lookups in flight at once; more sources wait for their next datagram


class WorkerDirectory:
    def __init__(self, config: RelayConfig, keyring: Callable[[], RouteKeyring],
                 adopt: Callable[[int, bytes, str, list[bytes]], None], drop: Callable[[str, int], None]) -> None:
        self.url = config.directory_url
        self.timeout = config.directory_timeout
        self.cluster = config.cluster_id
        self.ttl_s = ENTRY_TTL_FACTOR * config.idle_timeout
        self.keyring = keyring  # the worker's current keys (they rotate)
        self.adopt = adopt  # (which, key, ufrag, held datagrams): learn the flow and send them
        self.drop = drop  # (reason, count)
        self.breaker = CircuitBreaker()
        self.negative = NegativeCache(ttl_s=max(2.0, self.timeout * 20))
        self.counts: collections.Counter[str] = collections.Counter(dict.fromkeys(DIRECTORY_EVENTS, 0))
        self._queue: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._held: dict[bytes, list[bytes]] = {}
        self._published: dict[bytes, tuple[int, float]] = {}  # client key -> (its activity, monotonic) when written
        self._cursor = 0
        self._client: Any = None
        self._lookups: set[asyncio.Task[None]] = set()
        self._publisher: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.url)

    # -- the event loop -----------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self.enabled:
            return
        import redis.asyncio as redis  # optional dependency: only a relay with a directory needs it

        # The bound covers connecting too: a dead server costs a lookup its timeout, no more.
        self._client = redis.Redis.from_url(self.url, socket_timeout=self.timeout,
                                            socket_connect_timeout=self.timeout, retry_on_timeout=False)
        self._publisher = loop.create_task(self._publish_forever())

    async def stop(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
        if self._client is not None:
            try:
                await asyncio.wait_for(self._client.aclose(), 1.0)
            except Exception:  # closing a broken connection: nothing to do
                pass

    # -- publish ------------------------------------------------------------------------------

    def publish(self, entry: FlowEntry) -> None:
        if not self.enabled:
            return
        client = entry.client
        key = flow_key(self.cluster, *client)
        self._queue[key] = seal_entry(self.keyring(), client, entry.ufrag, time.time(), self.ttl_s)
        self._queue.move_to_end(key)
        self._published[entry.client_key] = (entry.packets_in + entry.packets_out, time.monotonic())
        if len(self._queue) > PUBLISH_QUEUE_MAX:
            self._queue.popitem(last=False)
            self.counts["publish_dropped"] += 1

    def forget(self, entry: FlowEntry) -> None:
        self._published.pop(entry.client_key, None)

    def tick(self, flows: LocalFlows) -> None:
        """Each housekeeping tick: write again the entries of flows that carried traffic."""
        if not self.enabled or not flows.entries:
            return
        entries = flows.entries
        stale = time.monotonic() - self.ttl_s / REFRESHES_PER_TTL
        for _ in range(min(REFRESH_PER_TICK, len(entries))):
            self._cursor = (self._cursor + 1) % len(entries)
            entry = entries[self._cursor]
            activity, written = self._published.get(entry.client_key, (-1, 0.0))
            if written < stale and activity != entry.packets_in + entry.packets_out:
                self.publish(entry)

    async def _publish_forever(self) -> None:
        ttl_ms = int(self.ttl_s * 1000)
        while True:
            await asyncio.sleep(PUBLISH_S)
            if not self._queue or not self.breaker.allow(time.monotonic()):
                continue
            batch, self._queue = self._queue, collections.OrderedDict()
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for key, value in batch.items():
                        pipe.set(key, value, px=ttl_ms)
                    await asyncio.wait_for(pipe.execute(), max(1.0, self.timeout * 10))
                self.breaker.succeeded()
                self.counts["published"] += len(batch)
            except Exception as exc:  # any client error: counted, the relay goes on
                self.breaker.failed(time.monotonic())
                self.counts["errors"] += 1
                self.counts["publish_dropped"] += len(batch)
                log.debug("route directory: publish failed: %s", exc)

    # -- look up ------------------------------------------------------------------------------

    def lookup(self, which: int, key: bytes, source: tuple[bytes, int], datagram: bytes) -> bool:
        """Hold ``datagram`` (a non-STUN miss) while the directory is asked about ``source``;
        False: not asked (no directory, known to be absent, breaker open, too busy)."""
        if not self.enabled:
            return False
        held = self._held.get(key)
        if held is not None:  # a lookup for this source is running
            if len(held) < HELD_PER_SOURCE:
                held.append(datagram)
                return True
            return False
        now = time.monotonic()
        if (source, now) in self.negative or len(self._held) >= LOOKUPS_MAX:
            return False
        if not self.breaker.allow(now):
            self.counts["skipped"] += 1
            return False
        self._held[key] = [datagram]
        self.counts["lookups"] += 1
        task = asyncio.get_running_loop().create_task(self._lookup(which, key, source))
        self._lookups.add(task)  # (a reference until it is done: the loop keeps only a weak one)
        task.add_done_callback(self._lookups.discard)
        return True

    async def _lookup(self, which: int, key: bytes, source: tuple[bytes, int]) -> None:
        ufrag = None
        try:
            value = await asyncio.wait_for(self._client.get(flow_key(self.cluster, *source)), self.timeout)
            self.breaker.succeeded()
            if value is None:
                self.counts["misses"] += 1
            else:
                ufrag = open_entry(self.keyring(), value, source, time.time()).ufrag
                self.counts["hits"] += 1
        except DirectoryError as exc:
            self.counts["refused"] += 1
            log.info("route directory: refused an entry for %s: %s", source, exc.reason)
        except Exception as exc:  # timeouts, refused connections, protocol errors
            self.breaker.failed(time.monotonic())
            self.counts["errors"] += 1
            log.debug("route directory: lookup failed: %s", exc)
        held = self._held.pop(key, [])
        if ufrag is None:
            self.negative.add(source, time.monotonic())
            self.drop("unknown_flow", len(held))
            return
        self.adopt(which, key, ufrag, held)
