"""The request pipeline in process: routing, path checks, response scrubbing, a rotation replay, refusal phrases.

Each test runs the real sidecar and a real upstream in its own event loop
(tests/support/plane.py) and speaks raw HTTP to it: what goes in is what an app
sends, what is checked is what the app and the upstream get. The end-to-end files
(test_proxy_e2e, test_perimeter, adversarial/) run the same behaviour through the
CLI and both servers; these cover its cases in milliseconds.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import pytest
from aiohttp import web

from tests.support.leaks import make_secret
from tests.support.plane import Plane, RawResponse, data_plane, parse_response

REDACTED = "[redacted]"


def upstream(url: str, secret: str, **over: Any) -> dict[str, Any]:
    """An upstream on the harness's echo (or ``url``), its key in the apiKey query parameter."""
    return {"url": url, "secret": secret, "inject": {"query": "apiKey"}, "allow_private": True, **over}


@pytest.fixture
def keys() -> dict[str, str]:
    """One key per secret id the tests' upstreams name, for client alice."""
    return {name: make_secret(f"pipeline-{name}") for name in ("a", "b", "root", "v2", "beta", "team", "tls")}


def store(keys: dict[str, str]) -> dict[str, str]:
    return {f"{name}/alice": key for name, key in keys.items()}


def assert_refused(resp: RawResponse, status: int, code: str, p: Plane) -> None:
    assert resp.status == status, resp.raw[:300]
    assert resp.header("X-Sidecar-Error") == code
    assert resp.json()["error"] == code
    assert p.upstream.received == [], "a refused request reached the upstream"


def injected(p: Plane) -> str:
    """The apiKey the upstream received last."""
    query = p.upstream.last().query
    return dict(pair.split("=", 1) for pair in query.split("&"))["apiKey"]


# ---------------------------------------------------------------- routing


async def test_route_mode_picks_the_upstream_by_its_name_and_maps_onto_its_base_path(keys: dict[str, str]) -> None:
    config = {"upstreams": {"a": upstream("${ECHO}/base-a", "a/{client_id}"), "b": upstream("${ECHO}", "b/{client_id}")}}
    async with data_plane(config, store(keys)) as p:
        assert (await p.request("GET", "/a/v1/x?q=1")).status == 200
        assert p.upstream.last().raw_path == f"/base-a/v1/x?q=1&apiKey={keys['a']}"
        assert (await p.request("GET", "/a")).status == 200
        assert p.upstream.last().path == "/base-a"
        assert (await p.request("GET", "/b")).status == 200
        assert p.upstream.last().raw_path == f"/?apiKey={keys['b']}"  # no base path: the root
        p.upstream.received.clear()
        # A name is a whole first segment, matched exactly.
        for target in ("/ab/x", "/A/x", "/", "/base-a/x"):
            assert_refused(await p.request("GET", target), 404, "unknown_upstream", p)


async def test_forward_proxy_takes_the_longest_base_path_that_prefixes_the_path(keys: dict[str, str]) -> None:
    config = {
        "upstreams": {
            "root": upstream("${ECHO}", "root/{client_id}"),
            "v2": upstream("${ECHO}/v2", "v2/{client_id}"),
            "beta": upstream("${ECHO}/v2/beta", "beta/{client_id}"),
        }
    }
    async with data_plane(config, store(keys)) as p:
        origin = p.upstream.url
        for path, expected in [
            ("/v2/beta/x", "beta"),
            ("/v2/beta", "beta"),
            ("/v2/betamax", "v2"),  # a base path prefixes whole segments only
            ("/v2", "v2"),
            ("/v20/x", "root"),
            ("/other", "root"),
        ]:
            resp = await p.request("GET", f"{origin}{path}?q=1")
            assert resp.status == 200, (path, resp.raw[:300])
            assert p.upstream.last().raw_path == f"{path}?q=1&apiKey={keys[expected]}", path
        assert {line["upstream"] for line in p.access_lines()} == {"beta", "v2", "root"}


def tls_upstream(secret: str, url: str = "https://api.example.test", **over: Any) -> dict[str, Any]:
    """An https upstream on port 443, dialled at the harness's TLS echo and checked against its CA."""
    return upstream(url, secret, connect_to="127.0.0.1:${ECHO_TLS_PORT}", ca_file="${CA_FILE}", **over)


async def test_http_on_port_80_reaches_an_https_upstream_on_443_over_tls(keys: dict[str, str]) -> None:
    """HTTP_PROXY clients send http://host/ for an https API: the sidecar upgrades it, never sends it in the clear."""
    config = {"upstreams": {"api": tls_upstream("tls/{client_id}")}}
    async with data_plane(config, store(keys), tls=True) as p:
        resp = await p.request("GET", "http://api.example.test/v1/x?q=1")
        assert resp.status == 200, resp.raw[:300]
        seen = p.upstream.last()
        assert seen.tls and seen.host == "api.example.test"
        assert seen.raw_path == f"/v1/x?q=1&apiKey={keys['tls']}"
        # The alias is port 80 only: another port on that host is no upstream.
        p.upstream.received.clear()
        assert_refused(await p.request("GET", "http://api.example.test:8080/v1/x"), 403, "destination_not_allowed", p)


async def test_an_http_upstream_on_port_80_keeps_that_origin_from_the_https_alias(keys: dict[str, str]) -> None:
    """docs/perimeter.md: the https upstream answers for http://host:80 unless one is configured as http://host."""
    config = {
        "upstreams": {
            "secure": tls_upstream("tls/{client_id}"),
            "plain": upstream("http://api.example.test/plain", "a/{client_id}", connect_to="127.0.0.1:${ECHO_PORT}"),
        }
    }
    async with data_plane(config, store(keys), tls=True) as p:
        assert (await p.request("GET", "http://api.example.test/plain/x")).status == 200
        assert not p.upstream.last().tls and injected(p) == keys["a"]
        p.upstream.received.clear()
        assert_refused(await p.request("GET", "http://api.example.test/other"), 403, "destination_not_allowed", p)


async def test_an_https_target_never_goes_on_in_the_clear(keys: dict[str, str]) -> None:
    config = {"upstreams": {"a": upstream("${ECHO}", "a/{client_id}")}}
    async with data_plane(config, store(keys)) as p:
        https = p.upstream.url.replace("http://", "https://")
        assert_refused(await p.request("GET", f"{https}/x"), 403, "destination_not_allowed", p)
        assert (await p.request("GET", f"{p.upstream.url}/x")).status == 200


async def test_forward_proxy_false_upstreams_are_reached_by_name_only(keys: dict[str, str]) -> None:
    config = {
        "upstreams": {
            "personal": upstream("${ECHO}/api", "a/{client_id}"),
            # The same API with a shared team key: route mode only, never picked by host.
            "team": upstream("${ECHO}/api", "team/{client_id}", forward_proxy=False),
            "hidden": upstream("${ECHO}/hidden", "b/{client_id}", forward_proxy=False),
        }
    }
    async with data_plane(config, store(keys)) as p:
        assert (await p.request("GET", f"{p.upstream.url}/api/x")).status == 200
        assert injected(p) == keys["a"]
        assert (await p.request("GET", "/team/x")).status == 200
        assert p.upstream.last().raw_path == f"/api/x?apiKey={keys['team']}"
        assert (await p.request("GET", "/hidden/x")).status == 200
        p.upstream.received.clear()
        resp = await p.request("GET", f"{p.upstream.url}/hidden/x")
        assert_refused(resp, 403, "destination_not_allowed", p)


@pytest.mark.parametrize("method", ["TRACE", "TRACK"])
async def test_methods_that_reflect_the_request_are_refused_in_every_mode(keys: dict[str, str], method: str) -> None:
    """An upstream implementing TRACE would echo the injected key back to the app."""
    config = {"upstreams": {"a": upstream("${ECHO}", "a/{client_id}")}}
    async with data_plane(config, store(keys)) as p:
        for target in ("/a/x", f"{p.upstream.url}/x"):
            assert_refused(await p.request(method, target), 400, "bad_request", p)
        if method == "TRACE":  # TRACK is no method to the HTTP parser: it never reaches the pipeline
            assert [line["reason"] for line in p.access_lines()] == ["method", "method"]


# ---------------------------------------------------------------- path checks


#: (path, the access line's reason in route mode, and through the forward proxy)
PATH_REFUSED = [
    ("/a/x/..;/y", "dot_segment", "dot_segment"),  # Tomcat, Jetty and Spring drop ";..." and walk up
    ("/a/..;jsessionid=1/y", "dot_segment", "dot_segment"),
    ("/a/.;x/y", "dot_segment", "dot_segment"),
    ("/a/%2e%2e/y", "dot_segment", "dot_segment"),
    ("/a/%2E%2e%3b/y", "dot_segment", "dot_segment"),
    ("/a/.%2e", "dot_segment", "dot_segment"),
    ("/a/..%2fy", "dot_segment", "dot_segment"),
    ("/a/..%5cy", "dot_segment", "dot_segment"),  # an encoded backslash is a separator to some servers
    ("/a/x%5c..%5cy", "dot_segment", "dot_segment"),
    ("/a/x\\y", "bad_path", "bad_path"),
    ("/a/x#y", "bad_path", "bad_target"),  # an absolute URL's fragment is refused as such
]
#: Dots and escapes that are no dot segment go through as sent.
PATH_FORWARDED = ["/a/..x/y.", "/a/x..y/%2e%2ex", "/a/...", "/a/%252e%252e/y", "/a/x;..", "/a/.well-known/z"]


@pytest.mark.parametrize(("path", "route_reason", "proxy_reason"), PATH_REFUSED)
async def test_paths_an_upstream_could_reinterpret_are_refused(
    keys: dict[str, str], path: str, route_reason: str, proxy_reason: str
) -> None:
    config = {"upstreams": {"a": upstream("${ECHO}/base", "a/{client_id}")}}
    async with data_plane(config, store(keys)) as p:
        assert_refused(await p.request("GET", path), 400, "bad_request", p)
        # The same path through the forward proxy, under the upstream's base path.
        absolute = p.upstream.url + "/base" + path.removeprefix("/a")
        assert_refused(await p.request("GET", absolute), 400, "bad_request", p)
        assert [line["reason"] for line in p.access_lines()] == [route_reason, proxy_reason]


async def test_paths_with_harmless_dots_go_through_as_sent(keys: dict[str, str]) -> None:
    config = {"upstreams": {"a": upstream("${ECHO}/base", "a/{client_id}")}}
    async with data_plane(config, store(keys)) as p:
        for path in PATH_FORWARDED:
            assert (await p.request("GET", path)).status == 200, path
            assert p.upstream.last().raw_path == "/base" + path.removeprefix("/a") + f"?apiKey={keys['a']}"


# ---------------------------------------------------------------- what comes back


def careless(build: Any) -> Any:
    """An upstream answer built from the apiKey it received (an upstream that echoes what it got)."""

    async def respond(request: web.Request) -> web.StreamResponse:
        return build(request.query["apiKey"])  # type: ignore[no-any-return]

    return respond


async def scrubbed(keys: dict[str, str], build: Any) -> tuple[RawResponse, str]:
    """What the app receives when the upstream answers ``build(key)``, and the key."""
    config = {"upstreams": {"a": upstream("${ECHO}", "a/{client_id}")}}
    async with data_plane(config, store(keys)) as p:
        p.upstream.respond = careless(build)
        resp = await p.request("GET", "/a/x")
        assert injected(p) == keys["a"]  # it did get the key
    assert keys["a"].encode() not in resp.raw, "the key reached the app"
    return resp, keys["a"]


async def test_a_key_echoed_in_a_redirect_location_is_scrubbed_and_not_followed(keys: dict[str, str]) -> None:
    resp, _ = await scrubbed(
        keys, lambda key: web.Response(status=302, headers={"Location": f"https://elsewhere.test/next?apiKey={key}&x=1"})
    )
    assert resp.status == 302
    assert resp.header("Location") == f"https://elsewhere.test/next?apiKey={REDACTED}&x=1"


async def test_a_key_echoed_in_the_reason_phrase_is_scrubbed(keys: dict[str, str]) -> None:
    resp, _ = await scrubbed(keys, lambda key: web.Response(status=401, reason=f"Bad key {key}", text="no"))
    assert (resp.status, resp.reason) == (401, f"Bad key {REDACTED}")


async def test_a_key_in_a_header_value_is_scrubbed_and_a_header_named_after_it_dropped(keys: dict[str, str]) -> None:
    resp, key = await scrubbed(
        keys,
        lambda key: web.Response(
            text="ok",
            headers={"X-Echo": f"got {key}", f"X-Param-{key}": "1", "X-Encoded": f"k%3D{key.upper()}", "X-Kept": "v"},
        ),
    )
    assert resp.status == 200
    assert resp.header("X-Echo") == f"got {REDACTED}"
    assert not any(key.lower() in name.lower() for name, _ in resp.headers)
    assert resp.header("X-Encoded") == f"k%3D{REDACTED}"  # matched whatever its case
    assert resp.header("X-Kept") == "v"


async def test_an_upstreams_own_x_sidecar_error_does_not_reach_the_app(keys: dict[str, str]) -> None:
    """An app reads X-Sidecar-Error as the sidecar's refusal; an upstream must not be able to fake one."""
    resp, _ = await scrubbed(
        keys, lambda key: web.json_response({"error": "nope"}, status=403, headers={"X-Sidecar-Error": "no_credential"})
    )
    assert resp.status == 403
    assert "x-sidecar-error" not in resp.header_names()
    assert resp.json() == {"error": "nope"}


# ---------------------------------------------------------------- rotation


async def test_a_401_to_a_key_rotated_since_is_replayed_once_with_the_new_key(keys: dict[str, str]) -> None:
    config = {"upstreams": {"a": upstream("${ECHO}", "a/{client_id}")}}
    old, new = keys["a"], make_secret("pipeline-rotated")
    accepted = [old]

    async def keyed(request: web.Request) -> web.StreamResponse:
        if request.query["apiKey"] == accepted[0]:
            return web.json_response({"ok": True})
        return web.json_response({"error": "bad key"}, status=401)

    async with data_plane(config, store(keys)) as p:
        p.upstream.respond = keyed
        assert (await p.request("GET", "/a/x")).status == 200  # the old key is cached now
        # Rotated in the store and at the API; the sidecar's cache still holds the old one.
        p.store.keys["a/alice"] = new
        accepted[0] = new
        p.upstream.received.clear()
        resp = await p.request("GET", "/a/x")
        assert resp.status == 200, resp.raw[:300]
        sent = [dict(pair.split("=", 1) for pair in seen.query.split("&"))["apiKey"] for seen in p.upstream.received]
        assert sent == [old, new], "not refused once with the old key, then replayed once with the new one"
        assert p.access_lines()[-1]["reason"] == "credential_rotated"
        # The new key is cached: the next request goes once.
        p.upstream.received.clear()
        assert (await p.request("GET", "/a/x")).status == 200
        assert len(p.upstream.received) == 1 and injected(p) == new


async def test_a_401_to_an_unchanged_key_is_relayed_not_replayed(keys: dict[str, str]) -> None:
    config = {"upstreams": {"a": upstream("${ECHO}", "a/{client_id}")}}

    async def refuse(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": "bad key"}, status=401)

    async with data_plane(config, store(keys)) as p:
        p.upstream.respond = refuse
        resp = await p.request("GET", "/a/x")
        assert resp.status == 401 and resp.json() == {"error": "bad key"}
        assert len(p.upstream.received) == 1
        assert "x-sidecar-error" not in resp.header_names()


# ---------------------------------------------------------------- refusal phrases


async def test_refusals_carry_their_code_as_the_phrase_in_proxy_modes_and_the_standard_one_in_route_mode(
    keys: dict[str, str],
) -> None:
    """Proxy clients show the app only the status line; an app that names the sidecar reads X-Sidecar-Error."""
    config = {"upstreams": {"a": upstream("${ECHO}", "a/{client_id}")}}
    async with data_plane(config, store(keys)) as p:
        cases = [
            ("/nowhere/x", "alice", 404, "Not Found", "unknown_upstream"),
            ("/a/x", None, 401, "Unauthorized", "missing_identity"),
            ("/a/x", "../bob", 400, "Bad Request", "invalid_client_id"),
            ("/a/x", "carol", 403, "Forbidden", "no_credential"),
            ("http://evil.example/x", "alice", 403, "destination_not_allowed", "destination_not_allowed"),
            (f"{p.upstream.url}/x", None, 401, "missing_identity", "missing_identity"),
            (f"{p.upstream.url}/x", "carol", 403, "no_credential", "no_credential"),
            ("ftp://evil.example/x", "alice", 403, "destination_not_allowed", "destination_not_allowed"),
        ]
        for target, client, status, phrase, code in cases:
            resp = await p.request("GET", target, client=client)
            assert (resp.status, resp.reason, resp.header("X-Sidecar-Error")) == (status, phrase, code), target
        out = await p.raw(b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n")
        assert (out.status, out.reason, out.header("X-Sidecar-Error")) == (
            403, "destination_not_allowed", "destination_not_allowed"
        )
        assert p.upstream.received == []


async def test_a_disabled_forward_proxy_refuses_absolute_form_with_its_code(keys: dict[str, str]) -> None:
    config = {"upstreams": {"a": upstream("${ECHO}", "a/{client_id}")}, "forward_proxy": {"enabled": False}}
    async with data_plane(config, store(keys)) as p:
        resp = await p.request("GET", f"{p.upstream.url}/x")
        assert (resp.status, resp.reason) == (400, "bad_request")
        assert_refused(resp, 400, "bad_request", p)
        assert p.access_lines()[-1]["reason"] == "forward_proxy_disabled"
        assert (await p.request("GET", "/a/x")).status == 200  # route mode is unaffected


async def test_refusals_inside_an_intercepted_tunnel_carry_their_code(keys: dict[str, str]) -> None:
    config = {
        "upstreams": {"api": tls_upstream("tls/{client_id}", url="https://api.example.test/v1")},
        "forward_proxy": {"mitm": {"enabled": True, "ca_cert_out": "mitm-ca.pem"}},
    }
    async with data_plane(config, store(keys), tls=True) as p:
        trust = ssl.create_default_context(cafile=str(p.workdir / "mitm-ca.pem"))
        reader, writer = await asyncio.open_connection(p.host, p.port)
        try:
            writer.write(b"CONNECT api.example.test:443 HTTP/1.1\r\nHost: api.example.test:443\r\n\r\n")
            await writer.drain()
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            await writer.start_tls(trust, server_hostname="api.example.test")
            writer.write(b"GET /v2/x HTTP/1.1\r\nHost: api.example.test\r\nX-Client-Id: alice\r\nConnection: close\r\n\r\n")
            await writer.drain()
            resp = parse_response(await asyncio.wait_for(reader.read(), 10))
        finally:
            writer.close()
            await writer.wait_closed()
        # Outside the upstream's base path: no upstream on that origin takes it.
        assert (resp.status, resp.reason, resp.header("X-Sidecar-Error")) == (
            403, "destination_not_allowed", "destination_not_allowed"
        )
        assert p.upstream.received == []
        assert p.access_lines()[-1]["mode"] == "mitm"

