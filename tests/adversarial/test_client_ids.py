"""Client IDs that try to reach another tenant's secret, through the real CLI and moto.

Every hostile ID must be refused before the secret store is asked: the test reads
``sidecar_secret_fetch_duration_seconds_count{backend="aws"}`` before and after.
IDs go out as raw bytes, so non-ASCII and control characters reach the sidecar as sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.aws import AWS_ENV
from tests.support.leaks import make_secret
from tests.support.process import SidecarProcess
from tests.support.raw_http import (
    assert_alive,
    assert_no_secret,
    exchange,
    metric,
    running_sidecar,
)
from tests.support.store_faults import put_secret, secrets_manager
from tests.support.upstream import EchoUpstream

PREFIX = "adv-ids/polygon/"
FETCHES = "sidecar_secret_fetch_duration_seconds_count"
KEYS: dict[str, str] = {}
ARNS: dict[str, str] = {}


@pytest.fixture(scope="module")
def seeded(moto_endpoint: str) -> dict[str, str]:
    client = secrets_manager(moto_endpoint)
    for who in ("alice", "bob"):
        KEYS[who] = make_secret(f"ids-{who}")
        ARNS[who] = put_secret(client, PREFIX + who, SecretString=KEYS[who])
    return KEYS


@pytest.fixture(scope="module")
def sc(
    tmp_path_factory: pytest.TempPathFactory, moto_endpoint: str, _echo_server: EchoUpstream, seeded: dict[str, str]
) -> Iterator[SidecarProcess]:
    config: dict[str, Any] = {
        "secrets": {
            "backend": "aws",
            "aws": {"region": "us-east-1", "endpoint_url": moto_endpoint, "timeout_seconds": 2},
        },
        "upstreams": {
            "polygon": {
                "url": _echo_server.url + "/status/200",
                "secret": PREFIX + "{client_id}",
                "inject": {"query": "apiKey"},
                "allow_private": True,
            },
        },
    }
    with running_sidecar(config, tmp_path_factory.mktemp("ids"), env=AWS_ENV, name="client-ids") as proc:
        yield proc


def request_as(sc: SidecarProcess, raw_id: bytes | None, *, extra: bytes = b"") -> Any:
    head = b"GET /polygon HTTP/1.1\r\nHost: x\r\n"
    if raw_id is not None:
        head += b"X-Client-Id: " + raw_id + b"\r\n"
    return exchange(sc.url, head + extra + b"\r\n", timeout=5)


# (id, raw header value, acceptable refusal codes). None: a parser-level 400 without the sidecar's code
# (before e6c2a01 aiohttp answered those itself; now they carry bad_request).
HOSTILE: list[tuple[str, bytes, set[str | None]]] = [
    ("dot-dot-slash", b"a/../b", {"invalid_client_id"}),
    ("parent", b"../alice", {"invalid_client_id"}),
    ("tenant-escape", b"bob/../alice", {"invalid_client_id"}),
    ("slash", b"alice/x", {"invalid_client_id"}),
    ("pct-2f", b"%2F", {"invalid_client_id"}),
    ("pct-2f-escape", b"bob%2F..%2Falice", {"invalid_client_id"}),
    ("pct-alice", b"%61lice", {"invalid_client_id"}),
    ("pct-nul", b"alice%00", {"invalid_client_id"}),
    ("arn-secret", b"arn:aws:secretsmanager:us-east-1:123456789012:secret:" + PREFIX.encode() + b"alice-AbCdEf", {"invalid_client_id"}),
    ("arn-iam", b"arn:aws:iam::123456789012:root", {"invalid_client_id"}),
    ("colon", b"alice:bob", {"invalid_client_id"}),
    ("empty", b"", {"missing_identity"}),
    ("blank", b"   ", {"missing_identity", "invalid_client_id"}),
    ("leading-hyphen", b"-alice", {"invalid_client_id"}),
    ("leading-dot", b".alice", {"invalid_client_id"}),
    ("dot-dot", b"..", {"invalid_client_id"}),
    ("leading-underscore", b"_alice", {"invalid_client_id"}),
    ("129-chars", b"a" * 129, {"invalid_client_id"}),
    ("10kb", b"a" * 10 * 1024, {"invalid_client_id"}),
    ("latin1-a-ring", "ålice".encode(), {"invalid_client_id"}),
    ("cyrillic-a", "\u0430lice".encode(), {"invalid_client_id"}),
    ("zero-width", "alice\u200b".encode(), {"invalid_client_id"}),
    ("fullwidth-slash", "bob\uff0falice".encode(), {"invalid_client_id"}),
    ("raw-high-bytes", b"alice\xff\xfe", {"invalid_client_id", "bad_request", None}),
    ("comma-list", b"alice,bob", {"invalid_client_id"}),
    ("semicolon", b"alice;bob", {"invalid_client_id"}),
    ("space", b"alice bob", {"invalid_client_id"}),
    ("tab", b"alice\tbob", {"invalid_client_id"}),
    ("glob-star", b"*", {"invalid_client_id"}),
    ("glob-in-id", b"ali*", {"invalid_client_id"}),
    ("glob-class", b"alice[", {"invalid_client_id"}),
    ("template", b"{client_id}", {"invalid_client_id"}),
    ("template-upstream", b"{upstream}", {"invalid_client_id"}),
    ("format-attr", b"{client_id.__class__}", {"invalid_client_id"}),
    ("env-ref", b"${HOME}", {"invalid_client_id"}),
    ("backslash", b"bob\\alice", {"invalid_client_id"}),
    ("quote", b"alice\"", {"invalid_client_id"}),
    ("bare-cr", b"alice\rbob", {None, "bad_request"}),
    ("nul", b"alice\x00", {None, "bad_request"}),
    ("crlf-second-id", b"alice\r\nX-Client-Id: bob", {"bad_request"}),
]


@pytest.mark.parametrize(("raw_id", "codes"), [pytest.param(r, c, id=i) for i, r, c in HOSTILE])
def test_hostile_client_id_refused_before_any_store_call(
    sc: SidecarProcess, raw_id: bytes, codes: set[str | None]
) -> None:
    before = metric(sc, FETCHES, {"backend": "aws"})
    ex = request_as(sc, raw_id)
    r = ex.first
    assert 400 <= r.status < 500, ex.text()
    assert r.sidecar_error in codes, ex.text()
    assert metric(sc, FETCHES, {"backend": "aws"}) == before, "the store was asked about a hostile client ID"
    if r.sidecar_error is not None:
        # The sidecar's refusal names no secret, no ARN, no tenant. (aiohttp's own parser 400
        # quotes the offending request line back to its sender, who wrote it: nothing new.)
        body = r.body.decode("latin-1")
        assert PREFIX not in body and "arn:aws" not in body
        assert "bob" not in body and "alice" not in body
    assert_no_secret([ex.raw], *KEYS.values())


@pytest.mark.parametrize("second", [b"bob", b"alice"], ids=["different", "equal"])
def test_duplicate_identity_headers_refused_before_store(sc: SidecarProcess, second: bytes) -> None:
    before = metric(sc, FETCHES, {"backend": "aws"})
    ex = request_as(sc, b"alice", extra=b"X-Client-Id: " + second + b"\r\n")
    assert ex.first.status == 400 and ex.first.sidecar_error == "bad_request", ex.text()
    assert metric(sc, FETCHES, {"backend": "aws"}) == before


def test_longest_valid_id_does_reach_the_store(sc: SidecarProcess) -> None:
    """The control: the metric moves when an ID is valid, so the refusals above are meaningful."""
    before = metric(sc, FETCHES, {"backend": "aws"})
    ex = request_as(sc, b"z" * 128)
    assert ex.first.status == 403 and ex.first.sidecar_error == "no_credential", ex.text()
    assert metric(sc, FETCHES, {"backend": "aws"}) == before + 1


def test_name_ending_in_hyphen_and_six_chars_gets_no_other_tenants_key(
    sc: SidecarProcess, _echo_server: EchoUpstream
) -> None:
    """``alice-AbCdEf`` could be read by AWS as a partial ARN of ``alice``; it must never get alice's key."""
    suffix = ARNS["alice"].rsplit("-", 1)[1]
    _echo_server.reset()
    for candidate in (f"alice-{suffix}", "alice-AbCdEf", "alice-"):
        ex = request_as(sc, candidate.encode())
        assert ex.first.status == 403 and ex.first.sidecar_error == "no_credential", ex.text()
    assert _echo_server.received == [], "a request went upstream with someone's key"


def test_valid_client_still_works_and_log_is_clean(sc: SidecarProcess, _echo_server: EchoUpstream) -> None:
    _echo_server.reset()
    ex = request_as(sc, b"alice")
    assert ex.first.status == 200, ex.text()
    assert _echo_server.last().query == f"apiKey={KEYS['alice']}"
    assert_alive(sc)
    assert_no_secret([sc.output()], *KEYS.values())
