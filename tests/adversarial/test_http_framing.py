"""Request framing attacks on the data plane, through the real CLI, with every parser that reads them.

Four stacks: the lean server (llhttp) in front of aiohttp's C parser (llhttp too) or its
pure-Python one (AIOHTTP_NO_EXTENSIONS=1), and aiohttp's server alone with each
(SIDECAR_SERVER=aiohttp). Each case is raw bytes on one connection. Whatever the parser
makes of them, these hold:

- nothing reaches the upstream that the sidecar did not check: every request the echo
  upstream records carries alice's (or bob's) key exactly once, never an identity header,
  never a "smuggled" path;
- a case marked ``reject`` ends in a 4xx/5xx or a closed connection, and nothing is forwarded;
- a case marked with a status (``400``, ``505``) breaks a rule of the contract's HTTP/1.1
  strictness: every stack answers exactly that status with ``X-Sidecar-Error: bad_request``,
  forwards nothing and closes the connection (a request pipelined behind it is never read);
- no key appears in anything sent back, and the next normal request still works.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import yaml

from tests.support.leaks import make_secret
from tests.support.process import SidecarProcess
from tests.support.raw_http import (
    Exchange,
    assert_alive,
    assert_no_secret,
    exchange,
    running_sidecar,
)
from tests.support.upstream import EchoUpstream

PARSERS = {"c-parser": {}, "py-parser": {"AIOHTTP_NO_EXTENSIONS": "1"}}
#: The lean server hands aiohttp what it does not serve itself; SIDECAR_SERVER=aiohttp gives aiohttp all.
SERVERS = {"fast": {}, "aiohttp": {"SIDECAR_SERVER": "aiohttp"}}
STACKS = {f"{server}-{parser}": {**SERVERS[server], **PARSERS[parser]} for server in SERVERS for parser in PARSERS}
#: Headers that carry credentials for services on the app's own host (Vault agent, the AWS
#: Parameters and Secrets extension): never forwarded, whatever the upstream.
LOCAL_CREDENTIAL_HEADERS = ("X-Vault-Token", "X-Aws-Parameters-Secrets-Token")
KEYS: dict[str, str] = {}


@pytest.fixture(scope="module")
def keys() -> dict[str, str]:
    KEYS.update({"alice": make_secret("framing-alice"), "bob": make_secret("framing-bob")})
    return KEYS


@pytest.fixture(scope="module", params=list(STACKS))
def sc(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    _echo_server: EchoUpstream,
    keys: dict[str, str],
) -> Iterator[SidecarProcess]:
    workdir = tmp_path_factory.mktemp("framing")
    path = workdir / "keys.yaml"
    path.write_text(yaml.safe_dump(keys), encoding="utf-8")
    config: dict[str, Any] = {
        "secrets": {"backend": "file", "file": {"path": str(path)}},
        "upstreams": {
            "plain": {
                "url": _echo_server.url + "/echo",
                "secret": "{client_id}",
                "inject": {"header": "X-API-Key"},
                "allow_private": True,
                "timeout_seconds": 5,
            },
            # An upstream whose own credential header is one the app's local services use too.
            "vault": {
                "url": _echo_server.url + "/echo/vault",
                "secret": "{client_id}",
                "inject": {"header": "X-Vault-Token"},
                "allow_private": True,
                "timeout_seconds": 5,
            },
        },
    }
    with running_sidecar(config, workdir, env=STACKS[request.param], name=f"framing-{request.param}") as proc:
        yield proc


def H(lines: str, body: bytes = b"") -> bytes:
    """A request head from ``lines`` joined with CRLF (write ``\\n`` yourself for bare LF)."""
    return lines.encode("latin-1") + b"\r\n\r\n" + body


A = "Host: x\r\nX-Client-Id: alice"
SMUGGLED = "GET /plain/smuggled HTTP/1.1\r\nHost: x\r\nX-Client-Id: alice\r\n\r\n"
TINY_CHUNKS = 10_000

# (id, bytes, expectation). ok: a 200 from the upstream; reject: refused, nothing forwarded;
# reject-body: the head was fine and the body is streamed, so the upstream may have seen the head,
# but the app gets an error and the upstream never a complete body; safe: either, as long as the
# invariants in the module docstring hold; "400", "505": exactly that refusal (bad_request), nothing
# forwarded, the connection closed (test_framing sends it again with a request pipelined behind it,
# which must never run).
CASES: list[tuple[str, bytes, str]] = [
    # ---- smuggling: CL.TE, TE.CL and Content-Length games
    ("cl-te", H(f"POST /plain/a HTTP/1.1\r\n{A}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked", b"0\r\n\r\n" + SMUGGLED.encode()), "reject"),
    ("te-cl", H(f"POST /plain/a HTTP/1.1\r\n{A}\r\nTransfer-Encoding: chunked\r\nContent-Length: 3", b"8\r\nSMUGGLED\r\n0\r\n\r\n"), "reject"),
    ("dup-cl-differ", H(f"POST /plain/a HTTP/1.1\r\n{A}\r\nContent-Length: 5\r\nContent-Length: 50", b"hello" + SMUGGLED.encode()), "reject"),
    ("dup-cl-same", H(f"POST /plain/a HTTP/1.1\r\n{A}\r\nContent-Length: 5\r\nContent-Length: 5", b"hello"), "safe"),
    ("cl-list", H(f"POST /plain/a HTTP/1.1\r\n{A}\r\nContent-Length: 5, 5", b"hello"), "safe"),
    ("cl-plus", H(f"POST /plain/a HTTP/1.1\r\n{A}\r\nContent-Length: +5", b"hello"), "reject"),
    ("cl-negative", H(f"POST /plain/a HTTP/1.1\r\n{A}\r\nContent-Length: -1", b"hello"), "reject"),
    ("cl-hex", H(f"POST /plain/a HTTP/1.1\r\n{A}\r\nContent-Length: 0x5", b"hello"), "reject"),
    ("cl-huge", H(f"POST /plain/a HTTP/1.1\r\n{A}\r\nContent-Length: 99999999999999999999999", b"hello"), "reject"),
    ("cl-underscore", H(f"POST /plain/a HTTP/1.1\r\n{A}\r\nContent-Length: 1_0", b"helloworld"), "reject"),
    # ---- odd Transfer-Encoding
    ("te-chunked-identity", H(f"POST /plain/a HTTP/1.1\r\n{A}\r\nTransfer-Encoding: chunked, identity", b"5\r\nhello\r\n0\r\n\r\n"), "reject"),
    ("te-xchunked", H(f"POST /plain/a HTTP/1.1\r\n{A}\r\nTransfer-Encoding: xchunked", b"5\r\nhello\r\n0\r\n\r\n"), "reject"),
    ("te-twice", H(f"POST /plain/a HTTP/1.1\r\n{A}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked", b"5\r\nhello\r\n0\r\n\r\n"), "400"),
    ("te-chunked-chunked", H(f"POST /plain/a HTTP/1.1\r\n{A}\r\nTransfer-Encoding: chunked, chunked", b"5\r\nhello\r\n0\r\n\r\n"), "400"),
    ("te-gzip-chunked", H(f"POST /plain/a HTTP/1.1\r\n{A}\r\nTransfer-Encoding: gzip, chunked", b"5\r\nhello\r\n0\r\n\r\n"), "400"),
    ("te-gzip-then-chunked", H(f"POST /plain/a HTTP/1.1\r\n{A}\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked", b"5\r\nhello\r\n0\r\n\r\n"), "400"),
    ("te-empty-element", H(f"POST /plain/a HTTP/1.1\r\n{A}\r\nTransfer-Encoding: , chunked", b"5\r\nhello\r\n0\r\n\r\n"), "400"),
    ("te-identity", H(f"POST /plain/a HTTP/1.1\r\n{A}\r\nTransfer-Encoding: identity", b"hello"), "400"),
    ("te-empty", H(f"POST /plain/a HTTP/1.1\r\n{A}\r\nTransfer-Encoding: ", b"hello"), "400"),
    ("te-upper", H(f"POST /plain/a HTTP/1.1\r\n{A}\r\nTransfer-Encoding: CHUNKED", b"5\r\nhello\r\n0\r\n\r\n"), "ok"),
    ("te-vtab", H(f"POST /plain/a HTTP/1.1\r\n{A}\r\nTransfer-Encoding:\x0bchunked", b"5\r\nhello\r\n0\r\n\r\n"), "reject"),
    ("te-space-before-colon", H(f"POST /plain/a HTTP/1.1\r\n{A}\r\nTransfer-Encoding : chunked", b"5\r\nhello\r\n0\r\n\r\n"), "reject"),
    ("te-http10", H(f"POST /plain/a HTTP/1.0\r\n{A}\r\nTransfer-Encoding: chunked", b"5\r\nhello\r\n0\r\n\r\n"), "400"),
    ("chunk-size-overflow", H(f"POST /plain/a HTTP/1.1\r\n{A}\r\nTransfer-Encoding: chunked", b"ffffffffffffffffffff\r\nhello\r\n0\r\n\r\n"), "reject-body"),
    ("chunk-size-garbage", H(f"POST /plain/a HTTP/1.1\r\n{A}\r\nTransfer-Encoding: chunked", b"5x\r\nhello\r\n0\r\n\r\n"), "reject-body"),
    ("chunk-missing-crlf", H(f"POST /plain/a HTTP/1.1\r\n{A}\r\nTransfer-Encoding: chunked", b"5\r\nhelloXX0\r\n\r\n"), "reject-body"),
    ("chunk-trailer-identity", H(f"POST /plain/a HTTP/1.1\r\n{A}\r\nTransfer-Encoding: chunked", b"5\r\nhello\r\n0\r\nX-Client-Id: bob\r\nX-API-Key: evil\r\n\r\n"), "ok"),
    # ---- header syntax: obs-fold, bare LF/CR, NUL
    ("obs-fold-identity", H("GET /plain/a HTTP/1.1\r\nHost: x\r\nX-Client-Id: alice\r\n bob"), "reject"),
    ("obs-fold-te", H(f"POST /plain/a HTTP/1.1\r\n{A}\r\nTransfer-Encoding:\r\n chunked", b"5\r\nhello\r\n0\r\n\r\n"), "reject"),
    ("bare-lf-request", b"GET /plain/a HTTP/1.1\nHost: x\nX-Client-Id: alice\n\n", "safe"),
    ("bare-lf-in-header", H("GET /plain/a HTTP/1.1\r\nHost: x\r\nX-Client-Id: alice\nX-Client-Id: bob"), "safe"),
    ("bare-cr-in-header", H("GET /plain/a HTTP/1.1\r\nHost: x\r\nX-Client-Id: alice\rX-Other: b"), "reject"),
    ("nul-in-value", H("GET /plain/a HTTP/1.1\r\nHost: x\r\nX-Client-Id: ali\x00ce"), "reject"),
    ("nul-in-name", H("GET /plain/a HTTP/1.1\r\nHost: x\r\nX-Cli\x00ent-Id: alice"), "reject"),
    ("no-colon", H("GET /plain/a HTTP/1.1\r\nHost: x\r\nX-Client-Id alice"), "reject"),
    ("space-in-name", H("GET /plain/a HTTP/1.1\r\nHost: x\r\nX-Client-Id : bob\r\nX-Client-Id: alice"), "reject"),
    # ---- Host: exactly one in HTTP/1.1, at most one in HTTP/1.0
    ("dup-host", H("GET /plain/a HTTP/1.1\r\nHost: x\r\nHost: y\r\nX-Client-Id: alice"), "400"),
    ("dup-host-equal", H("GET /plain/a HTTP/1.1\r\nHost: x\r\nHost: x\r\nX-Client-Id: alice"), "400"),
    ("no-host", H("GET /plain/a HTTP/1.1\r\nX-Client-Id: alice"), "400"),
    ("no-host-post", H("POST /plain/a HTTP/1.1\r\nX-Client-Id: alice\r\nContent-Length: 5", b"hello"), "400"),
    ("no-host-absolute", H("GET http://127.0.0.1:1/echo/a HTTP/1.1\r\nX-Client-Id: alice"), "400"),
    ("dup-host-http10", H("GET /plain/a HTTP/1.0\r\nHost: x\r\nHost: y\r\nX-Client-Id: alice"), "400"),
    ("no-host-http10", H("GET /plain/a HTTP/1.0\r\nX-Client-Id: alice"), "ok"),
    # ---- Connection naming identity or credential headers; client-supplied keys
    ("connection-names-identity", H(f"GET /plain/a HTTP/1.1\r\n{A}\r\nConnection: X-Client-Id"), "ok"),
    ("connection-names-key-header", H(f"GET /plain/a HTTP/1.1\r\n{A}\r\nConnection: X-API-Key, keep-alive\r\nX-API-Key: attacker"), "ok"),
    ("connection-names-content-length", H(f"POST /plain/upload HTTP/1.1\r\n{A}\r\nConnection: Content-Length\r\nContent-Length: 5", b"hello"), "ok"),
    ("connection-names-host", H(f"GET /plain/a HTTP/1.1\r\n{A}\r\nConnection: Host"), "ok"),
    ("client-key-twice", H(f"GET /plain/a HTTP/1.1\r\n{A}\r\nX-API-Key: evil-1\r\nX-API-Key: evil-2"), "ok"),
    # ---- versions
    ("http-1.0", H(f"GET /plain/a HTTP/1.0\r\n{A}"), "ok"),
    ("http-2.0-text", H(f"GET /plain/a HTTP/2.0\r\n{A}"), "505"),
    ("http-1.2", H(f"GET /plain/a HTTP/1.2\r\n{A}"), "505"),
    ("http-3.0", H(f"GET /plain/a HTTP/3.0\r\n{A}"), "505"),
    ("http-0.9-versioned", H(f"GET /plain/a HTTP/0.9\r\n{A}"), "505"),
    ("http-2.0-post", H(f"POST /plain/a HTTP/2.0\r\n{A}\r\nContent-Length: 5", b"hello"), "505"),
    ("http-0.9", b"GET /plain/a\r\n\r\n", "reject"),
    ("http-1.10", H(f"GET /plain/a HTTP/1.10\r\n{A}"), "400"),
    ("http-garbage", H(f"GET /plain/a HTTP/x.y\r\n{A}"), "400"),
    ("http-no-minor", H(f"GET /plain/a HTTP/2\r\n{A}"), "400"),
    ("http-lowercase", H(f"GET /plain/a http/1.1\r\n{A}"), "400"),
    ("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "reject"),
    # ---- methods and targets
    # Methods are case-sensitive: a parser that upper-cases them would forward "get" as GET, key and all.
    ("method-lowercase", H(f"get /plain/a HTTP/1.1\r\n{A}"), "400"),
    ("method-mixed-case", H(f"Get /plain/a HTTP/1.1\r\n{A}"), "400"),
    ("method-lowercase-post", H(f"post /plain/a HTTP/1.1\r\n{A}\r\nContent-Length: 5", b"hello"), "400"),
    ("method-lowercase-put", H(f"put /plain/a HTTP/1.1\r\n{A}\r\nContent-Length: 5", b"hello"), "400"),
    ("method-lowercase-patch", H(f"patch /plain/a HTTP/1.1\r\n{A}\r\nContent-Length: 5", b"hello"), "400"),
    ("method-lowercase-delete", H(f"delete /plain/a HTTP/1.1\r\n{A}"), "400"),
    ("method-lowercase-options", H(f"options /plain/a HTTP/1.1\r\n{A}"), "400"),
    ("method-lowercase-head", H(f"head /plain/a HTTP/1.1\r\n{A}"), "400"),
    ("method-lowercase-propfind", H(f"propfind /plain/a HTTP/1.1\r\n{A}"), "400"),
    ("method-lowercase-absolute", H(f"get http://127.0.0.1:1/echo/a HTTP/1.1\r\n{A}"), "400"),
    ("method-control-char", H(f"G\x01T /plain/a HTTP/1.1\r\n{A}"), "reject"),
    ("method-long", H("X" * 4000 + f" /plain/a HTTP/1.1\r\n{A}"), "safe"),
    ("method-propfind", H(f"PROPFIND /plain/a HTTP/1.1\r\n{A}"), "ok"),
    ("method-track", H(f"TRACK /plain/a HTTP/1.1\r\n{A}"), "reject"),
    ("connect-origin-form", H(f"CONNECT /plain/a HTTP/1.1\r\n{A}"), "reject"),
    # A CONNECT head is read by the sidecar's own code, under the same rules.
    ("connect-no-host", H("CONNECT 127.0.0.1:1 HTTP/1.1\r\nX-Client-Id: alice"), "400"),
    ("connect-dup-host", H("CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\nHost: x"), "400"),
    ("connect-http-2.0", H("CONNECT 127.0.0.1:1 HTTP/2.0\r\nHost: 127.0.0.1:1"), "505"),
    ("connect-http-1.5", H("CONNECT 127.0.0.1:1 HTTP/1.5\r\nHost: 127.0.0.1:1"), "505"),
    ("connect-http-garbage", H("CONNECT 127.0.0.1:1 HTTP/1.x\r\nHost: 127.0.0.1:1"), "400"),
    ("connect-lowercase", H("connect 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1"), "400"),
    ("connect-http10-no-host", H("CONNECT 127.0.0.1:1 HTTP/1.0"), "reject"),  # 403: not a passthrough host
    ("options-asterisk", H(f"OPTIONS * HTTP/1.1\r\n{A}"), "reject"),
    ("double-space", H(f"GET  /plain/a HTTP/1.1\r\n{A}"), "safe"),
    ("nul-in-target", H(f"GET /plain/a\x00b HTTP/1.1\r\n{A}"), "reject"),
    ("fragment-in-target", H(f"GET /plain/a#frag HTTP/1.1\r\n{A}"), "reject"),
    ("userinfo-absolute", H(f"GET http://u:p@127.0.0.1:1/echo/a HTTP/1.1\r\n{A}"), "reject"),
    # ---- sizes
    ("header-33k", H(f"GET /plain/a HTTP/1.1\r\n{A}\r\nX-Big: " + "a" * 33 * 1024), "reject"),
    ("request-line-33k", H("GET /plain/" + "a" * 33 * 1024 + f" HTTP/1.1\r\n{A}"), "reject"),
    ("headers-2000", H(f"GET /plain/a HTTP/1.1\r\n{A}\r\n" + "\r\n".join(f"X-H{i}: v" for i in range(2000))), "safe"),
    ("expect-100-no-body", H(f"GET /plain/a HTTP/1.1\r\n{A}\r\nExpect: 100-continue\r\nContent-Length: 0"), "safe"),
]


def _check_upstream(echo: EchoUpstream) -> None:
    """Every request the upstream saw went through the sidecar's checks."""
    for rec in echo.received:
        assert "smuggled" not in rec.raw_path.lower(), f"a smuggled request reached the upstream: {rec.raw_path}"
        key_header = "x-vault-token" if rec.raw_path.startswith("/echo/vault/") else "x-api-key"
        keys = [v for k, v in rec.headers if k.lower() == key_header]
        assert len(keys) == 1 and keys[0] in KEYS.values(), f"upstream got {key_header} {len(keys)} times"
        names = rec.header_names()
        assert "x-client-id" not in names and "upgrade" not in names, names


def _follow_up(sc: SidecarProcess, echo: EchoUpstream) -> None:
    echo.reset()
    resp = requests.get(sc.url + "/plain/follow-up", headers={"X-Client-Id": "bob"}, timeout=5)
    assert resp.status_code == 200, resp.text
    assert echo.last().header("X-API-Key") == KEYS["bob"]
    assert_alive(sc)


def _no_key_from_sidecar(ex: Exchange) -> None:
    """No key in any head, nor in any body the sidecar or its parser wrote.

    The echo upstream puts the headers it received (the key among them) in its JSON
    body on purpose: that is the documented limit (an allowed upstream that echoes the
    key), so bodies of the upstream's own 200s are not judged here.
    """
    head_end = ex.raw.find(b"\r\n\r\n")
    parts: list[str | bytes] = [ex.raw if head_end < 0 else ex.raw[:head_end]]
    for r in ex.responses:
        parts.append("\n".join(f"{k}: {v}" for k, v in r.headers))
        if r.status != 200:
            parts.append(r.body)
    assert_no_secret(parts, *KEYS.values())


def _judge(sc: SidecarProcess, echo: EchoUpstream, ex: Exchange, expect: str) -> None:
    _no_key_from_sidecar(ex)
    _check_upstream(echo)
    if expect.isdigit():
        assert echo.received == [], f"forwarded although it should be refused: {[r.raw_path for r in echo.received]}"
        r = ex.first
        assert r.status == int(expect) and r.sidecar_error == "bad_request", ex.text()
        assert json.loads(r.body)["error"] == "bad_request", ex.text()
        assert len(ex.responses) == 1 and ex.closed, f"the connection went on after the refusal:\n{ex.text()}"
    elif expect == "reject":
        assert echo.received == [], f"forwarded although it should be refused: {[r.raw_path for r in echo.received]}"
        if ex.responses:
            assert 400 <= ex.first.status < 600, ex.text()
        else:
            assert ex.closed, "neither refused nor closed"
    elif expect == "reject-body":
        assert not any(r.body_size for r in echo.received), "a broken chunked body reached the upstream whole"
        assert not ex.responses or ex.first.status >= 400, ex.text()
    elif expect == "ok":
        assert ex.first.status == 200, ex.text()
        assert echo.received, "nothing reached the upstream"
        assert echo.last().header("X-API-Key") == KEYS["alice"]
    else:
        assert ex.closed or ex.responses, "no answer and the connection is still open"
        if ex.responses and ex.first.status == 200:
            assert echo.received and echo.last().header("X-API-Key") == KEYS["alice"]


@pytest.mark.parametrize(("data", "expect"), [pytest.param(d, e, id=i) for i, d, e in CASES])
def test_framing(sc: SidecarProcess, echo: EchoUpstream, data: bytes, expect: str) -> None:
    # For a refusal, wait for the close (or a second answer, which must not come).
    ex = exchange(sc.url, data, responses=2 if expect.isdigit() else 1, timeout=3)
    _judge(sc, echo, ex, expect)
    if expect.isdigit():
        # Again with a whole request pipelined behind it: were that read, it would reach the upstream.
        piped = exchange(sc.url, data + SMUGGLED.encode(), responses=2, timeout=3)
        assert echo.received == [], f"forwarded after a refusal: {[r.raw_path for r in echo.received]}"
        assert len(piped.responses) <= 1 and (piped.closed or not piped.responses), piped.text()
        _no_key_from_sidecar(piped)
    _follow_up(sc, echo)


def test_tiny_chunks_arrive_whole(sc: SidecarProcess, echo: EchoUpstream) -> None:
    body = bytes(i % 251 for i in range(TINY_CHUNKS))
    chunks = b"".join(b"1\r\n" + body[i : i + 1] + b"\r\n" for i in range(TINY_CHUNKS)) + b"0\r\n\r\n"
    head = H(f"POST /plain/upload HTTP/1.1\r\n{A}\r\nTransfer-Encoding: chunked")
    started = time.monotonic()
    ex = exchange(sc.url, [head, chunks], timeout=20)
    assert ex.first.status == 200, ex.text()
    assert ex.first.body and b'"size": 10000' in ex.first.body
    assert hashlib.sha256(body).hexdigest().encode() in ex.first.body
    assert time.monotonic() - started < 15
    _no_key_from_sidecar(ex)
    _check_upstream(echo)
    _follow_up(sc, echo)


def test_body_shorter_than_content_length_is_not_forwarded_as_complete(sc: SidecarProcess, echo: EchoUpstream) -> None:
    data = H(f"POST /plain/short HTTP/1.1\r\n{A}\r\nContent-Length: 100", b"x" * 10)
    ex = exchange(sc.url, data, timeout=3, shut_write=True)
    assert not any(r.body_size == 10 for r in echo.received), "a truncated body went upstream as a whole one"
    _no_key_from_sidecar(ex)
    _follow_up(sc, echo)


def test_pipelined_requests_of_two_clients_each_carry_their_own_key(sc: SidecarProcess, echo: EchoUpstream) -> None:
    pipeline = b"".join(
        H(f"GET /plain/{who}/{i} HTTP/1.1\r\nHost: x\r\nX-Client-Id: {who}") for i in range(20) for who in ("alice", "bob")
    )
    ex = exchange(sc.url, pipeline, responses=40, timeout=10)
    assert [r.status for r in ex.responses] == [200] * 40, ex.text()[:500]
    assert len(echo.received) == 40
    for rec in echo.received:
        who = rec.raw_path.split("/")[2]
        assert rec.header("X-API-Key") == KEYS[who], f"{rec.raw_path} carried another client's key"
    for r in ex.responses:  # each answer is the echo of its own request
        body = r.body.decode()
        who = body.split('"raw_path": "/echo/')[1].split("/")[0]
        assert KEYS[who] in body and KEYS[{"alice": "bob", "bob": "alice"}[who]] not in body


@pytest.mark.parametrize(
    "upgrade",
    [
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13",
        "Upgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAAQAAP__",
        "Upgrade: tls/1.2\r\nConnection: Upgrade",
    ],
    ids=["websocket", "h2c", "tls"],
)
def test_upgrade_is_never_tunnelled(sc: SidecarProcess, echo: EchoUpstream, upgrade: str) -> None:
    """After an Upgrade request, bytes that follow must not flow to the upstream unchecked."""
    head = H(f"GET /plain/upgrade HTTP/1.1\r\n{A}\r\n{upgrade}")
    follow = b"GET /plain/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"  # no identity: only a tunnel would carry it
    ex = exchange(sc.url, [head, follow], responses=2, timeout=3, pause=0.3)
    assert all(r.status != 101 for r in ex.responses), ex.text()
    _check_upstream(echo)
    for rec in echo.received:
        assert rec.body_size == 0 or b"smuggled" not in rec.raw_path.encode(), rec
    assert not any("smuggled" in r.raw_path for r in echo.received)
    _no_key_from_sidecar(ex)
    _follow_up(sc, echo)


def test_two_identity_headers_are_refused_even_when_equal(sc: SidecarProcess, echo: EchoUpstream) -> None:
    """Two X-Client-Id lines are ambiguous whatever they say: which one did each hop read?"""
    ex = exchange(sc.url, H(f"GET /plain/a HTTP/1.1\r\n{A}\r\nX-Client-Id: alice"), timeout=3)
    assert ex.first.status == 400 and ex.first.sidecar_error == "bad_request", ex.text()
    assert echo.received == []
    _no_key_from_sidecar(ex)
    _follow_up(sc, echo)


def _local_credentials() -> str:
    return "".join(f"\r\n{name}: app-local-{i}" for i, name in enumerate(LOCAL_CREDENTIAL_HEADERS))


@pytest.mark.parametrize(
    "data",
    [
        H(f"GET /plain/a HTTP/1.1\r\n{A}{_local_credentials()}"),
        H(f"POST /plain/upload HTTP/1.1\r\n{A}{_local_credentials()}\r\nTransfer-Encoding: chunked", b"5\r\nhello\r\n0\r\n\r\n"),
    ],
    ids=["get", "chunked-post"],
)
def test_local_credential_headers_never_reach_the_upstream(sc: SidecarProcess, echo: EchoUpstream, data: bytes) -> None:
    ex = exchange(sc.url, data, timeout=3)
    assert ex.first.status == 200, ex.text()
    names = echo.last().header_names()
    assert not {n.lower() for n in LOCAL_CREDENTIAL_HEADERS} & names, names
    _check_upstream(echo)
    _follow_up(sc, echo)


@pytest.mark.parametrize(
    "data",
    [
        H(f"GET /plain/a HTTP/1.1\r\n{A}\r\nConnection: keep-alive\r\nConnection: X-Hop-Only\r\nX-Hop-Only: 1"),
        H(f"POST /plain/upload HTTP/1.1\r\n{A}\r\nConnection: keep-alive\r\nConnection: X-Hop-Only\r\n"
          "X-Hop-Only: 1\r\nTransfer-Encoding: chunked", b"5\r\nhello\r\n0\r\n\r\n"),
    ],
    ids=["get", "chunked-post"],
)
def test_every_connection_line_names_hop_only_headers(sc: SidecarProcess, echo: EchoUpstream, data: bytes) -> None:
    """RFC 9110 7.6.1: a header named on a second Connection line is for this hop too."""
    ex = exchange(sc.url, data, timeout=3)
    assert ex.first.status == 200, ex.text()
    assert "x-hop-only" not in echo.last().header_names()
    _check_upstream(echo)
    _follow_up(sc, echo)


def test_an_upstream_that_injects_a_local_credential_header_gets_its_key_there(
    sc: SidecarProcess, echo: EchoUpstream
) -> None:
    ex = exchange(sc.url, H(f"GET /vault/a HTTP/1.1\r\n{A}{_local_credentials()}"), timeout=3)
    assert ex.first.status == 200, ex.text()
    rec = echo.last()
    assert rec.raw_path == "/echo/vault/a"
    assert [v for k, v in rec.headers if k.lower() == "x-vault-token"] == [KEYS["alice"]]
    assert "x-aws-parameters-secrets-token" not in rec.header_names()
    _check_upstream(echo)
    _follow_up(sc, echo)


# Finding (fixed in e6c2a01): proxy.py forwards TRACE (TRACK is refused); an upstream that implements TRACE
# reflects the request, injected key included, in its body to the app. The data plane should refuse these methods
# (405 bad_request)
def test_trace_is_refused(sc: SidecarProcess, echo: EchoUpstream) -> None:
    ex = exchange(sc.url, H(f"TRACE /plain/a HTTP/1.1\r\n{A}"), timeout=3)
    assert echo.received == [], "TRACE reached the upstream with the key in its headers"
    assert 400 <= ex.first.status < 500


def test_zz_no_key_in_the_log(sc: SidecarProcess) -> None:
    assert_alive(sc)
    assert_no_secret([sc.output()], *KEYS.values())
