"""WHIP as RFC 9725 says: bearer-token authentication (signed tokens and a tokens file),
sessions owned by their subject and limited per subject, Accept-Post and ICE-server Link
headers on OPTIONS and on the 201; through the real signalling and `rtcrelay whip-token`."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_transceiver_calls import SDP, Harness, loopback_client, run  # noqa: F401 (fixture)
from webrtc_peer import Client

from daemon.config_file import ConfigError
from daemon.keys import WHIP_KEYS, generate_keys_toml, load_keyring
from transceiver.bearer import BearerError, BearerVerifier, issue_bearer, load_tokens_file
from transceiver.ice_links import IceServer
from wire.route_token import RouteKeyring

ROOT = Path(__file__).resolve().parents[1]
KEYS = RouteKeyring({3: b"whip-token-key-of-the-auth-tests!!"}, 3)
NOW = 1_800_000_000.0


# -- tokens without sockets ----------------------------------------------------------------------


def test_a_signed_token_names_its_subject_until_it_expires() -> None:
    verifier = BearerVerifier(KEYS, {})
    token = issue_bearer(KEYS, "alice@example", NOW, ttl_s=60)
    assert verifier.subject(f"Bearer {token}", NOW + 59) == "alice@example"
    assert verifier.subject(f"bearer   {token} ", NOW) == "alice@example"  # scheme is case-insensitive
    with pytest.raises(BearerError, match="expired") as info:
        verifier.subject(f"Bearer {token}", NOW + 61)
    assert info.value.status == 401 and 'error="invalid_token"' in info.value.www_authenticate()


@pytest.mark.parametrize(("header", "error"), [
    (None, None),
    ("", None),
    ("Basic dXNlcjpwYXNz", "invalid_request"),
    ("Bearer", "invalid_request"),
    ("Bearer rtw1.3.1900000000.alice.AAAAAAAAAAAAAAAAAAAAAA", "invalid_token"),  # a MAC nobody made
    ("Bearer rtw1.9.1900000000.alice.AAAAAAAAAAAAAAAAAAAAAA", "invalid_token"),  # an unknown key id
    ("Bearer rtw1.3.soon.alice.AAAA", "invalid_token"),
    ("Bearer " + "x" * 600, "invalid_token"),
    ("Bearer not-a-token", "invalid_token"),
])
def test_bad_authorization_headers_get_401_with_the_rfc6750_error(header: str | None, error: str | None) -> None:
    with pytest.raises(BearerError) as info:
        BearerVerifier(KEYS, {}).subject(header, NOW)
    assert info.value.status == 401 and info.value.error == error
    assert info.value.www_authenticate().startswith('Bearer realm="rtcrelay"')


def test_a_token_altered_to_another_subject_is_refused() -> None:
    token = issue_bearer(KEYS, "alice", NOW, ttl_s=60)
    forged = token.replace(".alice.", ".mallory.")
    with pytest.raises(BearerError, match="bad signature"):
        BearerVerifier(KEYS, {}).subject(f"Bearer {forged}", NOW)


def test_the_tokens_file(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# subject token\nbilling-service  s3cret-token-of-billing\n\nops  another-long-token-0001  # ok\n")
    verifier = BearerVerifier(None, load_tokens_file(str(path)))
    assert verifier.subject("Bearer s3cret-token-of-billing", NOW) == "billing-service"
    assert verifier.subject("Bearer another-long-token-0001", NOW) == "ops"
    with pytest.raises(BearerError):
        verifier.subject("Bearer s3cret-token-of-billinG", NOW)
    path.write_text("billing-service short\n")
    with pytest.raises(ConfigError, match=r"tokens:1: expected `subject token`"):
        load_tokens_file(str(path))


def test_whip_token_issue_on_the_command_line(tmp_path: Path) -> None:
    keys = tmp_path / "whip-keys.toml"
    keys.write_text(generate_keys_toml(5))
    out = subprocess.run([sys.executable, "-m", "cli.main", "whip-token", "issue", "--subject", "bob", "--ttl", "60",
                          "--keys", str(keys)], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 0, out.stderr
    import time

    verifier = BearerVerifier(load_keyring(str(keys), WHIP_KEYS), {})
    assert verifier.subject("Bearer " + out.stdout.strip(), time.time()) == "bob"
    bad = subprocess.run([sys.executable, "-m", "cli.main", "whip-token", "issue", "--subject", "bob", "--keys",
                          str(tmp_path / "missing.toml")], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert bad.returncode != 0 and "WHIP token keys" in bad.stderr


# -- through the signalling ---------------------------------------------------------------------


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "whip-token-keys.toml"
    path.write_text(generate_keys_toml(1))
    return path


def bearer(keys_file: Path, subject: str) -> dict[str, str]:
    import time

    token = issue_bearer(load_keyring(str(keys_file), WHIP_KEYS), subject, time.time(), 300)
    return {"Authorization": f"Bearer {token}"}


def test_sessions_need_a_token_and_belong_to_their_subject(keys_file: Path) -> None:
    async def main() -> None:
        async with Harness(whip_token_keys_file=str(keys_file)) as h:
            client = Client()
            h.clients.append(client)
            offer = await client.offer()
            status, headers, text = await h.post(offer)
            assert status == 401 and headers["WWW-Authenticate"] == 'Bearer realm="rtcrelay"', text
            status, headers, text = await h.post(offer, {**SDP, "Authorization": "Bearer nope"})
            assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]
            alice, mallory = bearer(keys_file, "alice"), bearer(keys_file, "mallory")
            status, headers, answer = await h.post(offer, {**SDP, **alice})
            assert status == 201, answer
            location = headers["Location"]
            await client.accept(answer)
            for method in ("GET", "DELETE"):
                async with h.http.request(method, h.url(location)) as r:
                    assert r.status == 401
                async with h.http.request(method, h.url(location), headers=mallory) as r:
                    assert r.status == 403 and 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]
            async with h.http.patch(h.url(location), headers={**mallory, "If-Match": "*",
                                                              "Content-Type": "application/trickle-ice-sdpfrag"}) as r:
                assert r.status == 403
            async with h.http.get(h.url(location), headers=alice) as r:
                assert r.status == 200
            async with h.http.delete(h.url(location), headers=alice) as r:
                assert r.status == 204
            metrics = await h.metrics()
            assert 'rtcrelay_transceiver_auth_failures_total{reason="missing"} 3' in metrics
            assert 'rtcrelay_transceiver_auth_failures_total{reason="invalid_token"} 1' in metrics
            assert 'rtcrelay_transceiver_auth_failures_total{reason="insufficient_scope"} 3' in metrics

    run(main)


def test_sessions_per_subject_are_limited_and_counted(keys_file: Path) -> None:
    async def main() -> None:
        async with Harness(whip_token_keys_file=str(keys_file), max_sessions_per_subject=2) as h:
            alice = bearer(keys_file, "alice")
            for _ in range(2):
                client = Client(audio=False)
                h.clients.append(client)
                status, _, text = await h.post(await client.offer(), {**SDP, **alice})
                assert status == 201, text
            client = Client(audio=False)
            h.clients.append(client)
            status, headers, text = await h.post(await client.offer(), {**SDP, **alice})
            assert status == 429 and text.startswith("subject_limit: alice holds 2") and headers["Retry-After"] == "2"
            status, _, text = await h.post(await client.offer(), {**SDP, **bearer(keys_file, "bob")})
            assert status == 201, text  # another subject is not limited by alice's calls
            assert 'rtcrelay_transceiver_offers_rejected_total{reason="subject_limit"} 1' in await h.metrics()

    run(main)


def test_options_says_what_a_post_takes_and_which_ice_servers_to_use() -> None:
    async def main() -> None:
        servers = [IceServer(urls=["turn:turn.example.net:3478?transport=udp", "turns:turn.example.net:5349"],
                             username="u1", credential="p1"), IceServer(urls=["stun:stun.example.net"])]
        async with Harness(ice_servers=servers) as h:
            async with h.http.options(h.url()) as r:
                assert r.status == 204 and r.headers["Accept-Post"] == "application/sdp"
                links = r.headers.getall("Link")
            assert links == [
                '<turn:turn.example.net:3478?transport=udp>; rel="ice-server"; username="u1"; credential="p1"; '
                'credential-type="password"',
                '<turns:turn.example.net:5349>; rel="ice-server"; username="u1"; credential="p1"; credential-type="password"',
                '<stun:stun.example.net>; rel="ice-server"',
            ]
            client = Client(audio=False)
            h.clients.append(client)
            async with h.http.post(h.url(), data=await client.offer(), headers=SDP) as r:
                assert r.status == 201 and r.headers.getall("Link") == links
                assert r.headers["ETag"].startswith('"')  # strong
                assert "Link" in r.headers["Access-Control-Expose-Headers"]

    run(main)


@pytest.mark.parametrize(("servers", "message"), [
    ([{"urls": []}], "at least one URL"),
    ([{"urls": ["http://turn.example.net"]}], "not a stun:, turn: or turns: URI"),
    ([{"urls": ["turn:x"], "username": 'a"b'}], "quotes"),
])
def test_bad_ice_servers_name_the_problem(servers: list[dict[str, object]], message: str) -> None:
    import msgspec

    from transceiver.service import TransceiverConfig

    with pytest.raises((msgspec.ValidationError, ValueError), match=message):
        msgspec.convert({"relay_public_addresses": ["127.0.0.1:1"], "ice_servers": servers}, TransceiverConfig)


def test_up_s_signalling_front_passes_tokens_and_their_answers_through(keys_file: Path) -> None:
    from aiohttp import web

    from cli.signalling_front import SignallingFront

    async def main() -> None:
        async with Harness(whip_token_keys_file=str(keys_file)) as h:
            front = SignallingFront([h.url("")])
            runner = web.AppRunner(front.app())
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            url = f"http://127.0.0.1:{port}/v1/sessions"
            try:
                async with h.http.options(url) as r:
                    assert r.headers["Accept-Post"] == "application/sdp"
                client = Client(audio=False)
                h.clients.append(client)
                offer = await client.offer()
                async with h.http.post(url, data=offer, headers=SDP) as r:
                    assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
                async with h.http.post(url, data=offer, headers={**SDP, **bearer(keys_file, "carol")}) as r:
                    assert r.status == 201, await r.text()
                    location = r.headers["Location"]
                async with h.http.delete(f"http://127.0.0.1:{port}{location}", headers=bearer(keys_file, "dave")) as r:
                    assert r.status == 403
            finally:
                await front.close()
                await runner.cleanup()

    run(main)
