"""Trickle-ICE SDP fragments (RFC 8840, ``application/trickle-ice-sdpfrag``), as WHIP's PATCH
carries them (RFC 9725 section 4.3): parse the client's, build ours. Sans-IO.

A client's fragment holds ``a=ice-ufrag``/``a=ice-pwd`` (new ones: an ICE restart), the
``m=`` line and ``a=mid`` of the bundle's first section, ``a=candidate`` lines and maybe
``a=end-of-candidates``. Ours answers an ICE restart: the new credentials, the same ``m=``/
``a=mid`` and our candidates (the relay's addresses: there are no others) with
``a=end-of-candidates``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["FRAGMENT_TYPE", "FragmentError", "IceFragment", "build_answer_fragment", "parse_fragment"]

FRAGMENT_TYPE = "application/trickle-ice-sdpfrag"
MAX_FRAGMENT_BYTES = 16 * 1024

# RFC 8839 section 5.4: ice-char = ALPHA / DIGIT / "+" / "/"; ufrag 4-256, pwd 22-256.
_UFRAG = re.compile(r"[A-Za-z0-9+/]{4,256}")
_PWD = re.compile(r"[A-Za-z0-9+/]{22,256}")


class FragmentError(ValueError):
    """A fragment this service will not take; the text says why (the 400's body)."""


@dataclass
class IceFragment:
    ufrag: str | None = None
    pwd: str | None = None
    media: str | None = None  # the m= line, as sent
    mid: str | None = None
    candidates: list[str] = field(default_factory=list)  # "candidate:..." attribute values
    end_of_candidates: bool = False

    @property
    def credentials(self) -> tuple[str, str] | None:
        return (self.ufrag, self.pwd) if self.ufrag is not None and self.pwd is not None else None


def parse_fragment(text: str) -> IceFragment:
    """The client's fragment; FragmentError for lines an sdpfrag may not hold or bad values."""
    frag = IceFragment()
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("m="):
            if frag.media is None:
                frag.media = line
            continue
        if not line.startswith("a="):
            raise FragmentError(f"not an SDP fragment line: {line[:60]!r}")
        name, _, value = line[2:].partition(":")
        if name == "ice-ufrag" and frag.ufrag is None:
            if not _UFRAG.fullmatch(value):
                raise FragmentError("a=ice-ufrag: 4-256 ice-chars")
            frag.ufrag = value
        elif name == "ice-pwd" and frag.pwd is None:
            if not _PWD.fullmatch(value):
                raise FragmentError("a=ice-pwd: 22-256 ice-chars")
            frag.pwd = value
        elif name == "mid" and frag.mid is None:
            frag.mid = value
        elif name == "candidate":
            frag.candidates.append(line[2:])
        elif name == "end-of-candidates":
            frag.end_of_candidates = True
        # other attributes (ice-options, group, ...) carry nothing a restart needs
    if (frag.ufrag is None) != (frag.pwd is None):
        raise FragmentError("a=ice-ufrag and a=ice-pwd come together")
    return frag


def build_answer_fragment(request: IceFragment, ufrag: str, pwd: str, candidates: list[str]) -> str:
    """Our fragment for an ICE restart: new credentials, the request's m=/mid, our candidates."""
    lines = [f"a=ice-ufrag:{ufrag}", f"a=ice-pwd:{pwd}"]
    if request.media is not None:
        lines.append(request.media)
    if request.mid is not None:
        lines.append(f"a=mid:{request.mid}")
    lines += [f"a={c}" for c in candidates]
    lines.append("a=end-of-candidates")
    return "\r\n".join(lines) + "\r\n"
