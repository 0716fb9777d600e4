"""Offer checks and rewriting before aiortc sees an offer. Sans-IO: text in, text or a named error out.

Behind the relay the client is learned as a peer-reflexive candidate from its first
connectivity check, so its own candidates are removed from the offer:

- connecting to them would make the transceiver probe addresses through the relay (which
  refuses to reflect to addresses it has no flow for) and made connection ~10x slower;
- a ``.local`` (mDNS) candidate would make aioice open a multicast socket to resolve it;
- ``a=end-of-candidates`` goes too: with no remote candidate left, aioice would fail the
  check list at once instead of waiting for the client's checks.

Only the shape this service supports is accepted: at least one audio or application
(data channel) m-line, every m-line in one BUNDLE group (a single ICE transport, the only
one the tunnel integration patches), ICE credentials present.
"""

from __future__ import annotations

__all__ = ["OFFER_ERROR_REASONS", "OfferError", "NotBundledError", "prepare_offer"]

MAX_OFFER_BYTES = 64 * 1024

OFFER_ERROR_REASONS = frozenset(
    {
        "sdp_empty",
        "sdp_too_large",
        "sdp_malformed",  # not SDP at all: no v=0, bad m-line, non-text
        "sdp_no_media",  # no audio or application m-line
        "sdp_no_mid",  # an m-line without a=mid (BUNDLE needs mids)
        "sdp_not_bundle",  # no BUNDLE group, or one that leaves m-lines out
        "sdp_no_ice_credentials",
        "sdp_rejected",  # aiortc refused it (codecs, DTLS, ...): the detail says why
    }
)


class OfferError(Exception):
    """An offer this service will not answer; ``reason`` is one of OFFER_ERROR_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in OFFER_ERROR_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class NotBundledError(OfferError):
    """The offer's m-lines do not share one BUNDLE transport."""

    def __init__(self, detail: str = "") -> None:
        super().__init__("sdp_not_bundle", detail)


_STRIPPED_PREFIXES = ("a=candidate:", "a=end-of-candidates", "a=remote-candidates:")


def prepare_offer(text: str) -> str:
    """Validate an offer's shape and return it without the client's candidates (CRLF lines)."""
    if not text.strip():
        raise OfferError("sdp_empty")
    if len(text) > MAX_OFFER_BYTES:
        raise OfferError("sdp_too_large", f"{len(text)} bytes, at most {MAX_OFFER_BYTES}")
    lines = [line.rstrip("\r") for line in text.split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    if lines[0] != "v=0":
        raise OfferError("sdp_malformed", "first line is not v=0")

    media: list[dict[str, object]] = []  # one per m-line: kind, mid, ufrag, pwd
    session_ice = {"ufrag": False, "pwd": False}
    bundles: list[list[str]] = []
    kept: list[str] = []
    for line in lines:
        if len(line) < 2 or line[1] != "=":
            raise OfferError("sdp_malformed", f"not a type=value line: {line[:40]!r}")
        if line.startswith(_STRIPPED_PREFIXES):
            continue
        kept.append(line)
        if line.startswith("m="):
            parts = line[2:].split()
            if len(parts) < 4 or not parts[1].split("/")[0].isdigit():
                raise OfferError("sdp_malformed", f"bad m-line: {line[:60]!r}")
            media.append({"kind": parts[0], "mid": None, "ufrag": False, "pwd": False})
        elif line.startswith("a=group:BUNDLE") and not media:
            bundles.append(line[len("a=group:BUNDLE") :].split())
        elif line.startswith(("a=mid:", "a=ice-ufrag:", "a=ice-pwd:")):
            name, _, value = line[2:].partition(":")
            target = media[-1] if media else session_ice
            if name == "mid":
                if not media:
                    raise OfferError("sdp_malformed", "a=mid outside an m-line")
                target["mid"] = value.strip()
            else:
                target["ufrag" if name == "ice-ufrag" else "pwd"] = bool(value.strip())

    if not any(m["kind"] in ("audio", "application") for m in media):
        raise OfferError("sdp_no_media", "need an audio or application (data channel) m-line")
    mids = []
    for index, m in enumerate(media):
        if not m["mid"]:
            raise OfferError("sdp_no_mid", f"m-line {index} ({m['kind']}) has no a=mid")
        mids.append(m["mid"])
        for key in ("ufrag", "pwd"):
            if not (m[key] or session_ice[key]):
                raise OfferError("sdp_no_ice_credentials", f"m-line {index} has no ice-{key}")
    if not bundles:
        raise NotBundledError("the offer has no a=group:BUNDLE; one ICE transport for all m-lines is required")
    if set(bundles[0]) != set(mids) or len(bundles) > 1:
        raise NotBundledError(f"BUNDLE group {bundles[0]} must list every m-line {mids}, in a single group")
    return "\r\n".join(kept) + "\r\n"
