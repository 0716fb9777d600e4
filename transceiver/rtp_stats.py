"""A call's RTP counters, read from aiortc's own bookkeeping (no API exposes them cheaply):
packets received and lost (by sequence number) per remote stream, packets sent per sender.
For /metrics (audio loss) and the transceiver benchmark."""

from __future__ import annotations

from collections.abc import Iterable

from aiortc import RTCPeerConnection

__all__ = ["RtpCounts", "rtp_counts"]


class RtpCounts:
    __slots__ = ("received", "lost", "sent")

    def __init__(self, received: int = 0, lost: int = 0, sent: int = 0) -> None:
        self.received, self.lost, self.sent = received, lost, sent

    def add(self, other: RtpCounts) -> None:
        self.received += other.received
        self.lost += other.lost
        self.sent += other.sent


def rtp_counts(pcs: Iterable[RTCPeerConnection]) -> RtpCounts:
    counts = RtpCounts()
    for pc in pcs:
        for transceiver in pc.getTransceivers():
            for stream in getattr(transceiver.receiver, "_RTCRtpReceiver__remote_streams", {}).values():
                counts.received += stream.packets_received
                counts.lost += max(0, stream.packets_expected - stream.packets_received)
            counts.sent += getattr(transceiver.sender, "_RTCRtpSender__packet_count", 0)
    return counts
