"""JWT mode against a real OIDC provider on 127.0.0.1 (tests/support/idp.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from jwt.warnings import InsecureKeyLengthWarning
from multidict import CIMultiDict

from sidecar.config import parse_settings
from sidecar.errors import BadRequest, ConfigError, IdentityProviderUnavailable, InvalidClientId, InvalidToken
from sidecar.identity.factory import build_identity_resolver
from sidecar.identity.jwt_bearer import (
    JWKS_RETRY_FIRST_SECONDS,
    JWKS_RETRY_MAX_SECONDS,
    JwtIdentity,
    downgrades,
    retry_delay,
)
from sidecar.metrics import REGISTRY, apply_pending
from tests.support.idp import IdentityProvider, b64json, hs256_token, make_key, unsigned_token


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def metric(name: str, result: str) -> float:
    apply_pending()  # hot-path counts are applied in batches
    return REGISTRY.get_sample_value(name, {"result": result}) or 0.0


def cache_metric(result: str) -> float:
    return metric("sidecar_token_cache_total", result)


def jwks_metric(result: str) -> float:
    return metric("sidecar_jwks_refreshes_total", result)


def bearer(token: str, header: str = "Authorization", **extra: str) -> CIMultiDict[str]:
    value = f"Bearer {token}" if header.lower() == "authorization" else token
    return CIMultiDict({header: value, **extra})


MakeResolver = Callable[..., JwtIdentity]


async def background_refresh_done(resolver: JwtIdentity) -> None:
    """Wait for a JWKS refresh the resolver started without waiting for it."""
    task = next(iter(resolver._issuers.values())).keys._refresh_task
    if task is not None:
        await asyncio.wait((task,))


@pytest.fixture
async def idp() -> AsyncIterator[IdentityProvider]:
    async with IdentityProvider() as provider:
        yield provider


@pytest.fixture
async def make_resolver(idp: IdentityProvider) -> AsyncIterator[MakeResolver]:
    made: list[JwtIdentity] = []

    def make(
        *, clock: FakeClock | None = None, monotonic: FakeClock | None = None, identity: dict[str, Any] | None = None,
        **jwt: Any,
    ) -> JwtIdentity:
        jwt.setdefault("issuer", idp.issuer)
        jwt.setdefault("jwks_url", idp.jwks_url)
        jwt = {k: v for k, v in jwt.items() if v is not None}
        settings = parse_settings({"identity": {**(identity or {}), "jwt": jwt}})
        kwargs: dict[str, Any] = {}
        if clock is not None:
            kwargs["clock"] = clock
        if monotonic is not None:
            kwargs["monotonic"] = monotonic
        resolver = JwtIdentity(settings.identity, **kwargs)
        made.append(resolver)
        return resolver

    yield make
    for resolver in made:
        await resolver.close()


async def refused(resolver: JwtIdentity, headers: CIMultiDict[str], reason: str) -> InvalidToken:
    with pytest.raises(InvalidToken) as info:
        await resolver.resolve(headers)
    assert info.value.reason == reason
    assert info.value.status == 401 and info.value.code == "invalid_token"
    token = headers.get("Authorization", "").removeprefix("Bearer ")
    if token:
        assert token not in info.value.message
    return info.value


async def unavailable(resolver: JwtIdentity, headers: CIMultiDict[str]) -> IdentityProviderUnavailable:
    """No signing keys loaded: a retryable 503, not a verdict on the token."""
    with pytest.raises(IdentityProviderUnavailable) as info:
        await resolver.resolve(headers)
    assert info.value.status == 503 and info.value.code == "identity_provider_unavailable"
    assert info.value.reason == "jwks_unavailable"
    return info.value


# --------------------------------------------------------------------------- the two scenarios


async def test_agent_token_from_cognito_uses_client_id(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    # A Cognito client-credentials access token: client_id, token_use, scope, no aud.
    resolver = make_resolver(require_token_use="access", audience="agent-app")
    token = idp.mint(client_id="agent-app", sub="agent-app", token_use="access", scope="fininfo/read fininfo/write")
    identity = await resolver.resolve(bearer(token))
    assert identity.client_id == "agent-app"
    assert identity.source == "jwt"
    assert identity.scopes == {"fininfo/read", "fininfo/write"}


async def test_agent_token_from_keycloak_uses_azp(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    resolver = make_resolver(audience=["fininfo", "account"])
    token = idp.mint(azp="fininfo-agent", sub="5f1c-service-account", aud=["account", "fininfo"], scope="profile")
    identity = await resolver.resolve(bearer(token))
    assert identity.client_id == "fininfo-agent"


async def test_user_token_uses_sub(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    # A user's token also names the app (azp); configured claims pick the user.
    resolver = make_resolver(client_id_claims=["sub"])
    token = idp.mint(sub="user-7f3a", azp="web-portal", email="alice@example.com")
    assert (await resolver.resolve(bearer(token))).client_id == "user-7f3a"


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        ({"username": "alice", "email": "alice@example.com"}, "alice"),
        ({"email": "bob@example.com", "email_verified": True}, "bob@example.com"),
        ({"username": "", "email": "carol@example.com", "email_verified": True}, "carol@example.com"),
        ({"username": 42, "email": "dave@example.com", "email_verified": True}, "dave@example.com"),
    ],
)
async def test_user_token_uses_first_present_configured_claim(
    idp: IdentityProvider, make_resolver: MakeResolver, claims: dict[str, Any], expected: str
) -> None:
    resolver = make_resolver(client_id_claims=["username", "email"])
    token = idp.mint(sub="9b2e", **claims)
    assert (await resolver.resolve(bearer(token))).client_id == expected


async def test_scopes_and_groups_are_collected(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    resolver = make_resolver()
    cognito_groups: dict[str, Any] = {"cognito:groups": ["admins"]}
    token = idp.mint(
        client_id="agent",
        scope="read write",
        scp=["entra.read"],
        groups=["traders", 7],
        **cognito_groups,
    )
    identity = await resolver.resolve(bearer(token))
    assert identity.scopes == {"read", "write", "entra.read", "traders", "admins"}


async def test_client_id_from_a_claim_is_validated(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    resolver = make_resolver()
    with pytest.raises(InvalidClientId):
        await resolver.resolve(bearer(idp.mint(client_id="../../other-client")))


async def test_token_without_a_client_id_claim_is_refused(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    resolver = make_resolver(client_id_claims=["client_id"])
    await refused(resolver, bearer(idp.mint(sub="someone")), "no_client_id_claim")


# --------------------------------------------------------------------------- claims


async def test_expired_token_is_refused(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    resolver = make_resolver(leeway_seconds=30)
    now = int(time.time())
    await refused(resolver, bearer(idp.mint(client_id="a", iat=now - 600, exp=now - 31)), "expired")


async def test_leeway_accepts_small_clock_skew(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    resolver = make_resolver(leeway_seconds=30)
    now = int(time.time())
    assert (await resolver.resolve(bearer(idp.mint(client_id="a", exp=now - 20)))).client_id == "a"
    assert (await resolver.resolve(bearer(idp.mint(client_id="b", nbf=now + 20, iat=now + 20)))).client_id == "b"


async def test_not_yet_valid_token_is_refused(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    resolver = make_resolver(leeway_seconds=5)
    now = int(time.time())
    await refused(resolver, bearer(idp.mint(client_id="a", nbf=now + 120)), "not_yet_valid")
    await refused(resolver, bearer(idp.mint(client_id="a", iat=now + 120)), "not_yet_valid")


@pytest.mark.parametrize("exp", [None, "tomorrow", True, float("nan"), float("inf"), 10**400])
async def test_token_needs_a_numeric_expiry(idp: IdentityProvider, make_resolver: MakeResolver, exp: Any) -> None:
    resolver = make_resolver()
    # NaN would compare false with everything: a token that never expires.
    reason = "no_expiry" if exp is None else "malformed"
    await refused(resolver, bearer(idp.mint(client_id="a", exp=exp)), reason)


async def test_wrong_issuer_is_refused(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    resolver = make_resolver()
    await refused(resolver, bearer(idp.mint(client_id="a", iss="https://evil.example/realms/test")), "wrong_issuer")
    await refused(resolver, bearer(idp.mint(client_id="a", iss=None)), "wrong_issuer")


async def test_wrong_audience_is_refused(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    resolver = make_resolver(audience="fininfo")
    await refused(resolver, bearer(idp.mint(client_id="a", aud="other-api")), "wrong_audience")
    await refused(resolver, bearer(idp.mint(client_id="a", aud=["x", "y"])), "wrong_audience")
    await refused(resolver, bearer(idp.mint(client_id="a")), "wrong_audience")
    # A Cognito access token for another app client.
    await refused(resolver, bearer(idp.mint(client_id="other", token_use="access")), "wrong_audience")
    assert (await resolver.resolve(bearer(idp.mint(client_id="a", aud=["x", "fininfo"])))).client_id == "a"


async def test_audience_is_not_checked_when_not_configured(
    idp: IdentityProvider, make_resolver: MakeResolver
) -> None:
    resolver = make_resolver()
    assert (await resolver.resolve(bearer(idp.mint(client_id="a", aud="anything")))).client_id == "a"


async def test_required_token_use(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    resolver = make_resolver(require_token_use="access")
    await refused(resolver, bearer(idp.mint(sub="u1", aud="app", token_use="id")), "wrong_token_use")
    await refused(resolver, bearer(idp.mint(sub="u1")), "wrong_token_use")
    assert (await resolver.resolve(bearer(idp.mint(client_id="app", token_use="access")))).client_id == "app"


# --------------------------------------------------------------------------- algorithms and headers


async def test_alg_none_is_refused(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    resolver = make_resolver()
    for alg in ("none", "None", "NONE"):
        token = unsigned_token(idp.claims(client_id="a"), {"alg": alg, "kid": "key-1"})
        await refused(resolver, bearer(token), "alg_not_allowed")


async def test_hs256_signed_with_the_public_key_is_refused(
    idp: IdentityProvider, make_resolver: MakeResolver
) -> None:
    resolver = make_resolver()
    key = idp.keys[0]
    claims = idp.claims(client_id="a")
    for secret in (key.public_pem, json.dumps(key.public_jwk).encode(), json.dumps(key.public_jwk, indent=2).encode()):
        token = hs256_token(claims, secret, {"kid": key.kid})
        await refused(resolver, bearer(token), "alg_not_allowed")


async def test_hs256_is_refused_by_config() -> None:
    for algs in (["HS256"], ["none"], ["RS256", "HS512"], ["XX1"]):
        with pytest.raises(ConfigError) as info:
            parse_settings({"identity": {"jwt": {"jwks_url": "http://127.0.0.1:1/jwks.json", "algorithms": algs}}})
        assert any(p.startswith("identity.jwt.algorithms[") for p in info.value.problems)


async def test_algorithm_not_listed_is_refused(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    resolver = make_resolver(algorithms=["RS256"])
    rs384 = idp.mint(alg="RS384", client_id="a")
    await refused(resolver, bearer(rs384), "alg_not_allowed")
    ec_key = make_key("ec-1", "ec256")
    idp.add(ec_key)
    await refused(resolver, bearer(idp.mint(ec_key, client_id="a")), "alg_not_allowed")


async def test_ec_and_eddsa_keys(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    ec_key, ed_key, ec384 = make_key("ec-1", "ec256"), make_key("ed-1", "ed25519"), make_key("ec-384", "ec384")
    idp.add(ec_key)
    idp.add(ed_key)
    idp.add(ec384)
    resolver = make_resolver(algorithms=["RS256", "ES256", "EdDSA"])
    assert (await resolver.resolve(bearer(idp.mint(ec_key, client_id="ec")))).client_id == "ec"
    assert (await resolver.resolve(bearer(idp.mint(ed_key, client_id="ed")))).client_id == "ed"
    assert (await resolver.resolve(bearer(idp.mint(client_id="rsa")))).client_id == "rsa"
    # A P-384 key fits neither ES256 nor the allowed list: it is not loaded at all.
    await refused(resolver, bearer(idp.mint(ec_key, headers={"kid": "ec-384"}, client_id="a")), "unknown_kid")
    await refused(resolver, bearer(idp.mint(ec384, client_id="a")), "alg_not_allowed")


async def test_alg_must_fit_the_key_named_by_kid(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    ec_key = make_key("ec-1", "ec256")
    idp.add(ec_key)
    resolver = make_resolver(algorithms=["RS256", "ES256"])
    # Signed with the EC key, but naming the RSA key's kid.
    token = idp.mint(ec_key, headers={"kid": "key-1"}, client_id="a")
    await refused(resolver, bearer(token), "key_mismatch")


async def test_bad_signature_is_refused(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    resolver = make_resolver()
    other = make_key("key-1", "rsa", serial=99)  # same kid, different key material
    await refused(resolver, bearer(idp.mint(other, client_id="a")), "bad_signature")
    good = idp.mint(client_id="a")
    head, _, signature = good.split(".")
    forged_payload = b64json(idp.claims(client_id="admin"))
    await refused(resolver, bearer(f"{head}.{forged_payload}.{signature}"), "bad_signature")


async def test_key_location_headers_are_never_followed(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    resolver = make_resolver()
    await resolver.start()
    attacker = make_key("attacker-1", "rsa", serial=7)
    idp.attacker_keys = [attacker]
    for header in ("jku", "x5u"):
        token = idp.mint(attacker, headers={header: idp.attacker_jwks_url}, client_id="victim")
        await refused(resolver, bearer(token), "unknown_kid")
    # An embedded public key under the real kid: still verified with the provider's key.
    token = idp.mint(attacker, headers={"kid": "key-1", "jwk": attacker.public_jwk}, client_id="victim")
    await refused(resolver, bearer(token), "bad_signature")
    token = idp.mint(attacker, headers={"kid": "key-1", "x5c": ["MIIBIjAN"]}, client_id="victim")
    await refused(resolver, bearer(token), "bad_signature")
    assert idp.hits["attacker"] == 0


async def test_unknown_crit_header_is_refused(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    resolver = make_resolver()
    token = idp.mint(headers={"crit": ["exp-ext"], "exp-ext": 1}, client_id="a")
    await refused(resolver, bearer(token), "unsupported_crit")


async def test_token_without_kid_uses_the_only_key(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    resolver = make_resolver()
    token = idp.mint(headers={"kid": None}, client_id="a")
    assert (await resolver.resolve(bearer(token))).client_id == "a"
    idp.add(make_key("key-2", "rsa", serial=2))
    resolver2 = make_resolver()
    await refused(resolver2, bearer(idp.mint(headers={"kid": None}, client_id="b")), "unknown_kid")


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "a.b",
        "a.b.c",
        "a.b.c.d.e",  # a JWE is not a signed token
        "eyJhbGciOiJSUzI1NiJ9.e30.!!",
        f"{b64json(['RS256'])}.{b64json({})}.c2ln",
        "Zm9v.YmFy.YmF6",
        f"{b64json({'alg': 'RS256', 'kid': 5})}.{b64json({})}.c2ln",
        f"{b64json({'alg': 'RS256', 'kid': ''})}.{b64json({})}.c2ln",
        "eyJ" + "W" * 5000 + ".e30.c2ln",
        "\u00e9t\u00e9.e30.c2ln",
    ],
)
async def test_garbage_is_refused(idp: IdentityProvider, make_resolver: MakeResolver, token: str) -> None:
    resolver = make_resolver()
    error = await refused(resolver, bearer(token), "malformed")
    assert error.message == "The identity token is malformed."


@pytest.mark.parametrize("payload", [b"not json", b"[1, 2]", b'"claims"', b"[" * 5000])
async def test_signed_payload_must_be_a_json_object(
    idp: IdentityProvider, make_resolver: MakeResolver, payload: bytes
) -> None:
    resolver = make_resolver()
    token = jwt.PyJWS().encode(payload, idp.keys[0].private, algorithm="RS256", headers={"kid": "key-1"})
    await refused(resolver, bearer(token), "malformed")


@pytest.mark.parametrize("token", ["eyJ\udcff.e30.c2ln", "eyJ\u00e9.e30.c2ln"], ids=["undecodable-byte", "non-ascii"])
async def test_token_with_bytes_outside_ascii_is_malformed_not_a_crash(
    make_resolver: MakeResolver, token: str
) -> None:
    """aiohttp passes undecodable header bytes on as surrogates: refused before any hashing."""
    await refused(make_resolver(), bearer(token), "malformed")


async def test_oversized_token_is_refused_before_parsing(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    resolver = make_resolver()
    await refused(resolver, bearer(idp.mint(client_id="a", padding="x" * 20_000)), "oversized")
    assert idp.hits["jwks"] == 0


async def test_missing_token(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    resolver = make_resolver()
    await refused(resolver, CIMultiDict(), "missing")
    await refused(resolver, CIMultiDict({"Authorization": ""}), "missing")
    await refused(resolver, CIMultiDict({"Authorization": "Bearer   "}), "missing")
    # A forwarded client ID is no substitute for a token in JWT mode.
    await refused(resolver, CIMultiDict({"X-Client-Id": "agent"}), "missing")


async def test_other_schemes_are_refused(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    resolver = make_resolver()
    await refused(resolver, CIMultiDict({"Authorization": "Basic YWxpY2U6c2VjcmV0"}), "not_bearer")
    await refused(resolver, CIMultiDict({"Authorization": idp.mint(client_id="a")}), "not_bearer")


async def test_bearer_scheme_is_case_insensitive(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    resolver = make_resolver()
    token = idp.mint(client_id="a")
    for scheme in ("bearer", "BEARER", "Bearer"):
        headers = CIMultiDict({"authorization": f"{scheme}  {token} "})
        assert (await resolver.resolve(headers)).client_id == "a"


async def test_two_tokens_are_a_bad_request_even_when_equal(
    idp: IdentityProvider, make_resolver: MakeResolver
) -> None:
    resolver = make_resolver()
    one, two = idp.mint(client_id="a"), idp.mint(client_id="b")
    for second in (two, one):
        headers: CIMultiDict[str] = CIMultiDict(
            [("Authorization", f"Bearer {one}"), ("Authorization", f"Bearer {second}")]
        )
        with pytest.raises(BadRequest):
            await resolver.resolve(headers)


async def test_custom_header_carries_the_raw_token(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    resolver = make_resolver(header="X-Access-Token", identity={"header": "X-Client-Id"})
    assert resolver.strip_headers == {"x-access-token", "x-client-id"}
    token = idp.mint(client_id="agent")
    identity = await resolver.resolve(bearer(token, "X-Access-Token", **{"X-Client-Id": "someone-else"}))
    assert identity.client_id == "agent"
    # The Authorization header means nothing in this mode.
    await refused(resolver, CIMultiDict({"Authorization": f"Bearer {token}"}), "missing")


async def test_strip_headers_default(make_resolver: MakeResolver) -> None:
    assert make_resolver().strip_headers == {"authorization", "x-client-id"}


async def test_an_identity_given_to_the_proxy_is_refused_not_ignored(
    idp: IdentityProvider, make_resolver: MakeResolver
) -> None:
    resolver = make_resolver()
    user = CIMultiDict({"Proxy-Authorization": "Basic " + base64.b64encode(b"agent:").decode()})
    for headers, connect in ((user, True), (user, False), (CIMultiDict({"X-Client-Id": "agent"}), True)):
        with pytest.raises(BadRequest) as info:
            resolver.proxy_client_id(headers, connect=connect)
        assert info.value.reason == "unverified_proxy_identity"
        assert "send the token in Authorization on each request" in info.value.message
    # On a request (not a CONNECT) X-Client-Id is the forwarded header JWT mode strips, as before.
    assert resolver.proxy_client_id(CIMultiDict({"X-Client-Id": "agent"}), connect=False) is None
    # A token carried in Proxy-Authorization (jwt.header) is read per request as usual.
    proxy_token = make_resolver(header="Proxy-Authorization")
    token = idp.mint(client_id="agent")
    headers = CIMultiDict({"Proxy-Authorization": f"Bearer {token}"})
    assert proxy_token.proxy_client_id(headers, connect=False) is None
    assert (await proxy_token.resolve(headers)).client_id == "agent"
    with pytest.raises(BadRequest):
        proxy_token.proxy_client_id(headers, connect=True)  # it would cover no request in the tunnel


# --------------------------------------------------------------------------- JWKS fetching


async def test_issuer_only_uses_oidc_discovery(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    resolver = make_resolver(jwks_url=None)
    await resolver.start()
    assert (idp.hits["discovery"], idp.hits["jwks"]) == (1, 1)
    assert (await resolver.resolve(bearer(idp.mint(client_id="a")))).client_id == "a"
    assert (idp.hits["discovery"], idp.hits["jwks"]) == (1, 1)


async def test_discovery_for_another_issuer_is_not_trusted(
    idp: IdentityProvider, make_resolver: MakeResolver, caplog: pytest.LogCaptureFixture
) -> None:
    idp.discovery_overrides = {"issuer": "https://evil.example/"}
    resolver = make_resolver(jwks_url=None)
    with caplog.at_level(logging.WARNING, "sidecar.tokens"):
        await resolver.start()
    # The message names what the document says and which key to set.
    assert "names the issuer 'https://evil.example/', not identity.jwt.issuer" in caplog.text
    assert "set identity.jwt.issuer to exactly what it names" in caplog.text
    assert idp.hits["jwks"] == 0
    await unavailable(resolver, bearer(idp.mint(client_id="a")))
    assert not resolver.ready


async def test_unknown_kid_then_rotation(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    mono = FakeClock(1000.0)
    resolver = make_resolver(monotonic=mono, jwks_cooldown_seconds=30)
    await resolver.start()
    old = idp.mint(client_id="a")
    assert (await resolver.resolve(bearer(old))).client_id == "a"

    new_key = make_key("key-2", "rsa", serial=2)
    idp.rotate(new_key)
    new = idp.mint(new_key, client_id="a")
    # Within the cooldown of the start-up fetch, the new kid is not fetched yet.
    before = jwks_metric("cooldown")
    await refused(resolver, bearer(new), "unknown_kid")
    assert idp.hits["jwks"] == 1
    assert jwks_metric("cooldown") == before + 1

    mono.now += 31
    assert (await resolver.resolve(bearer(new))).client_id == "a"
    assert idp.hits["jwks"] == 2
    # The old key is gone from the JWKS: a token it signs that was never verified is refused.
    mono.now += 31
    await refused(resolver, bearer(idp.mint(make_key("key-1"), client_id="b")), "unknown_kid")


async def test_kid_flood_makes_one_fetch_per_cooldown(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    mono = FakeClock(1000.0)
    resolver = make_resolver(monotonic=mono, jwks_cooldown_seconds=30)
    idp.delay = 0.2  # keep the first fetch in flight while the flood arrives
    ok_before = jwks_metric("ok")

    def random_kid_token() -> str:
        return idp.mint(headers={"kid": uuid.uuid4().hex}, client_id="a")

    tokens = [random_kid_token() for _ in range(50)]
    results = await asyncio.gather(*(resolver.resolve(bearer(t)) for t in tokens), return_exceptions=True)
    assert all(isinstance(r, InvalidToken) and r.reason == "unknown_kid" for r in results)
    assert idp.hits["jwks"] == 1  # single flight
    assert jwks_metric("ok") == ok_before + 1

    idp.delay = 0.0
    for _ in range(20):
        await refused(resolver, bearer(random_kid_token()), "unknown_kid")
    assert idp.hits["jwks"] == 1  # cooldown

    mono.now += 31
    for _ in range(20):
        await refused(resolver, bearer(random_kid_token()), "unknown_kid")
    assert idp.hits["jwks"] == 2


@pytest.mark.parametrize(
    "kid",
    ["k" * 10_240, "x" * 257],
)
async def test_oversized_kid_is_refused_without_a_fetch(
    idp: IdentityProvider, make_resolver: MakeResolver, kid: str
) -> None:
    resolver = make_resolver()
    await refused(resolver, bearer(idp.mint(headers={"kid": kid}, client_id="a")), "malformed")
    assert idp.hits["jwks"] == 0


async def test_hostile_kids_are_only_dictionary_keys(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    resolver = make_resolver()
    await resolver.start()
    for kid in ('"; DROP TABLE keys; --', "../../../../etc/passwd", "key-1/../key-1", "key-1\x00", "%2e%2e/jwks"):
        await refused(resolver, bearer(idp.mint(headers={"kid": kid}, client_id="a")), "unknown_kid")
    assert idp.hits["jwks"] == 1
    assert idp.hits["attacker"] == 0


async def test_provider_down_after_first_fetch_keeps_cached_keys(
    idp: IdentityProvider, make_resolver: MakeResolver
) -> None:
    mono = FakeClock(1000.0)
    resolver = make_resolver(monotonic=mono, jwks_cache_seconds=60, jwks_cooldown_seconds=10)
    await resolver.start()
    await idp.go_down()
    errors_before = jwks_metric("error")

    assert (await resolver.resolve(bearer(idp.mint(client_id="a")))).client_id == "a"
    # The cache expires, the refresh fails, the old keys stay in use.
    mono.now += 61
    assert (await resolver.resolve(bearer(idp.mint(client_id="b")))).client_id == "b"
    await background_refresh_done(resolver)
    assert jwks_metric("error") == errors_before + 1
    assert (await resolver.resolve(bearer(idp.mint(client_id="b2")))).client_id == "b2"
    mono.now += 11
    await refused(resolver, bearer(idp.mint(headers={"kid": "key-9"}, client_id="c")), "unknown_kid")
    assert jwks_metric("error") == errors_before + 2

    await idp.come_back()
    mono.now += 11
    assert (await resolver.resolve(bearer(idp.mint(client_id="d")))).client_id == "d"
    await background_refresh_done(resolver)
    assert idp.hits["jwks"] == 2  # start, then the refresh after coming back


async def test_expired_jwks_cache_refreshes_in_the_background(
    idp: IdentityProvider, make_resolver: MakeResolver
) -> None:
    mono = FakeClock(1000.0)
    resolver = make_resolver(monotonic=mono, jwks_cache_seconds=60, jwks_timeout_seconds=5)
    await resolver.start()
    idp.hang = True
    mono.now += 61
    started = time.monotonic()
    assert (await resolver.resolve(bearer(idp.mint(client_id="a")))).client_id == "a"
    assert time.monotonic() - started < 1  # not held up by the hanging provider
    await asyncio.sleep(0.05)
    assert idp.hits["jwks"] == 2  # the refresh did start
    # A key the provider no longer publishes goes once the background refresh lands.
    idp.rotate(make_key("key-2", "rsa", serial=2))
    idp.release_hang()
    await background_refresh_done(resolver)
    await refused(resolver, bearer(idp.mint(make_key("key-1"), client_id="b")), "unknown_kid")


async def test_provider_down_at_start(
    idp: IdentityProvider, make_resolver: MakeResolver, caplog: pytest.LogCaptureFixture
) -> None:
    resolver = make_resolver(jwks_cooldown_seconds=3600)  # the cooldown is for unknown kids, not this
    await idp.go_down()
    with caplog.at_level(logging.DEBUG, "sidecar.tokens"):
        await resolver.start()  # logs, never raises
        assert not resolver.ready
        token = idp.mint(client_id="a")
        # Between background attempts a request is refused at once and starts no fetch.
        errors = jwks_metric("error")
        started = time.monotonic()
        await unavailable(resolver, bearer(token))
        assert time.monotonic() - started < 0.5
        assert jwks_metric("error") == errors
        # Retried in the background; one warning however many attempts fail.
        async with asyncio.timeout(10):
            while jwks_metric("error") < errors + 2:
                await asyncio.sleep(0.05)
        await idp.come_back()
        # No request needed: the keys load on their own.
        async with asyncio.timeout(JWKS_RETRY_MAX_SECONDS + 5):
            await resolver.wait_ready()
    assert resolver.ready
    warnings_ = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings_) == 1 and "retrying in the background" in warnings_[0].getMessage()
    loaded = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(loaded) == 1 and "failed fetches" in loaded[0]
    assert (await resolver.resolve(bearer(token))).client_id == "a"


def test_background_retry_doubles_to_its_cap_with_jitter() -> None:
    assert [retry_delay(n, lambda: 1.0) for n in range(1, 8)] == [1, 2, 4, 8, 15, 15, 15]
    assert [retry_delay(n, lambda: 0.0) for n in range(1, 8)] == [0.5, 1, 2, 4, 7.5, 7.5, 7.5]
    assert retry_delay(10_000) <= JWKS_RETRY_MAX_SECONDS
    assert JWKS_RETRY_FIRST_SECONDS == 1 and JWKS_RETRY_MAX_SECONDS == 15  # what the docs promise


async def test_a_request_waits_for_the_first_fetch_in_flight(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    idp.delay = 0.3
    resolver = make_resolver()
    await resolver.start(wait=False)
    assert not resolver.ready
    assert (await resolver.resolve(bearer(idp.mint(client_id="a")))).client_id == "a"
    assert resolver.ready and idp.hits["jwks"] == 1


async def test_keys_load_lazily_without_start(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    resolver = make_resolver()
    assert (await resolver.resolve(bearer(idp.mint(client_id="a")))).client_id == "a"
    assert idp.hits["jwks"] == 1


async def test_a_retired_resolver_stops_retrying(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    await idp.go_down()
    resolver = make_resolver()
    await resolver.start()
    errors = jwks_metric("error")
    async with asyncio.timeout(10):
        while jwks_metric("error") < errors + 1:  # a background retry happened
            await asyncio.sleep(0.05)
    resolver.retire()
    await idp.come_back()
    await asyncio.sleep(2.5)  # longer than the next wait (the second: at most 2 s)
    assert idp.hits["jwks"] == 0 and not resolver.ready
    await unavailable(resolver, bearer(idp.mint(client_id="a")))


@pytest.mark.parametrize("status", [404, 500, 503])
async def test_jwks_http_errors(idp: IdentityProvider, make_resolver: MakeResolver, status: int) -> None:
    idp.fail_status = status
    resolver = make_resolver()
    before = jwks_metric("error")
    await resolver.start()
    assert jwks_metric("error") == before + 1
    await unavailable(resolver, bearer(idp.mint(client_id="a")))


async def test_hanging_jwks_is_bounded_by_the_timeout(
    idp: IdentityProvider, make_resolver: MakeResolver, caplog: pytest.LogCaptureFixture
) -> None:
    idp.hang = True
    resolver = make_resolver(jwks_timeout_seconds=0.3, jwks_cooldown_seconds=0)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, "sidecar.tokens"):
        await resolver.start()
    assert time.monotonic() - started < 2
    assert "no answer within 0.3s" in caplog.text
    started = time.monotonic()
    await unavailable(resolver, bearer(idp.mint(client_id="a")))
    assert time.monotonic() - started < 2


async def test_close_stops_a_hanging_fetch(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    idp.hang = True
    resolver = make_resolver(jwks_timeout_seconds=30, jwks_cooldown_seconds=0)
    pending = asyncio.create_task(resolver.resolve(bearer(idp.mint(client_id="a"))))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await resolver.close()
    with pytest.raises(IdentityProviderUnavailable):
        await pending
    assert time.monotonic() - started < 2
    # A closed resolver opens no new session and makes no new fetch.
    idp.hang = False
    await unavailable(resolver, bearer(idp.mint(client_id="a")))
    assert idp.hits["jwks"] == 1
    await resolver.close()  # twice is fine


async def test_unusable_jwks_entries_are_skipped(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    private = make_key("leaked", "rsa", serial=3)
    assert isinstance(private.private, rsa.RSAPrivateKey)

    idp.extra_jwks = [
        {"kty": "RSA", "kid": "broken", "n": "!!!", "e": "AQAB"},
        {"kty": "EC", "kid": "no-curve", "x": "AA", "y": "AA"},
        {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
        {**json.loads(RSAAlgorithm.to_jwk(private.private)), "kid": "leaked"},
        {**private.public_jwk, "kid": "enc", "use": "enc"},
        {**private.public_jwk, "kid": "ps-only", "alg": "PS256"},
        "not an object",
        {**idp.keys[0].public_jwk, "kid": "x" * 300},
    ]
    weak = make_key("weak", "rsa1024")
    idp.add(weak)
    resolver = make_resolver()
    assert (await resolver.resolve(bearer(idp.mint(client_id="a")))).client_id == "a"
    for kid in ("broken", "hmac", "leaked", "enc", "ps-only"):
        await refused(resolver, bearer(idp.mint(private, headers={"kid": kid}, client_id="a")), "unknown_kid")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)  # minting with it is the point
        weak_token = idp.mint(weak, client_id="a")
    await refused(resolver, bearer(weak_token), "unknown_kid")


async def test_jwks_without_usable_keys_is_an_error(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    idp.keys = []
    resolver = make_resolver()
    before = jwks_metric("error")
    await resolver.start()
    assert jwks_metric("error") == before + 1


# --------------------------------------------------------------------------- verified-token cache


async def test_verified_token_is_cached(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    resolver = make_resolver()
    token = idp.mint(client_id="a", scope="read")
    hits, misses = cache_metric("hit"), cache_metric("miss")
    first = await resolver.resolve(bearer(token))
    second = await resolver.resolve(bearer(token))
    assert first == second
    assert (cache_metric("hit"), cache_metric("miss")) == (hits + 1, misses + 1)
    assert idp.hits["jwks"] == 1
    # A hit skips signature checks entirely: it holds even when the JWKS fails now.
    idp.fail_status = 500
    await resolver.resolve(bearer(token))
    assert cache_metric("hit") == hits + 2


async def test_cache_entries_end_at_exp(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    wall = FakeClock(time.time())
    resolver = make_resolver(clock=wall, leeway_seconds=30)
    exp = int(wall.now) + 60
    token = idp.mint(client_id="a", iat=int(wall.now), exp=exp)
    await resolver.resolve(bearer(token))
    hits, misses = cache_metric("hit"), cache_metric("miss")
    wall.now = exp + 1  # past exp, inside the leeway: verified again, still accepted
    assert (await resolver.resolve(bearer(token))).client_id == "a"
    assert (cache_metric("hit"), cache_metric("miss")) == (hits, misses + 1)
    wall.now = exp + 31
    await refused(resolver, bearer(token), "expired")


async def test_cache_is_bounded(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    resolver = make_resolver(cache_max_entries=2)
    one, two, three = (idp.mint(client_id=c) for c in ("a", "b", "c"))
    for token in (one, two, three):
        await resolver.resolve(bearer(token))
    misses = cache_metric("miss")
    await resolver.resolve(bearer(three))
    await resolver.resolve(bearer(two))
    await resolver.resolve(bearer(one))  # evicted as the least recently used
    assert cache_metric("miss") == misses + 1


async def test_cache_can_be_disabled(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    resolver = make_resolver(cache_max_entries=0)
    token = idp.mint(client_id="a")
    hits = cache_metric("hit")
    for _ in range(3):
        await resolver.resolve(bearer(token))
    assert cache_metric("hit") == hits


async def test_refused_tokens_are_not_cached(idp: IdentityProvider, make_resolver: MakeResolver) -> None:
    resolver = make_resolver(audience="api")
    token = idp.mint(client_id="a", aud="other")
    hits = cache_metric("hit")
    for _ in range(2):
        await refused(resolver, bearer(token), "wrong_audience")
    assert cache_metric("hit") == hits


# --------------------------------------------------------------------------- wiring and hygiene


async def test_build_identity_resolver_picks_jwt_mode(idp: IdentityProvider) -> None:
    settings = parse_settings({"identity": {"jwt": {"issuer": idp.issuer}}})
    resolver = build_identity_resolver(settings.identity)
    try:
        assert isinstance(resolver, JwtIdentity)
        await resolver.start()
        assert (await resolver.resolve(bearer(idp.mint(client_id="a")))).client_id == "a"
    finally:
        await resolver.close()


def test_header_mode_never_loads_pyjwt() -> None:
    # PyJWT and cryptography cost idle memory (bench/run.py measures rss_idle per mode);
    # the factory imports the JWT module only for JWT mode. A fresh interpreter, since
    # this one has them loaded already.
    code = (
        "import sys\n"
        "import sidecar.app, sidecar.identity\n"
        "from sidecar.config import parse_settings\n"
        "from sidecar.identity.factory import build_identity_resolver\n"
        "build_identity_resolver(parse_settings({'secrets': {'backend': 'aws'}}).identity)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jwt', 'cryptography')"
        " or m == 'sidecar.identity.jwt_bearer'))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_jwks_url_without_issuer_is_refused_by_config(idp: IdentityProvider) -> None:
    # iss is always checked, so a config that names no issuer cannot load.
    with pytest.raises(ConfigError) as err:
        parse_settings({"secrets": {"backend": "aws"}, "identity": {"jwt": {"jwks_url": idp.jwks_url}}})
    assert "identity.jwt.issuer: is required" in str(err.value)


async def test_logs_never_contain_tokens(
    idp: IdentityProvider, make_resolver: MakeResolver, caplog: pytest.LogCaptureFixture
) -> None:
    mono = FakeClock(1000.0)
    resolver = make_resolver(monotonic=mono, audience="api", jwks_cooldown_seconds=1)
    tokens = [
        idp.mint(client_id="a", aud="api", email="alice@example.com"),
        idp.mint(client_id="a", aud="nope"),
        idp.mint(headers={"kid": "unknown"}, client_id="a", aud="api"),
        unsigned_token(idp.claims(client_id="a")),
    ]
    with caplog.at_level(logging.DEBUG):
        await resolver.start()
        for token in tokens:
            try:
                await resolver.resolve(bearer(token))
            except InvalidToken:
                pass
            mono.now += 2
        await idp.go_down()
        await refused(resolver, bearer(idp.mint(headers={"kid": "k2"}, client_id="a", aud="api")), "unknown_kid")
    assert caplog.records
    for token in tokens:
        assert token not in caplog.text
        for part in token.split("."):
            assert not part or part not in caplog.text
    assert "alice@example.com" not in caplog.text


@pytest.mark.parametrize(
    ("trusted", "url", "refused"),
    [
        ("https://idp.example/realms/a", "http://idp.example/certs", True),  # discovery naming a plain-http JWKS
        ("https://idp.example/certs", "http://elsewhere.example/certs", True),  # a redirect to plain http
        ("https://idp.example/realms/a", "https://keys.idp.example/certs", False),
        ("http://127.0.0.1:8080/realms/a", "http://127.0.0.1:8080/certs", False),  # a local IdP over http, as set
        ("http://127.0.0.1:8080/certs", "https://idp.example/certs", False),
    ],
)
def test_keys_are_never_fetched_in_the_clear_for_an_https_issuer(trusted: str, url: str, refused: bool) -> None:
    # The rule itself; tests/e2e/test_jwt.py runs both paths that use it (discovery, redirects)
    # against an IdP over TLS.
    assert downgrades(trusted, url) is refused
