"""Calls through the real relay: a transceiver in this process, aiortc callers, shm views."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import uvloop
from relayproc import RelayProcess
from webrtc_peer import IN_PROCESS_ADMISSION, Client, wait_for

from transceiver.service import Transceiver, TransceiverConfig

SDP = {"Content-Type": "application/sdp"}


def run(main: Callable[[], Awaitable[None]], timeout: float = 90) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(main(), timeout)

    uvloop.run(bounded())


class Call:
    """One transceiver behind the real relay, and the calls made through it."""

    def __init__(self, relay: RelayProcess) -> None:
        self.relay = relay
        self.clients: list[Client] = []

    async def __aenter__(self) -> Call:
        host, port = self.relay.address
        config = TransceiverConfig(relay_public_addresses=[f"{host}:{port}"], http_port=0,
                                   route_keys_file=str(self.relay.keys_path), **IN_PROCESS_ADMISSION)
        self.tx = Transceiver(config)
        await self.tx.start()
        self.http = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for client in self.clients:
            await client.close()
        await self.tx.stop()
        await self.http.close()

    @property
    def base(self) -> str:
        assert self.tx.http_address is not None
        return f"http://127.0.0.1:{self.tx.http_address[1]}"

    @property
    def tunnel_port(self) -> int:
        assert self.tx.tunnel is not None and self.tx.tunnel.local_address is not None
        return self.tx.tunnel.local_address[1]

    async def dial(self) -> Client:
        client = Client()
        self.clients.append(client)
        async with self.http.post(f"{self.base}/v1/sessions", data=await client.offer(), headers=SDP) as response:
            assert response.status == 201, await response.text()
            client.location = response.headers["Location"]
            await client.accept(await response.text())
        return client

    async def connected(self, client: Client, timeout: float = 20) -> None:
        await wait_for(lambda: client.pc.connectionState == "connected", timeout, "the client to connect through the relay")

    def relay_flows(self) -> list:
        return self.relay.table_flows()
