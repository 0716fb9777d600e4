"""Fuzzing the relay's parsers: STUN, route tokens, tunnel frames, and the whole miss-path decision.

Every target fails on any exception other than the named one (StunError, TokenError,
FrameError, each with a reason its module lists); ``decide`` must never raise at all.

- The saved corpus (``tests/fuzz_corpus/<target>/``, seeds made from valid messages by
  ``make_corpus``; regenerate with ``python tests/test_fuzz.py corpus``) is replayed in full.
- Coverage-guided: atheris (libFuzzer) runs each target for a few seconds, starting from the
  corpus; new inputs go to a temporary directory, never into the repository. A finding is
  reported with the input as hex; add it to the corpus (``fuzz_corpus/<target>/``) when fixed.
  Run one target by hand: ``python tests/test_fuzz.py atheris frame -max_total_time=60 NEW_DIR
  tests/fuzz_corpus/frame`` (libFuzzer writes new inputs to the first directory).
- hypothesis mutates corpus seeds (truncate, flip, splice, insert) as a second, always
  available engine.
"""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
for _p in (str(ROOT), str(TESTS)):
    if _p not in sys.path:  # run as a script
        sys.path.insert(0, _p)

# E402: these imports need the sys.path set-up above when this file runs as a script.
from fuzz_targets import CLUSTER, KEYRING, NOW, SOURCE  # noqa: E402
from fuzz_targets import FUZZ_TARGETS as TARGET_FUNCS  # noqa: E402
from fuzz_targets import FuzzView as _View  # noqa: E402

from relay.decision import AuthPolicy, Drop, Learn, decide  # noqa: E402
from wire.route_token import RouteKeyring, TokenError, derive_password, issue_token  # noqa: E402
from wire.stun import (  # noqa: E402
    ATTR_USERNAME,
    BINDING_INDICATION,
    BINDING_REQUEST,
    build_binding_request,
    build_binding_success,
    build_message,
)
from wire.tunnel_frame import (  # noqa: E402
    Data,
    Drain,
    FrameError,
    Heartbeat,
    SessionClosed,
    data_header,
    decode_frame,
    encode_frame,
)

CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
TARGETS = ("stun", "token", "frame", "decide")
_AUTH = AuthPolicy(KEYRING, 300.0, CLUSTER)
CORPUS_DIRS = {"stun": "stun", "token": "token", "frame": "frame", "decide": "stun"}  # decide reuses STUN seeds

# -- corpus ---------------------------------------------------------------------------------


def _request(ufrag: str, password: str, *, fingerprint: bool = True, use_candidate: bool = True, client: str = "cli") -> bytes:
    return build_binding_request(b"fuzzcorpus01", f"{ufrag}:{client}", password.encode(), priority=0x6E0001FF,
                                 controlling=True, tie_breaker=0x0102030405060708, use_candidate=use_candidate,
                                 fingerprint=fingerprint)


# A SessionClosed frame whose ufrag is not UTF-8: version, fixarray(2), tag 3, fixstr(1) 0xb0.
# msgspec raises UnicodeDecodeError for it (found by the frame fuzzer).
POISON_FRAME = bytes.fromhex("019203a1b0")


def make_corpus() -> dict[str, dict[str, bytes]]:
    """Seeds from valid messages (deterministic: fixed secrets, nonces, clock)."""
    v4 = socket.inet_aton("10.0.0.7")
    v6 = socket.inet_pton(socket.AF_INET6, "fd00::7")
    other = RouteKeyring({9: b"fuzz-corpus-unknown-key-nine-009"}, 9)
    tokens = {
        "v4": issue_token(KEYRING, v4, 40000, NOW, nonce=b"\x01" * 6),
        "v6": issue_token(KEYRING, v6, 40000, NOW, nonce=b"\x02" * 6),
        "v4-cluster": issue_token(KEYRING, v4, 40000, NOW, cluster=CLUSTER, nonce=b"\x03" * 6),
        "v6-other-cluster": issue_token(KEYRING, v6, 40000, NOW, cluster=CLUSTER + 1, nonce=b"\x04" * 6),
        "v4-expired": issue_token(KEYRING, v4, 40000, NOW - 3600, nonce=b"\x05" * 6),
        "v4-future": issue_token(KEYRING, v4, 40000, NOW + 3600, nonce=b"\x06" * 6),
        "v4-unknown-key": issue_token(other, v4, 40000, NOW, nonce=b"\x07" * 6),
        "v4-key2": issue_token(RouteKeyring(KEYRING._secrets, 2), v4, 40000, NOW, nonce=b"\x08" * 6),
    }
    token_seeds = {f"{name}.txt": t.encode() for name, t in tokens.items()}
    stun_seeds = {}
    for name in ("v4", "v6", "v4-cluster", "v4-expired", "v4-key2"):
        ufrag = tokens[name]
        stun_seeds[f"request-{name}.bin"] = _request(ufrag, derive_password(KEYRING, ufrag))
    ufrag = tokens["v4"]
    pwd = derive_password(KEYRING, ufrag)
    stun_seeds["request-no-fingerprint.bin"] = _request(ufrag, pwd, fingerprint=False, use_candidate=False)
    stun_seeds["request-wrong-password.bin"] = _request(ufrag, "x" * 43)
    stun_seeds["request-client-part-altered.bin"] = _request(ufrag, pwd).replace(b":cli", b":clx", 1)
    stun_seeds["request-unicode-username.bin"] = _request("\u30de\u30c8\u30ea\u30c3\u30af\u30b9", "p" * 22)
    stun_seeds["success-v4.bin"] = build_binding_success(b"fuzzcorpus02", ("192.0.2.1", 32853), pwd.encode())
    stun_seeds["success-v6.bin"] = build_binding_success(b"fuzzcorpus03", ("2001:db8::1", 32853), None)
    stun_seeds["indication.bin"] = build_message(BINDING_INDICATION, b"fuzzcorpus04", [], None, True)
    stun_seeds["mi-sha256.bin"] = build_message(BINDING_REQUEST, b"fuzzcorpus05",
                                                [(ATTR_USERNAME, f"{ufrag}:c".encode()), (0x001C, b"\x11" * 32)], pwd.encode())
    ip4 = socket.inet_aton("192.0.2.10")
    ip6 = socket.inet_pton(socket.AF_INET6, "2001:db8::10")
    frame_seeds = {
        "data-v4-fixed.bin": data_header(0x0001_0000_0000_0005, ip4, 50000, 4) + b"\x80\x6f\x00\x01",
        "data-v6-fixed.bin": data_header(0x0002_0001_0000_0009, ip6, 50001, 3) + b"\x16\xfe\xfd",
        "data-v4-compact.bin": encode_frame(Data(5, ip4, 50000, stun_seeds["request-v4.bin"])),
        "heartbeat.bin": encode_frame(Heartbeat(3, 50, False)),
        "heartbeat-draining.bin": encode_frame(Heartbeat(0, 50, True)),
        "session-closed.bin": encode_frame(SessionClosed(tokens["v4"])),
        "drain.bin": encode_frame(Drain(12.5)),
        "drain-default.bin": encode_frame(Drain()),
        # Findings, kept as regression inputs.
        "regression-session-closed-not-utf8.bin": POISON_FRAME,
    }
    return {"stun": stun_seeds, "token": token_seeds, "frame": frame_seeds}


def corpus_files(target: str) -> list[Path]:
    return sorted((CORPUS / CORPUS_DIRS[target]).iterdir())


# -- tests ----------------------------------------------------------------------------------


def test_corpus_is_saved_and_current() -> None:
    """The saved corpus holds at least every seed make_corpus() makes (plus any findings added)."""
    for kind, seeds in make_corpus().items():
        for name, data in seeds.items():
            path = CORPUS / kind / name
            assert path.exists(), f"{path} missing: run `python tests/test_fuzz.py corpus`"
            assert path.read_bytes() == data, f"{path} is stale: run `python tests/test_fuzz.py corpus`"


def test_corpus_seeds_reach_the_deepest_checks() -> None:
    """A corpus that starts deep: valid requests are learned, the broken ones fail late."""
    seeds = {p.name: p.read_bytes() for p in corpus_files("decide")}
    results = {name: decide(data, SOURCE, _View(), _AUTH, NOW) for name, data in seeds.items()}
    for name in ("request-v4.bin", "request-v6.bin", "request-v4-cluster.bin"):
        assert isinstance(results[name], Learn), (name, results[name])
    assert results["request-no-fingerprint.bin"] == Drop("stun_no_fingerprint")
    assert results["request-v4-key2.bin"] == Drop("session_closed")  # (the view closes it) the last check
    assert results["request-wrong-password.bin"] == Drop("stun_bad_integrity")
    assert results["request-client-part-altered.bin"] == Drop("stun_bad_integrity")
    assert results["request-v4-expired.bin"] == Drop("token_expired")


@pytest.mark.parametrize("target", [*(t for t in TARGETS if t != "frame"),
                                    "frame"])
def test_corpus_replays_without_unexpected_exceptions(target: str) -> None:
    files = corpus_files(target)
    assert files, f"empty corpus for {target}"
    for path in files:
        data = path.read_bytes()
        try:
            TARGET_FUNCS[target](data)
        except Exception as exc:  # a named error of the right reason never gets here
            pytest.fail(f"{target} raised {type(exc).__name__}: {exc} on {path.name} ({data.hex()})")


def _mutations(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    def mutate(draw_args: tuple[bytes, int, list[tuple[int, int]], bytes, bytes]) -> bytes:
        seed, cut, flips, insert, other = draw_args
        buf = bytearray(seed[: max(0, min(len(seed), cut))] if cut >= 0 else seed)
        for pos, xor in flips:
            if buf:
                buf[pos % len(buf)] ^= xor
        if insert:
            at = (flips[0][0] if flips else 0) % (len(buf) + 1)
            buf[at:at] = insert
        if other and len(buf) > 4:
            buf[len(buf) // 2 :] = other  # splice with another seed's tail
        return bytes(buf)

    return st.one_of(
        st.binary(max_size=600),
        st.tuples(
            st.sampled_from(seeds),
            st.integers(-1, 600),
            st.lists(st.tuples(st.integers(0, 599), st.integers(1, 255)), max_size=6),
            st.binary(max_size=24),
            st.one_of(st.just(b""), st.sampled_from(seeds)),
        ).map(mutate),
    )


def _hypothesis_fuzz(target: str, examples: int, derandomize: bool = False) -> None:
    seeds = [p.read_bytes() for p in corpus_files(target)]
    func = TARGET_FUNCS[target]

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=[Phase.explicit, Phase.generate], derandomize=derandomize)  # no shrinking: the input is printed as found
    @given(_mutations(seeds))
    def run(data: bytes) -> None:
        func(data)

    run()


@pytest.mark.parametrize("target", ["stun", "token", "decide"])
def test_hypothesis_mutations_of_the_corpus(target: str) -> None:
    _hypothesis_fuzz(target, 400)


def test_hypothesis_mutations_of_the_frame_corpus() -> None:
    _hypothesis_fuzz("frame", 400, derandomize=True)  # deterministic while it is an expected failure


def test_frame_with_a_non_utf8_string_is_a_frame_error() -> None:
    assert encode_frame(SessionClosed("x"))[:-1] + b"\xb0" == POISON_FRAME
    with pytest.raises(FrameError) as info:
        decode_frame(POISON_FRAME)
    assert info.value.reason == "frame_malformed"


def test_derive_password_of_a_non_ascii_ufrag_is_a_token_error() -> None:
    ufrag = issue_token(KEYRING, socket.inet_aton("10.0.0.7"), 40000, NOW)[:-1] + "\u00e9"
    with pytest.raises(TokenError):
        derive_password(KEYRING, ufrag)


def _atheris_available() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


ATHERIS_SECONDS = 4  # per target; the four run at once (about 7 s of wall time in all)


# The runner instruments the relay's modules as it imports them (atheris.instrument_imports),
# and nothing else: instrument_all() on a process that has pytest and hypothesis loaded takes
# minutes.
_ATHERIS_RUNNER = """
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import atheris
with atheris.instrument_imports(include=["relay"]):
    import relay.decision, wire.demux, wire.route_token, wire.stun, wire.tunnel_frame
import fuzz_targets
atheris.Setup([sys.argv[0], *sys.argv[2:]], fuzz_targets.FUZZ_TARGETS[sys.argv[1]])
atheris.Fuzz()
"""


def atheris_command(target: str, libfuzzer_args: list[str]) -> list[str]:
    return [sys.executable, "-c", _ATHERIS_RUNNER.format(root=str(ROOT), tests=str(TESTS)), target, *libfuzzer_args]


@pytest.fixture(scope="module")
def atheris_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, str]]:
    """Every target fuzzed at once, each from its corpus: target -> (exit code, stderr, findings)."""
    if not _atheris_available():
        pytest.fail("atheris is not installed: it is in the test extras (scripts/test installs it)")
    tmp = tmp_path_factory.mktemp("atheris")
    procs = {}
    for target in TARGETS:
        out = tmp / target
        out.mkdir()
        args = atheris_command(target, [f"-max_total_time={ATHERIS_SECONDS}", "-timeout=10", "-rss_limit_mb=2048",
                                        f"-artifact_prefix={tmp}/{target}-", "-print_final_stats=1",
                                        str(out), str(CORPUS / CORPUS_DIRS[target])])
        procs[target] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp)
    results = {}
    for target, proc in procs.items():
        try:
            _, err = proc.communicate(timeout=ATHERIS_SECONDS + 90)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        findings = "\n".join(f"{c.name}: {c.read_bytes().hex()}" for c in sorted(tmp.glob(f"{target}-*")))
        results[target] = (proc.returncode, err, findings)
    return results


def _check_atheris(target: str, runs: dict[str, tuple[int, str, str]]) -> None:
    code, err, findings = runs[target]
    tail = "\n".join(err.splitlines()[-40:])
    assert code == 0, f"atheris {target}: exit {code}\ninputs (hex):\n{findings}\n{tail}"
    assert "Done" in err and "stat::number_of_executed_units" in err, tail


@pytest.mark.parametrize("target", ["stun", "token", "decide"])
def test_atheris_coverage_guided(target: str, atheris_runs: dict[str, tuple[int, str, str]]) -> None:
    _check_atheris(target, atheris_runs)


def test_atheris_coverage_guided_frame(atheris_runs: dict[str, tuple[int, str, str]]) -> None:
    _check_atheris("frame", atheris_runs)


# -- command line ---------------------------------------------------------------------------


def _write_corpus() -> None:
    for kind, seeds in make_corpus().items():
        folder = CORPUS / kind
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in seeds.items():
            (folder / name).write_bytes(data)
        print(f"{folder}: {len(seeds)} seeds")


if __name__ == "__main__":
    if sys.argv[1:2] == ["corpus"]:
        _write_corpus()
    elif sys.argv[1:2] == ["atheris"] and len(sys.argv) > 2 and sys.argv[2] in TARGET_FUNCS:
        sys.exit(subprocess.run(atheris_command(sys.argv[2], sys.argv[3:]), check=False).returncode)
    else:
        sys.exit(f"usage: {sys.argv[0]} corpus | atheris {{{','.join(TARGETS)}}} [libFuzzer args] [corpus dirs]")
