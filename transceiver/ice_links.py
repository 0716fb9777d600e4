"""ICE servers for WHIP clients as ``Link`` headers (RFC 9725 section 4.6): a TURN server lets a
client that cannot send UDP to the relay (a firewall that allows only TCP/TLS) reach it
through TURN; the relay's address stays the transceiver's only candidate."""

from __future__ import annotations

import msgspec

__all__ = ["IceServer", "link_values"]


class IceServer(msgspec.Struct, forbid_unknown_fields=True):
    urls: list[str]  # stun:, turn:, turns: URIs (RFC 7064, RFC 7065)
    username: str = ""
    credential: str = ""

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError("an ICE server needs at least one URL")
        for url in self.urls:
            if not url.startswith(("stun:", "turn:", "turns:")) or any(c in url for c in '<>" \r\n'):
                raise ValueError(f"{url!r} is not a stun:, turn: or turns: URI")
        for value in (self.username, self.credential):
            if any(c in value for c in '"\\\r\n'):
                raise ValueError("username and credential may not hold quotes, backslashes or line breaks")


def link_values(servers: list[IceServer]) -> list[str]:
    """One ``Link`` header value per URL."""
    values = []
    for server in servers:
        for url in server.urls:
            value = f'<{url}>; rel="ice-server"'
            if server.username:
                value += f'; username="{server.username}"; credential="{server.credential}"; credential-type="password"'
            values.append(value)
    return values
