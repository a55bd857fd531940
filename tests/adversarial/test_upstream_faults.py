"""Hostile and failing upstreams, through the real CLI, with aiohttp's C and pure-Python parsers.

Every malformed answer is followed by a normal request on the same sidecar (which
pools its upstream connections): it must get its own answer, never leftovers of the
previous one. A cut or malformed answer must never reach the app as a clean 200.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.support.evil_upstream import EvilUpstream
from tests.support.leaks import make_secret
from tests.support.process import SidecarProcess
from tests.support.raw_http import (
    LOCAL,
    assert_alive,
    assert_no_secret,
    exchange,
    get,
    metric,
    running_sidecar,
)
from tests.support.tls import TlsEchoUpstream
from tests.support.upstream import closed_port

#: The upstream timeout the module configures; "hangs" are judged against it.
TIMEOUT = 1.0
PARSERS = {"c-parser": {}, "py-parser": {"AIOHTTP_NO_EXTENSIONS": "1"}}
#: The lean server and client (default) and aiohttp's in their place, each alone and both.
STACKS = {
    "fast": {},
    "aiohttp-client": {"SIDECAR_UPSTREAM_CLIENT": "aiohttp"},
    "aiohttp-server": {"SIDECAR_SERVER": "aiohttp"},
    "aiohttp-both": {"SIDECAR_SERVER": "aiohttp", "SIDECAR_UPSTREAM_CLIENT": "aiohttp"},
}


@pytest.fixture(scope="module")
def evil() -> Iterator[EvilUpstream]:
    server = EvilUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def key() -> str:
    return make_secret("upfault")


@pytest.fixture(scope="module", params=list(PARSERS))
def sc(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    evil: EvilUpstream,
    untrusted_tls_upstream: TlsEchoUpstream,
    key: str,
) -> Iterator[SidecarProcess]:
    workdir = tmp_path_factory.mktemp("upfault")
    keys = workdir / "keys.yaml"
    keys.write_text(yaml.safe_dump({"alice": key}), encoding="utf-8")
    common: dict[str, Any] = {"secret": "{client_id}", "inject": {"query": "apiKey"}, "allow_private": True}
    config = {
        "secrets": {"backend": "file", "file": {"path": str(keys)}},
        "upstreams": {
            "evil": {"url": evil.url, "timeout_seconds": TIMEOUT, **common},
            "patient": {"url": f"http://localhost:{evil.port}", "timeout_seconds": 20, **common},
            "down": {"url": f"http://{LOCAL}:{closed_port()}", "timeout_seconds": TIMEOUT, **common},
            "untrusted": {"url": untrusted_tls_upstream.url, "timeout_seconds": TIMEOUT, **common},
        },
    }
    with running_sidecar(config, workdir, env=PARSERS[request.param], name=f"upfault-{request.param}") as proc:
        yield proc


@pytest.fixture(scope="module", params=list(STACKS))
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, evil: EvilUpstream, key: str
) -> Iterator[SidecarProcess]:
    """The sidecar with the evil upstream only, on each server and upstream client."""
    workdir = tmp_path_factory.mktemp("upstack")
    keys = workdir / "keys.yaml"
    keys.write_text(yaml.safe_dump({"alice": key}), encoding="utf-8")
    config = {
        "secrets": {"backend": "file", "file": {"path": str(keys)}},
        "upstreams": {
            "evil": {"url": evil.url, "timeout_seconds": TIMEOUT, "secret": "{client_id}",
                     "inject": {"query": "apiKey"}, "allow_private": True},
        },
    }
    with running_sidecar(config, workdir, env=STACKS[request.param], name=f"upstack-{request.param}") as proc:
        yield proc


def follow_up(sc: SidecarProcess, key: str) -> None:
    """A normal request right after: it must get its own answer from the pooled upstream."""
    marker = uuid.uuid4().hex
    for _ in range(3):  # several, so a leftover on any pooled connection would show
        ex = exchange(sc.url, get(f"/evil/ok/{marker}"))
        r = ex.first
        assert r.status == 200 and r.complete, ex.text()
        assert r.body == f"/ok/{marker}".encode(), f"desync: got {r.body[:100]!r}"
        assert_no_secret([ex.raw], key)
    assert_alive(sc)


def _clean_head(raw: bytes) -> None:
    """The head the app gets is well-formed: CRLF line ends only, no NUL, every line a name: value.

    (aiohttp reads a bare LF from the upstream as a line end, so ``a\\nInjected: yes`` arrives as
    two headers. The upstream could have sent both anyway; what matters is that the sidecar never
    writes a line the app's parser could read differently.)
    """
    head = raw.partition(b"\r\n\r\n")[0]
    stripped = head.replace(b"\r\n", b"")
    assert b"\r" not in stripped and b"\n" not in stripped and b"\x00" not in stripped, head[:500]
    for line in head.split(b"\r\n")[1:]:
        name, colon, _ = line.partition(b":")
        assert colon and name and name == name.strip() and b" " not in name, head[:500]


# ------------------------------------------------------------------ header values with control characters

@pytest.mark.parametrize("case", ["lf-in-header", "cr-in-header", "nul-in-header", "obs-fold", "space-before-colon"])
def test_control_characters_in_upstream_headers_never_reach_the_app(sc: SidecarProcess, key: str, case: str) -> None:
    ex = exchange(sc.url, get(f"/evil/{case}"))
    r = ex.first
    assert r.status == 502 or r.status == 200, ex.text()
    if r.status == 502:
        assert r.sidecar_error == "upstream_unreachable"
    _clean_head(ex.raw)
    assert_no_secret([ex.raw], key)
    follow_up(sc, key)


# ------------------------------------------------------------------ framing lies: never a clean 200

@pytest.mark.parametrize(
    "case", ["truncated-chunked", "bad-chunk-size", "chunk-overflow", "short-body", "reset-mid-body", "half-close"]
)
def test_cut_or_broken_bodies_are_never_a_clean_answer(sc: SidecarProcess, key: str, case: str) -> None:
    ex = exchange(sc.url, get(f"/evil/{case}"), timeout=3 + TIMEOUT * 2)
    assert ex.elapsed < 2 + TIMEOUT * 2, "the sidecar held a broken response open"
    if ex.responses:
        r = ex.first
        assert r.status == 502 or not r.complete, f"a broken upstream body became a clean answer:\n{ex.text()}"
        if r.status == 200:
            assert ex.closed, "a cut body must end with the connection closed"
    else:
        assert ex.closed
    assert_no_secret([ex.raw], key)
    follow_up(sc, key)


@pytest.mark.parametrize("case", ["long-body", "cl-and-te", "dup-cl", "bad-cl", "body-after-204"])
def test_framing_lies_do_not_desync_the_pool(sc: SidecarProcess, key: str, case: str) -> None:
    ex = exchange(sc.url, get(f"/evil/{case}"))
    r = ex.first
    assert b"smuggled" not in r.body, ex.text()
    if r.status == 200:
        assert r.body == b"hello", ex.text()  # exactly what the framing announced
    assert_no_secret([ex.raw], key)
    follow_up(sc, key)


@pytest.mark.parametrize(("case", "status"), [("no-content-with-length", 204), ("not-modified-with-length", 304)])
def test_bodiless_answers_reach_the_app_without_a_length(stack: SidecarProcess, key: str, case: str, status: int) -> None:
    """A 204 or 304 never has a body: a Content-Length on it would keep the app waiting for one."""
    marker = uuid.uuid4().hex
    ex = exchange(stack.url, get(f"/evil/{case}") + get(f"/evil/ok/{marker}"), responses=2)
    first, second = ex.responses[:2]
    assert first.status == status, ex.text()
    assert first.header("Content-Length") is None and first.header("Transfer-Encoding") is None, ex.text()
    # Right behind its head comes the answer to the next request: no body bytes in between.
    assert second.status == 200 and second.body == f"/ok/{marker}".encode(), ex.text()
    assert_no_secret([ex.raw], key)
    follow_up(stack, key)


@pytest.mark.parametrize("case", ["bad-status", "garbage-status", "http09", "huge-header", "many-headers", "close", "reset"])
def test_unparsable_answers_are_502(sc: SidecarProcess, key: str, case: str) -> None:
    ex = exchange(sc.url, get(f"/evil/{case}"))
    r = ex.first
    assert r.status == 502 and r.sidecar_error == "upstream_unreachable", ex.text()
    assert_no_secret([ex.raw], key)
    follow_up(sc, key)


def test_odd_status_code_passes_or_fails_cleanly(sc: SidecarProcess, key: str) -> None:
    ex = exchange(sc.url, get("/evil/status-999"))
    assert ex.first.status in (502, 999), ex.text()
    follow_up(sc, key)


def test_unsolicited_101_does_not_open_a_tunnel(sc: SidecarProcess, key: str) -> None:
    ex = exchange(sc.url, get("/evil/unsolicited-101"), timeout=3)
    assert b"RAW-TUNNEL-BYTES" not in ex.raw, ex.text()
    assert_no_secret([ex.raw], key)
    follow_up(sc, key)


# Finding (fixed in e6c2a01): proxy.py _stream_back relays an upstream 101 (which the app never asked for, and
# stripped of its Upgrade header) as the final status; an interim/switching status must become 502
def test_unsolicited_101_is_not_relayed_as_a_final_status(sc: SidecarProcess, key: str) -> None:
    ex = exchange(sc.url, get("/evil/unsolicited-101"), timeout=3)
    assert ex.first.status == 502, ex.text()


# ------------------------------------------------------------------ time: nothing waits longer than timeout_seconds

def test_silent_upstream_times_out(sc: SidecarProcess, key: str) -> None:
    ex = exchange(sc.url, get("/evil/silent"), timeout=TIMEOUT + 6)
    assert ex.first.status == 504 and ex.first.sidecar_error == "upstream_timeout", ex.text()
    assert ex.elapsed < TIMEOUT + 3
    follow_up(sc, key)


# Finding (fixed in e6c2a01): upstream.py sets only sock_read/sock_connect timeouts (total=None); an upstream that
# trickles its response head one byte at a time never trips them, so the request hangs past timeout_seconds
def test_slowloris_upstream_head_times_out(sc: SidecarProcess, key: str) -> None:
    ex = exchange(sc.url, get("/evil/trickle-head"), timeout=TIMEOUT + 6)
    assert ex.responses and ex.first.status == 504, f"after {ex.elapsed:.1f}s: {ex.text()[:200]}"
    assert ex.elapsed < TIMEOUT + 3


def test_refused_connection_is_502_fast(sc: SidecarProcess, key: str) -> None:
    ex = exchange(sc.url, get("/down/x"))
    assert ex.first.status == 502 and ex.first.sidecar_error == "upstream_unreachable", ex.text()
    assert ex.elapsed < 3


def test_untrusted_tls_is_refused_never_downgraded(
    sc: SidecarProcess, untrusted_tls_upstream: TlsEchoUpstream, key: str
) -> None:
    untrusted_tls_upstream.reset()
    ex = exchange(sc.url, get("/untrusted/echo/x"))
    assert ex.first.status == 502 and ex.first.sidecar_error == "upstream_unreachable", ex.text()
    assert untrusted_tls_upstream.received == [], "a request went over TLS the sidecar could not verify"
    assert_no_secret([ex.raw], key)


# ------------------------------------------------------------------ the key reflected in headers

def test_key_reflected_in_response_headers_is_redacted(sc: SidecarProcess, key: str) -> None:
    ex = exchange(sc.url, get("/evil/echo-key/x?q=1"))
    r = ex.first
    assert r.status == 200 and r.body == b"reflected", ex.text()
    assert_no_secret([ex.raw], key)
    assert r.header("X-Echo") is not None and "[redacted]" in r.header("X-Echo")  # type: ignore[operator]
    assert not any(name.lower().startswith("x-param-") for name, _ in r.headers), "a header name held the key"
    assert r.sidecar_error is None, "the upstream's X-Sidecar-Error passed for the sidecar's refusal"


def test_a_header_named_on_any_connection_line_stays_at_the_sidecar(sc: SidecarProcess, key: str) -> None:
    ex = exchange(sc.url, get("/evil/connection-lines"))
    assert ex.first.status == 200 and ex.first.body == b"ok", ex.text()
    assert ex.first.header("X-Upstream-Hop") is None, "a hop-only header of the upstream reached the app"
    follow_up(sc, key)


# ------------------------------------------------------------------ clients that go away

# Finding (fixed in e6c2a01): connect.py builds web.Server without handler_cancellation=True, so a client that
# hangs up leaves the upstream call running (and its pooled connection held) until timeout_seconds
def test_client_abort_cancels_the_upstream_call(sc: SidecarProcess, evil: EvilUpstream, key: str) -> None:
    before_closed = evil.closed
    before_conns = evil.connections
    aborts = 20
    for _ in range(aborts):
        with sc.connect() as s:
            s.sendall(get("/patient/silent"))
            time.sleep(0.05)
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        opened = evil.connections - before_conns
        if opened >= aborts and evil.closed - before_closed >= opened and metric(sc, "sidecar_inflight_requests") == 0:
            break
        time.sleep(0.1)
    assert evil.connections - before_conns >= aborts
    assert evil.closed - before_closed >= evil.connections - before_conns, "upstream calls outlived their clients"
    assert metric(sc, "sidecar_inflight_requests") == 0


def test_aborted_clients_leave_the_sidecar_healthy(sc: SidecarProcess, key: str) -> None:
    for _ in range(50):
        with sc.connect() as s:
            s.sendall(get("/evil/ok/abort")[:-10])  # half a request, then gone
    follow_up(sc, key)


def test_zz_no_key_in_the_log(sc: SidecarProcess, key: str) -> None:
    assert_alive(sc)
    assert_no_secret([sc.output()], key)
