"""The demo page and a signalling front in one network namespace for a transceiver in another
(tests/test_global_relay.py: a browser in the client's namespace, which has no route to the
transceiver's). Run under ``ip netns exec <transceiver ns>``::

    python tests/netns_bridge.py --into CLIENT_NS --page 8080 --front 8081 \\
        --backend http://127.0.0.1:8080 --relay 10.251.1.2:3478

It enters the client's namespace (setns) only to bind its two listening sockets there, then
comes back: what it accepts arrives from the client's namespace, what it forwards (the front's
requests to ``--backend``) leaves from the transceiver's. Prints ``READY`` and serves until
SIGTERM. Signalling only: media never passes here.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import signal
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

CLONE_NEWNET = 0x40000000


def setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({path})")
    finally:
        os.close(fd)


def listener(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    sock.setblocking(False)
    return sock


async def serve(args: argparse.Namespace) -> None:
    from aiohttp import web

    from cli.demo_page import make_demo_app
    from cli.signalling_front import SignallingFront

    own = f"/proc/{os.getpid()}/ns/net"
    home = os.open(own, os.O_RDONLY)  # the transceiver's namespace, to come back to
    setns(f"/run/netns/{args.into}")
    page_sock, front_sock = listener(args.page), listener(args.front)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(home, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns back")
    os.close(home)
    front = SignallingFront([args.backend])
    runners = []
    for app, sock in ((make_demo_app(f"http://127.0.0.1:{args.front}/v1/sessions", args.relay), page_sock),
                      (front.app(), front_sock)):
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        runners.append(runner)
    print("READY", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for runner in runners:
        await runner.cleanup()
    await front.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--into", required=True, help="the namespace whose loopback gets the listeners")
    parser.add_argument("--page", type=int, required=True)
    parser.add_argument("--front", type=int, required=True)
    parser.add_argument("--backend", required=True, help="the transceiver's signalling base URL (this namespace)")
    parser.add_argument("--relay", required=True, help="shown on the page: the relay clients send to")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
