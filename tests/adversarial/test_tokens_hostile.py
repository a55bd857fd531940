"""Hostile identity tokens through the real CLI in JWT mode, against a real JWKS/OIDC provider.

The provider runs in its own event loop thread (the sidecar is a subprocess and the
tests are synchronous). Every refused token must get 401 invalid_token (or 400 for
malformed transport; 503 identity_provider_unavailable while the provider's keys
cannot be loaded), never reach the upstream, and never be fetched from a URL the
token names. Tokens are credentials too: none may appear in the sidecar's log.
"""

from __future__ import annotations

import json
import secrets as _random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from jwt.algorithms import RSAAlgorithm

from tests.support.idp import IdentityProvider, b64json, hs256_token, make_key, unsigned_token
from tests.support.leaks import make_secret
from tests.support.process import SidecarProcess
from tests.support.raw_http import (
    LoopThread,
    assert_alive,
    assert_no_secret,
    exchange,
    healthz,
    metric,
    running_sidecar,
)
from tests.support.upstream import EchoUpstream

KEYS: dict[str, str] = {}
TOKENS: list[str] = []
FETCHES = "sidecar_secret_fetch_duration_seconds_count"


@pytest.fixture(scope="module")
def idp() -> Iterator[IdentityProvider]:
    thread = LoopThread("idp")
    provider = IdentityProvider()
    thread.run(provider.start())
    provider.loop_thread = thread  # type: ignore[attr-defined]
    provider.attacker_keys = [make_key("attacker", serial=7)]
    yield provider
    thread.run(provider.stop())
    thread.stop()


def _config(idp: IdentityProvider, echo: EchoUpstream, keys_path: str, **jwt_extra: Any) -> dict[str, Any]:
    return {
        "identity": {"jwt": {"jwks_url": idp.jwks_url, "issuer": idp.issuer, **jwt_extra}},
        "secrets": {"backend": "file", "file": {"path": keys_path}},
        "upstreams": {
            "polygon": {"url": echo.url + "/status/200", "secret": "{client_id}", "inject": {"query": "apiKey"},
                        "allow_private": True, "timeout_seconds": 5},
        },
    }


@pytest.fixture(scope="module")
def sc(
    tmp_path_factory: pytest.TempPathFactory, idp: IdentityProvider, _echo_server: EchoUpstream
) -> Iterator[SidecarProcess]:
    KEYS.update({"alice": make_secret("jwt-alice"), "bob": make_secret("jwt-bob")})
    workdir = tmp_path_factory.mktemp("tokens")
    keys = workdir / "keys.yaml"
    keys.write_text(yaml.safe_dump(KEYS), encoding="utf-8")
    config = _config(idp, _echo_server, str(keys), require_token_use="access", jwks_cooldown_seconds=30)
    with running_sidecar(config, workdir, name="tokens") as proc:
        yield proc


def call(sc: SidecarProcess, *authorization: str, timeout: float = 5) -> Any:
    head = "GET /polygon HTTP/1.1\r\nHost: x\r\n" + "".join(f"Authorization: {a}\r\n" for a in authorization) + "\r\n"
    ex = exchange(sc.url, head.encode("latin-1"), timeout=timeout)
    assert_no_secret([ex.raw], *KEYS.values())
    return ex


def mint(idp: IdentityProvider, **kw: Any) -> str:
    kw.setdefault("client_id", "alice")
    kw.setdefault("token_use", "access")
    token = idp.mint(**kw)
    TOKENS.append(token)
    return token


def _tamper(token: str, header: dict[str, Any] | None = None, claims: dict[str, Any] | None = None) -> str:
    h, c, s = token.split(".")
    return ".".join([b64json(header) if header else h, b64json(claims) if claims else c, s])


def hostile_tokens(idp: IdentityProvider) -> dict[str, str]:
    """name -> token; every one must be refused."""
    real = idp.keys[0]
    attacker = idp.attacker_keys[0]
    base = idp.claims(client_id="alice", token_use="access")
    pem = real.public_pem
    jwk = json.dumps(real.public_jwk).encode()
    attacker_jwk = RSAAlgorithm.to_jwk(attacker.private.public_key(), as_dict=True)
    t = {
        "alg-none": unsigned_token(base),
        "alg-none-upper": unsigned_token(base, {"alg": "NONE"}),
        "alg-none-with-kid": unsigned_token(base, {"kid": real.kid}),
        "hs256-public-pem": hs256_token(base, pem, {"kid": real.kid}),
        "hs256-public-pem-stripped": hs256_token(base, pem.strip(), {"kid": real.kid}),
        "hs256-public-jwk": hs256_token(base, jwk, {"kid": real.kid}),
        "hs256-modulus": hs256_token(base, real.public_jwk["n"].encode(), {"kid": real.kid}),
        "crit-unknown": idp.mint(headers={"crit": ["exp-v2"], "exp-v2": True}, client_id="alice", token_use="access"),
        "crit-b64": idp.mint(headers={"crit": ["b64"], "b64": False}, client_id="alice", token_use="access"),
        "kid-path": idp.mint(key=attacker, headers={"kid": "../../../../dev/null"}, client_id="alice", token_use="access"),
        "kid-sql": idp.mint(key=attacker, headers={"kid": "' OR '1'='1"}, client_id="alice", token_use="access"),
        "kid-quote": idp.mint(key=attacker, headers={"kid": '"}]}'}, client_id="alice", token_use="access"),
        "kid-10kb": idp.mint(key=attacker, headers={"kid": "k" * 10_000}, client_id="alice", token_use="access"),
        "kid-empty": idp.mint(key=attacker, headers={"kid": ""}, client_id="alice", token_use="access"),
        # PyJWT will not encode a non-string kid: set it by hand (the signature no longer matters).
        "kid-number": _tamper(idp.mint(client_id="alice", token_use="access"), header={"alg": "RS256", "kid": 1}),
        "kid-list": _tamper(idp.mint(client_id="alice", token_use="access"), header={"alg": "RS256", "kid": [real.kid]}),
        "kid-nul": idp.mint(key=attacker, headers={"kid": real.kid + "\x00"}, client_id="alice", token_use="access"),
        "real-kid-attacker-key": idp.mint(key=attacker, headers={"kid": real.kid}, client_id="alice", token_use="access"),
        "jku": idp.mint(key=attacker, headers={"jku": idp.attacker_jwks_url}, client_id="alice", token_use="access"),
        "x5u": idp.mint(key=attacker, headers={"x5u": idp.attacker_jwks_url}, client_id="alice", token_use="access"),
        "jwk-embedded": idp.mint(key=attacker, headers={"jwk": attacker_jwk}, client_id="alice", token_use="access"),
        "jwk-embedded-real-kid": idp.mint(
            key=attacker, headers={"jwk": attacker_jwk, "kid": real.kid}, client_id="alice", token_use="access"
        ),
        "x5c-embedded": idp.mint(key=attacker, headers={"x5c": ["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"]},
                                 client_id="alice", token_use="access"),
        "id-token": idp.mint(client_id="alice", token_use="id"),
        "no-token-use": idp.mint(client_id="alice"),
        "expired": idp.mint(client_id="alice", token_use="access", exp=int(time.time()) - 3600),
        "not-yet-valid": idp.mint(client_id="alice", token_use="access", nbf=int(time.time()) + 3600),
        "issued-in-future": idp.mint(client_id="alice", token_use="access", iat=int(time.time()) + 3600),
        "no-exp": idp.mint(client_id="alice", token_use="access", exp=None),
        "exp-string": idp.mint(client_id="alice", token_use="access", exp="9999999999"),
        "exp-bool": idp.mint(client_id="alice", token_use="access", exp=True),
        "exp-huge": idp.mint(client_id="alice", token_use="access", exp=10**400),
        "wrong-issuer": idp.mint(client_id="alice", token_use="access", iss="https://evil.invalid/realms/test"),
        "issuer-trailing-slash": idp.mint(client_id="alice", token_use="access", iss=idp.issuer + "/"),
        "claims-swapped-after-signing": _tamper(idp.mint(client_id="bob", token_use="access"),
                                                claims={**base, "client_id": "alice"}),
        "header-swapped-after-signing": _tamper(idp.mint(client_id="alice", token_use="access"),
                                                header={"alg": "RS256", "kid": real.kid, "typ": "JWT", "x": 1}),
        "signature-stripped": ".".join(idp.mint(client_id="alice", token_use="access").split(".")[:2]) + ".",
        "es256-not-allowed": idp.mint(key=make_key("ec", "ec256"), client_id="alice", token_use="access"),
        "ps256-same-key": idp.mint(alg="PS256", client_id="alice", token_use="access"),
        "jwe-five-parts": "eyJhbGciOiJSU0EtT0FFUCJ9.a.b.c.d",
        "four-parts": idp.mint(client_id="alice", token_use="access") + ".extra",
        "not-base64": "!!!.???.***",
        "header-not-json": "bm90anNvbg.e30.",
        "header-array": b64json([1, 2]) + ".e30.sig",
        "deep-json": b64json({"alg": "RS256"})[:-1] + "." + "W" * 3000 + ".sig",
        "oversized-15k": idp.mint(client_id="alice", token_use="access", pad="p" * 15_000),
        "client-id-path": idp.mint(client_id="bob/../alice", token_use="access"),
        "client-id-arn": idp.mint(client_id="arn:aws:secretsmanager:us-east-1:1:secret:alice-AbCdEf", token_use="access"),
        "client-id-pct": idp.mint(client_id="bob%2Falice", token_use="access"),
        "client-id-nonascii": idp.mint(client_id="\u0430lice", token_use="access"),
        "client-id-empty": idp.mint(client_id="", azp=None, sub=None, token_use="access"),
        "client-id-number": idp.mint(client_id=12345, sub=None, token_use="access"),
        "client-id-10kb": idp.mint(client_id="a" * 10_000, token_use="access"),
    }
    TOKENS.extend(t.values())
    return t


HOSTILE_NAMES = [
    "alg-none", "alg-none-upper", "alg-none-with-kid", "hs256-public-pem", "hs256-public-pem-stripped", "hs256-public-jwk",
    "hs256-modulus", "crit-unknown", "crit-b64", "kid-path", "kid-sql", "kid-quote", "kid-10kb", "kid-empty", "kid-number",
    "kid-list", "kid-nul", "real-kid-attacker-key", "jku", "x5u", "jwk-embedded", "jwk-embedded-real-kid", "x5c-embedded",
    "id-token", "no-token-use", "expired", "not-yet-valid", "issued-in-future", "no-exp", "exp-string", "exp-bool",
    "exp-huge", "wrong-issuer", "issuer-trailing-slash", "claims-swapped-after-signing", "header-swapped-after-signing",
    "signature-stripped", "es256-not-allowed", "ps256-same-key", "jwe-five-parts", "four-parts", "not-base64",
    "header-not-json", "header-array", "deep-json", "oversized-15k", "client-id-path", "client-id-arn", "client-id-pct",
    "client-id-nonascii", "client-id-empty", "client-id-number", "client-id-10kb",
]


@pytest.fixture(scope="module")
def tokens(idp: IdentityProvider) -> dict[str, str]:
    return hostile_tokens(idp)


def test_valid_token_is_the_control(sc: SidecarProcess, idp: IdentityProvider, _echo_server: EchoUpstream) -> None:
    _echo_server.reset()
    ex = call(sc, "Bearer " + mint(idp))
    assert ex.first.status == 200, ex.text()
    assert _echo_server.last().query == f"apiKey={KEYS['alice']}"
    assert "authorization" not in _echo_server.last().header_names()


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_token_refused(
    sc: SidecarProcess, idp: IdentityProvider, tokens: dict[str, str], _echo_server: EchoUpstream, name: str
) -> None:
    _echo_server.reset()
    before = metric(sc, FETCHES)
    attacker_hits = idp.hits["attacker"]
    ex = call(sc, "Bearer " + tokens[name])
    r = ex.first
    if name.startswith("client-id-") and name not in ("client-id-empty", "client-id-number"):
        assert r.status == 400 and r.sidecar_error == "invalid_client_id", ex.text()
    else:
        assert r.status == 401 and r.sidecar_error == "invalid_token", ex.text()
        assert r.header("WWW-Authenticate") == 'Bearer error="invalid_token"', ex.text()
    assert _echo_server.received == [], "a refused token reached the upstream"
    assert metric(sc, FETCHES) == before, "a refused token caused a secret store call"
    assert idp.hits["attacker"] == attacker_hits, "the sidecar fetched a key from a URL the token named"
    assert tokens[name] not in r.body.decode("latin-1")


@pytest.mark.parametrize(
    "authorization",
    [[], [""], ["Bearer"], ["Bearer "], ["Basic YWxpY2U6cHc="], ["bearer\tabc.def.ghi"], ["Token abc.def.ghi"]],
    ids=["absent", "empty", "bearer-only", "bearer-space", "basic", "tab", "other-scheme"],
)
def test_missing_or_non_bearer_authorization(sc: SidecarProcess, authorization: list[str]) -> None:
    r = call(sc, *authorization).first
    assert r.status == 401 and r.sidecar_error == "invalid_token", r.text()


@pytest.mark.parametrize("second", ["bob", "alice"], ids=["different", "equal"])
def test_duplicate_authorization_headers_are_refused(
    sc: SidecarProcess, idp: IdentityProvider, _echo_server: EchoUpstream, second: str
) -> None:
    """Two Authorization lines are ambiguous even when equal: 400, before any verification."""
    _echo_server.reset()
    alice = mint(idp)
    other = alice if second == "alice" else mint(idp, client_id=second)
    r = call(sc, "Bearer " + alice, "Bearer " + other).first
    assert r.status == 400 and r.sidecar_error == "bad_request", r.text()
    assert _echo_server.received == []


def test_forwarded_client_id_header_is_ignored_in_jwt_mode(sc: SidecarProcess, idp: IdentityProvider, _echo_server: EchoUpstream) -> None:
    _echo_server.reset()
    token = mint(idp, client_id="bob")
    head = f"GET /polygon HTTP/1.1\r\nHost: x\r\nX-Client-Id: alice\r\nAuthorization: Bearer {token}\r\n\r\n"
    ex = exchange(sc.url, head.encode())
    assert ex.first.status == 200
    assert _echo_server.last().query == f"apiKey={KEYS['bob']}", "the header, not the token, chose the tenant"
    assert "x-client-id" not in _echo_server.last().header_names()


def test_flood_of_random_kids_fetches_jwks_at_most_once(sc: SidecarProcess, idp: IdentityProvider) -> None:
    attacker = idp.attacker_keys[0]
    flood = [
        idp.mint(key=attacker, headers={"kid": _random.token_hex(8)}, client_id="alice", token_use="access")
        for _ in range(200)
    ]
    TOKENS.extend(flood)
    before = idp.hits["jwks"]
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        for _ in range(200):
            if stop.is_set():
                return
            started = time.monotonic()
            assert healthz(sc) == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.02)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        for token in flood:
            r = call(sc, "Bearer " + token).first
            assert r.status == 401 and r.sidecar_error == "invalid_token"
    finally:
        stop.set()
        prober.join(10)
    assert idp.hits["jwks"] - before <= 1, f"{idp.hits['jwks'] - before} JWKS fetches for a kid flood"
    assert latencies and max(latencies) < 1.0, f"/healthz took {max(latencies):.2f}s during the flood"
    assert_alive(sc)


def test_hanging_jwks_is_bounded(
    tmp_path_factory: pytest.TempPathFactory, idp: IdentityProvider, _echo_server: EchoUpstream
) -> None:
    """A provider that never answers: requests get 503 within the JWKS timeout, the process lives."""
    thread: LoopThread = idp.loop_thread  # type: ignore[attr-defined]
    hanging = IdentityProvider(keys=[make_key("key-1")])
    hanging.hang = True
    thread.run(hanging.start())
    try:
        workdir = tmp_path_factory.mktemp("hang")
        keys = workdir / "keys.yaml"
        keys.write_text(yaml.safe_dump(KEYS), encoding="utf-8")
        config = _config(hanging, _echo_server, str(keys), jwks_timeout_seconds=1, jwks_cooldown_seconds=0)
        with running_sidecar(config, workdir, name="tokens-hang", wait_ready=False) as proc:
            assert proc.readyz() == 503  # no signing keys, no readiness
            token = hanging.mint(client_id="alice")
            TOKENS.append(token)
            for _ in range(3):
                ex = call(proc, "Bearer " + token, timeout=6)
                assert ex.first.status == 503, ex.text()
                assert ex.first.sidecar_error == "identity_provider_unavailable", ex.text()
                assert ex.elapsed < 3, f"a hanging JWKS held a request {ex.elapsed:.1f}s"
            assert_alive(proc)
            assert_no_secret([proc.output()], *KEYS.values(), *TOKENS)
    finally:
        thread.call(hanging.release_hang)
        thread.run(hanging.stop())


def test_zz_log_has_no_key_and_no_token(sc: SidecarProcess) -> None:
    assert_alive(sc)
    assert_no_secret([sc.output()], *KEYS.values(), *TOKENS)
