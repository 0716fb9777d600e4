"""transceiver/path_moves.py: when media follows a client to a new address, and when not."""

from __future__ import annotations

from transceiver.path_moves import PathTracker

OLD = ("198.51.100.1", 40000)
NEW = ("198.51.100.1", 51234)


def media(paths: PathTracker, addr: tuple[str, int], start: float, end: float, step: float = 0.02) -> float:
    t = start
    while t < end:
        paths.heard(addr, t)
        t += step
    return t


def test_a_rebinding_moves_media_on_the_first_check_from_the_new_address() -> None:
    paths = PathTracker()
    media(paths, OLD, 0.0, 4.0)  # the call, until the NAT moves it
    paths.heard(NEW, 8.5)  # the client's next consent check, 4.5 s later
    assert paths.on_request(NEW, b"t1", OLD, 8.5) == "move"


def test_a_check_right_after_the_rebinding_moves_media_once_the_old_path_is_quiet() -> None:
    paths = PathTracker(quiet_s=1.0)
    media(paths, OLD, 0.0, 4.0)
    paths.heard(NEW, 4.1)
    assert paths.on_request(NEW, b"t1", OLD, 4.1) == "stay"  # the old path was heard 0.1 s ago
    t = 4.12
    moved_at = None
    while t < 6.0 and moved_at is None:  # the client's media now comes from NEW
        paths.heard(NEW, t)
        if paths.on_datagram(NEW, OLD, t):
            moved_at = t
        t += 0.02
    assert moved_at is not None and 4.98 <= moved_at <= 5.05


def test_never_away_from_a_live_path_whoever_asks() -> None:
    paths = PathTracker()
    t = 0.0
    for i in range(300):  # media on OLD every 20 ms, checks from a second live path every 2.5 s
        paths.heard(OLD, t)
        if i % 125 == 0:
            paths.heard(NEW, t)
            assert paths.on_request(NEW, f"check {i}".encode(), OLD, t) == "stay"
        assert not paths.on_datagram(NEW, OLD, t)
        t += 0.02


def test_a_replayed_request_never_moves_media() -> None:
    paths = PathTracker()
    media(paths, OLD, 0.0, 2.0)
    assert paths.on_request(OLD, b"seen", OLD, 2.0) == "stay"
    paths.heard(NEW, 9.0)  # the old path went quiet, and an attacker replays a captured check
    assert paths.on_request(NEW, b"seen", OLD, 9.0) == "replay"
    assert not paths.on_datagram(NEW, OLD, 9.1)


def test_a_stale_pending_move_is_forgotten() -> None:
    paths = PathTracker(quiet_s=1.0, pending_s=10.0)
    media(paths, OLD, 0.0, 4.0)
    paths.heard(NEW, 4.0)
    assert paths.on_request(NEW, b"t1", OLD, 4.0) == "stay"
    paths.heard(NEW, 20.0)  # nothing from NEW for 16 s, then one datagram
    assert not paths.on_datagram(NEW, OLD, 20.0)


def test_addresses_are_bounded_and_the_selected_one_is_kept() -> None:
    from transceiver.path_moves import ADDRESSES

    paths = PathTracker()
    for port in range(ADDRESSES * 3):  # a long call through many rebindings
        paths.heard(("198.51.100.1", 10_000 + port), float(port))
        paths.heard(OLD, float(port))  # the selected path keeps speaking
    assert len(paths.last_heard) == ADDRESSES and OLD in paths.last_heard
