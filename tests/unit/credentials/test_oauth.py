"""The OAuth providers (sidecar/credentials/oauth.py) in the test's loop, against the Authlib server.

Real parts: the tests' authorization server (tests/support/oauth_server.py) on 127.0.0.1,
the file backend on a real file, and OpenBao for check-and-set rotation. The clock is the
provider's own (injected), so expiry is tested without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config import parse_settings
from sidecar.credentials.oauth import (
    RefreshToken,
    TokenExchange,
    _TokenProvider,
    build_oauth_provider,
)
from sidecar.errors import (
    ConsentRequired,
    CredentialRefused,
    NoCredential,
    SidecarError,
    TokenEndpointUnavailable,
)
from sidecar.identity.base import Identity
from sidecar.metrics import REGISTRY, apply_pending
from sidecar.secrets.base import Secret, SecretBackend
from sidecar.secrets.cache import SecretCache
from sidecar.secrets.file import FileBackend
from sidecar.secrets.vault import VaultBackend
from tests.support.oauth_server import TOKEN_EXCHANGE, OAuthServer
from tests.support.openbao import OpenBao


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def upstream_config(server: OAuthServer, credential: dict[str, Any], **extra: Any) -> dict[str, Any]:
    up = {
        "url": server.resource_url,
        "secret": "mcp/api/{client_id}",
        "allow_private": True,
        "timeout_seconds": 2,
        "credential": {"token_url": server.token_url, **credential},
    }
    up.update(extra)
    if credential.get("type") == "token_exchange":
        del up["secret"]  # nothing is stored
    return up


def settings_for(tmp_path: Path, up: dict[str, Any], backend: dict[str, Any] | None = None, **top: Any) -> Any:
    keys = tmp_path / "keys.yaml"
    if not keys.exists():
        keys.write_text("{}\n")
    raw = {"secrets": backend or {"file": {"path": str(keys)}}, "upstreams": {"api": up}, **top}
    return parse_settings(raw, base_dir=tmp_path, env={})


Make = Callable[..., Any]


@pytest.fixture
async def provider(tmp_path: Path, oauth_server: OAuthServer) -> AsyncIterator[Make]:
    """``make(credential, keys={...})``: a provider over a file backend holding ``keys``."""
    made: list[tuple[_TokenProvider, SecretBackend]] = []

    async def make(
        credential: dict[str, Any], keys: dict[str, Any] | None = None, *, cache: dict[str, Any] | None = None,
        **top: Any,
    ) -> Any:
        (tmp_path / "keys.yaml").write_text(yaml.safe_dump(keys or {}))
        secrets = {"file": {"path": str(tmp_path / "keys.yaml")}, "cache": cache} if cache else None
        settings = settings_for(tmp_path, upstream_config(oauth_server, credential), secrets, **top)
        backend = FileBackend(tmp_path / "keys.yaml")
        await backend.start()
        clock = Clock()
        p = build_oauth_provider(
            settings.upstreams["api"], SecretCache(backend, settings.secrets.cache, clock=clock), clock=clock
        )
        made.append((p, backend))
        return p

    yield make
    for p, backend in made:
        await p.close()
        await backend.close()


def agent(server: OAuthServer, name: str = "agent-1", **kwargs: Any) -> dict[str, str]:
    client = server.register_client(name, **kwargs)
    return {"client_id": client.client_id, "client_secret": client.client_secret}


CC = {"type": "oauth2_client_credentials"}


async def test_a_cold_burst_makes_one_token_request_and_a_warm_one_none(provider: Make, oauth_server: OAuthServer) -> None:
    p = await provider(CC, {"mcp/api/alice": agent(oauth_server)})
    results = await asyncio.gather(*(p.get(Identity("alice")) for _ in range(50)))
    assert oauth_server.requests["client_credentials"] == 1
    assert {word for _, word in results} == {"miss"}
    token = results[0][0]
    assert all(value == token for value, _ in results)
    assert await p.get(Identity("alice")) == (token, "hit")
    assert oauth_server.requests["client_credentials"] == 1
    # The token is one the server issued to this client.
    assert [t.client_id for t in oauth_server.access_tokens() if Secret(t.access_token) == token] == ["agent-1"]


async def test_client_secret_post_and_scopes(provider: Make, oauth_server: OAuthServer) -> None:
    creds = agent(oauth_server, auth_method="client_secret_post", scope="read write admin")
    p = await provider({**CC, "auth_method": "client_secret_post", "scopes": ["read", "write"]}, {"mcp/api/alice": creds})
    await p.get(Identity("alice"))
    assert [t.scope for t in oauth_server.access_tokens()] == ["read write"]


async def test_expiry_gets_a_new_token_and_serves_the_old_one_meanwhile(provider: Make, oauth_server: OAuthServer) -> None:
    oauth_server.access_lifetime = 300
    p = await provider(CC, {"mcp/api/alice": agent(oauth_server)})
    first, _ = await p.get(Identity("alice"))
    p._clock.now += 300 - 30 - 1
    assert await p.get(Identity("alice")) == (first, "hit")
    p._clock.now += 2  # inside the last 30 s: served, and the next one got behind it
    assert await p.get(Identity("alice")) == (first, "stale")
    while oauth_server.requests["client_credentials"] < 2 or "alice" in p._inflight:
        await asyncio.sleep(0.01)
    second, word = await p.get(Identity("alice"))
    assert word == "hit" and not second == first


async def test_a_provider_a_reload_replaced_starts_no_background_request(
    provider: Make, oauth_server: OAuthServer
) -> None:
    # Its successor shares the token table and gets the next token; one this provider
    # started in the background would only race it.
    oauth_server.access_lifetime = 300
    p = await provider(CC, {"mcp/api/alice": agent(oauth_server)})
    first, _ = await p.get(Identity("alice"))
    p.retire()
    p._clock.now += 300 - 30 + 1
    assert await p.get(Identity("alice")) == (first, "stale")
    assert not p._inflight
    assert oauth_server.requests["client_credentials"] == 1


async def test_no_expires_in_is_cached_sixty_seconds(provider: Make, oauth_server: OAuthServer) -> None:
    oauth_server.access_lifetime = None
    p = await provider(CC, {"mcp/api/alice": agent(oauth_server)})
    first, _ = await p.get(Identity("alice"))
    p._clock.now += 59
    assert await p.get(Identity("alice")) == (first, "hit")
    p._clock.now += 2
    second, word = await p.get(Identity("alice"))
    assert word == "miss" and not second == first


async def test_an_upstream_401_drops_the_token_and_gets_one_new_one(provider: Make, oauth_server: OAuthServer) -> None:
    p = await provider(CC, {"mcp/api/alice": agent(oauth_server)})
    first, _ = await p.get(Identity("alice"))
    # A 403 is about permissions: another token of the same grant would not change it.
    assert await p.rejected(Identity("alice"), first, 403) is None
    assert oauth_server.requests["client_credentials"] == 1
    fresh = await p.rejected(Identity("alice"), first, 401)
    assert fresh is not None and not fresh == first
    assert oauth_server.requests["client_credentials"] == 2
    # A request that saw the old token refused after the new one came gets the new one at once.
    assert await p.rejected(Identity("alice"), first, 401) == fresh
    # The new token refused at once too: the upstream, not the token, refuses; no third request.
    assert await p.rejected(Identity("alice"), fresh, 401) is None
    assert oauth_server.requests["client_credentials"] == 2


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_a_failing_endpoint_is_503_unless_a_valid_token_is_cached(
    provider: Make, oauth_server: OAuthServer, status: int
) -> None:
    oauth_server.access_lifetime = 300
    p = await provider(CC, {"mcp/api/alice": agent(oauth_server), "mcp/api/bob": agent(oauth_server, "agent-2")})
    token, _ = await p.get(Identity("alice"))
    oauth_server.fail_status = status
    with pytest.raises(TokenEndpointUnavailable) as info:
        await p.get(Identity("bob"))
    assert info.value.reason == "status_5xx"
    p._clock.now += 280  # alice's token is near its end but still valid: served while the endpoint fails
    assert await p.get(Identity("alice")) == (token, "stale")
    p._clock.now += 30  # now it expired
    with pytest.raises(TokenEndpointUnavailable):
        await p.get(Identity("alice"))


async def _two_callers(
    kind: str, provider: Make, oauth_server: OAuthServer
) -> tuple[_TokenProvider, Identity, Identity]:
    """A provider of ``kind`` and two callers the endpoint serves."""
    if kind == "client_credentials":
        keys = {"mcp/api/alice": agent(oauth_server), "mcp/api/bob": agent(oauth_server, "agent-2")}
        return await provider(CC, keys), Identity("alice"), Identity("bob")
    if kind == "refresh_token":
        app = oauth_server.register_client("app", grant_types=("refresh_token",))
        keys = {f"mcp/api/{user}": {"refresh_token": oauth_server.issue_grant("app", user)} for user in ("alice", "bob")}
        credential = {"type": "oauth2_refresh_token", "client_id": "app", "client_secret": app.client_secret,
                      "authorize_url": oauth_server.authorize_url}
        return await provider(credential, keys), Identity("alice"), Identity("bob")
    gw = oauth_server.register_client("gw", grant_types=(TOKEN_EXCHANGE,), audiences=("api://reports",))
    oauth_server.subject_verifier = {"token-of-alice": "alice", "token-of-bob": "bob"}.get
    p = await provider(
        {"type": "token_exchange", "client_id": "gw", "client_secret": gw.client_secret, "audience": "api://reports"},
        identity={"jwt": {"issuer": "https://idp.example/", "jwks_url": "https://idp.example/jwks.json"}},
    )
    return p, Identity("alice", "jwt", token=Secret("token-of-alice")), Identity("bob", "jwt", token=Secret("token-of-bob"))


def token_requests(grant: str, result: str) -> float:
    apply_pending()
    labels = {"upstream": "api", "grant": grant, "result": result}
    return REGISTRY.get_sample_value("sidecar_token_requests_total", labels) or 0.0


@pytest.mark.parametrize("grant", ["client_credentials", "refresh_token", "token_exchange"])
@pytest.mark.parametrize(
    ("status", "error", "reason"),
    [
        # RFC 6749 4.1.2.1's outage codes: Keycloak, Entra and Okta send them, often with 400.
        (400, "temporarily_unavailable", "temporarily_unavailable"),
        (400, "server_error", "server_error"),
        (500, "server_error", "status_5xx"),
        # Rate limited: try later, whatever the body calls it.
        (429, "slow_down", "throttled"),
        (429, None, "throttled"),
    ],
)
async def test_an_endpoint_saying_it_is_down_is_unavailable_never_a_refusal(
    provider: Make, oauth_server: OAuthServer, tmp_path: Path, grant: str, status: int, error: str | None, reason: str
) -> None:
    """An endpoint answering that it cannot serve now says nothing about the caller's credential:
    503 token_endpoint_unavailable (or the cached token while it is valid), never 403
    credential_refused, and for a refresh token never consent_required: the stored grant stays."""
    oauth_server.access_lifetime = 300
    p, alice, bob = await _two_callers(grant, provider, oauth_server)
    token, _ = await p.get(alice)
    stored = yaml.safe_load((tmp_path / "keys.yaml").read_text())  # alice's grant rotated once
    live = {user: oauth_server.live_grants(user) for user in ("alice", "bob")}
    errors, refusals = token_requests(grant, "error"), token_requests(grant, "refused")
    oauth_server.fail_status, oauth_server.fail_error = status, error
    # Nothing cached for bob: 503.
    with pytest.raises(TokenEndpointUnavailable) as info:
        await p.get(bob)
    assert info.value.reason == reason
    # Alice's token is near its end but still valid: served, and the next one tried behind it.
    p._clock.now += 280
    assert await p.get(alice) == (token, "stale")
    while p._inflight:
        await asyncio.sleep(0.01)
    # That try failed the same way: the token is still served (a refusal would have dropped it).
    assert await p.get(alice) == (token, "stale")
    assert token_requests(grant, "error") - errors == 2
    assert token_requests(grant, "refused") == refusals
    if grant == "refresh_token":
        # The grants stay as they were, in the store and at the provider; no consent asked for.
        assert yaml.safe_load((tmp_path / "keys.yaml").read_text()) == stored
        assert {user: oauth_server.live_grants(user) for user in ("alice", "bob")} == live
        assert not p._missing
    # The endpoint back: bob gets a token with what was stored (nothing remembered as refused).
    oauth_server.fail_status = oauth_server.fail_error = None
    fresh, word = await p.get(bob)
    assert word == "miss" and not fresh == token
    if grant == "refresh_token":
        now = yaml.safe_load((tmp_path / "keys.yaml").read_text())["mcp/api/bob"]["refresh_token"]
        assert oauth_server.live_grants("bob") == [now] != live["bob"]


async def test_a_hanging_endpoint_is_bounded_by_timeout_seconds(provider: Make, oauth_server: OAuthServer) -> None:
    p = await provider(CC, {"mcp/api/alice": agent(oauth_server)})
    oauth_server.hang()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TokenEndpointUnavailable) as info:
        await asyncio.gather(*(p.get(Identity("alice")) for _ in range(5)))
    assert info.value.reason == "timeout"
    assert loop.time() - started < 2 + 1.5  # timeout_seconds: 2
    assert oauth_server.requests["client_credentials"] == 1
    oauth_server.release()


async def test_a_refused_client_is_credential_refused(provider: Make, oauth_server: OAuthServer) -> None:
    p = await provider(CC, {"mcp/api/alice": agent(oauth_server), "mcp/api/bob": {"client_id": "agent-1", "client_secret": "wrong"}})
    oauth_server.refuse("agent-1")
    with pytest.raises(CredentialRefused) as info:
        await p.get(Identity("alice"))
    assert info.value.reason == "invalid_client"
    # A secret that is not an OAuth client's at all: no credential.
    p2 = await provider(CC, {"mcp/api/carol": "just-a-string"})
    with pytest.raises(NoCredential):
        await p2.get(Identity("carol"))
    with pytest.raises(NoCredential):
        await p2.get(Identity("nobody"))


async def test_refresh_token_without_a_grant_is_consent_required_with_the_authorize_url(
    provider: Make, oauth_server: OAuthServer
) -> None:
    app = oauth_server.register_client("app", grant_types=("refresh_token",))
    p = await provider(
        {"type": "oauth2_refresh_token", "client_id": "app", "client_secret": app.client_secret,
         "authorize_url": oauth_server.authorize_url},
        {"mcp/api/alice": {"refresh_token": oauth_server.issue_grant("app", "alice")}},
    )
    assert isinstance(p, RefreshToken)
    with pytest.raises(ConsentRequired) as info:
        await p.get(Identity("bob"))
    assert info.value.reason == "no_grant"
    assert info.value.authorize_url == oauth_server.authorize_url
    _, word = await p.get(Identity("alice"))
    assert word == "miss"
    oauth_server.revoke_user("alice")
    p._clock.now += 4000
    with pytest.raises(ConsentRequired) as info:
        await p.get(Identity("alice"))
    assert info.value.reason == "invalid_grant"


async def test_token_exchange_sends_the_callers_token_and_caches_per_subject(provider: Make, oauth_server: OAuthServer) -> None:
    gw = oauth_server.register_client("gw", grant_types=(TOKEN_EXCHANGE,), audiences=("api://reports",))
    subjects = {"token-of-alice": "alice", "token-of-bob": "bob"}
    oauth_server.subject_verifier = subjects.get
    p = await provider(
        {"type": "token_exchange", "client_id": "gw", "client_secret": gw.client_secret, "audience": "api://reports"},
        identity={"jwt": {"issuer": "https://idp.example/", "jwks_url": "https://idp.example/jwks.json"}},
    )
    assert isinstance(p, TokenExchange)
    alice = Identity("alice", "jwt", token=Secret("token-of-alice"))
    a1, _ = await p.get(alice)
    assert await p.get(alice) == (a1, "hit")
    b1, _ = await p.get(Identity("bob", "jwt", token=Secret("token-of-bob")))
    assert not a1 == b1
    issued = {t.user_id: t for t in oauth_server.access_tokens()}
    assert issued["alice"].audience == "api://reports" and Secret(issued["alice"].access_token) == a1
    assert oauth_server.requests[TOKEN_EXCHANGE] == 2
    with pytest.raises(CredentialRefused) as info:
        await p.get(Identity("mallory", "jwt", token=Secret("forged")))
    assert info.value.reason == "invalid_grant"


async def test_token_exchange_audience_refused(provider: Make, oauth_server: OAuthServer) -> None:
    gw = oauth_server.register_client("gw", grant_types=(TOKEN_EXCHANGE,), audiences=("api://reports",))
    oauth_server.subject_verifier = lambda token: "alice"
    p = await provider(
        {"type": "token_exchange", "client_id": "gw", "client_secret": gw.client_secret, "audience": "api://payroll"},
        identity={"jwt": {"issuer": "https://idp.example/", "jwks_url": "https://idp.example/jwks.json"}},
    )
    with pytest.raises(CredentialRefused) as info:
        await p.get(Identity("alice", "jwt", token=Secret("t")))
    assert info.value.reason == "invalid_target"


# ------------------------------------------------------------------ rotation with check-and-set (OpenBao)


async def vault_provider(
    bao: OpenBao, tmp_path: Path, server: OAuthServer, app_secret: str, secret: str
) -> tuple[RefreshToken, VaultBackend]:
    token_file = tmp_path / f"token-{uuid.uuid4().hex[:6]}"
    token_file.write_text(bao.token() + "\n")
    backend_cfg = {"backend": "vault", "vault": {"address": bao.address, "auth": {"method": "token", "token_file": str(token_file)}}}
    settings = settings_for(
        tmp_path,
        upstream_config(
            server, {"type": "oauth2_refresh_token", "client_id": "app", "client_secret": app_secret}, secret=secret
        ),
        backend_cfg,
    )
    backend = VaultBackend(settings.secrets.vault, 5.0, env={})
    await backend.start()
    clock = Clock()
    p = build_oauth_provider(settings.upstreams["api"], SecretCache(backend, settings.secrets.cache, clock=clock), clock=clock)
    assert isinstance(p, RefreshToken)
    return p, backend


async def test_a_rotated_grant_is_written_back_before_use_and_two_replicas_never_lose_it(
    openbao: OpenBao, tmp_path: Path, oauth_server: OAuthServer
) -> None:
    app = oauth_server.register_client("app", grant_types=("refresh_token",))
    path = f"mcp/oauth-{uuid.uuid4().hex[:8]}"
    first_grant = oauth_server.issue_grant("app", "alice")
    openbao.put(f"{path}/api/alice", refresh_token=first_grant)
    a, backend_a = await vault_provider(openbao, tmp_path, oauth_server, app.client_secret, path + "/api/{client_id}")
    b, backend_b = await vault_provider(openbao, tmp_path, oauth_server, app.client_secret, path + "/api/{client_id}")
    try:
        alice = Identity("alice")
        # Both replicas cold at once: one refreshes first and rotates; the other finds the
        # grant it read revoked, reads the newer one from the store and refreshes with it.
        await asyncio.gather(a.get(alice), b.get(alice))
        live = oauth_server.live_grants("alice")
        assert len(live) == 1 and live[0] != first_grant
        stored = await backend_a.fetch(f"{path}/api/alice")
        assert stored["refresh_token"] == live[0]  # the store holds the one grant that works
        # And it keeps working: the next refresh, from either replica, starts from the store.
        for p in (a, b):
            p._clock.now += 4000
            await p.get(alice)
        live = oauth_server.live_grants("alice")
        assert len(live) == 1
        assert (await backend_b.fetch(f"{path}/api/alice"))["refresh_token"] == live[0]
    finally:
        for p, backend in ((a, backend_a), (b, backend_b)):
            await p.close()
            await backend.close()


async def test_callers_without_a_credential_cannot_grow_the_provider_without_bound(provider: Make) -> None:
    """In header mode any app may name any client ID: each unknown one is remembered as
    "nothing stored" (negative_ttl_seconds), but never more of them than ``max_entries``,
    or an app cycling through IDs would grow the sidecar's memory without end."""
    p = await provider(CC, {}, cache={"max_entries": 8})
    for n in range(100):
        with pytest.raises(NoCredential):
            await p.get(Identity(f"nobody-{n}"))
    assert len(p._missing) <= 8
    assert len(p._tokens) <= 8
    # The most recent refusal is still remembered: no store read for it again.
    with pytest.raises(NoCredential):
        await p.get(Identity("nobody-99"))


async def test_closing_a_provider_mid_refresh_never_loses_the_rotated_grant(
    provider: Make, oauth_server: OAuthServer, tmp_path: Path
) -> None:
    """A reload closes the replaced provider after the grace period, and a shutdown closes
    every one. A refresh still in flight then has been answered with a rotated grant, or soon
    will be, and the old grant is revoked: cut before its write-back, the user's grant is gone."""
    app = oauth_server.register_client("app", grant_types=("refresh_token",))
    first = oauth_server.issue_grant("app", "alice")
    p = await provider(
        {"type": "oauth2_refresh_token", "client_id": "app", "client_secret": app.client_secret},
        {"mcp/api/alice": {"refresh_token": first}},
    )
    oauth_server.hang()
    request = asyncio.ensure_future(p.get(Identity("alice")))
    while oauth_server.hanging < 1:
        await asyncio.sleep(0.01)
    closing = asyncio.ensure_future(p.close())
    await asyncio.sleep(0)  # close() has begun while the refresh waits at the endpoint
    oauth_server.release()
    await asyncio.wait_for(closing, 30)
    with contextlib.suppress(asyncio.CancelledError, SidecarError):
        await request
    # The endpoint finishes the refresh whatever the provider did: the first grant is revoked.
    deadline = asyncio.get_running_loop().time() + 10
    while oauth_server.live_grants("alice") == [first] and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    live = oauth_server.live_grants("alice")
    stored = yaml.safe_load((tmp_path / "keys.yaml").read_text())["mcp/api/alice"]["refresh_token"]
    assert len(live) == 1 and stored == live[0], "the grant the provider rotated is not the one stored"


async def test_token_exchange_never_hands_one_subjects_token_to_another_with_the_same_client_id(
    provider: Make, oauth_server: OAuthServer
) -> None:
    """With client_id_claims reading azp or client_id, every user of one app has the same client
    ID; each caller's exchanged token acts for that caller's own subject, so it is cached per
    subject token, never per client ID alone."""
    gw = oauth_server.register_client("gw", grant_types=(TOKEN_EXCHANGE,), audiences=("api://reports",))
    oauth_server.subject_verifier = {"token-of-alice": "alice", "token-of-bob": "bob"}.get
    p = await provider(
        {"type": "token_exchange", "client_id": "gw", "client_secret": gw.client_secret, "audience": "api://reports"},
        identity={"jwt": {"issuer": "https://idp.example/", "jwks_url": "https://idp.example/jwks.json"}},
    )
    alice, _ = await p.get(Identity("mcp-app", "jwt", token=Secret("token-of-alice")))
    bob, _ = await p.get(Identity("mcp-app", "jwt", token=Secret("token-of-bob")))
    issued = {t.user_id: Secret(t.access_token) for t in oauth_server.access_tokens()}
    assert issued.keys() == {"alice", "bob"}, "bob was handed the token exchanged for alice"
    assert bob == issued["bob"] and alice == issued["alice"]
    # Each still comes from the cache the second time.
    assert await p.get(Identity("mcp-app", "jwt", token=Secret("token-of-bob"))) == (bob, "hit")
