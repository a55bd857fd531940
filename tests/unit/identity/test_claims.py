"""Identity round 2 at the resolver: verified e-mail only, required claims, several issuers.

Two real OIDC providers on 127.0.0.1 (tests/support/idp.py), each with its own keys;
the resolver is built from parsed config exactly as the CLI builds it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
from multidict import CIMultiDict

from sidecar.config import parse_settings
from sidecar.errors import IdentityProviderUnavailable, InvalidToken
from sidecar.identity.jwt_bearer import JwtIdentity
from tests.support.idp import IdentityProvider, make_key


def bearer(token: str) -> CIMultiDict[str]:
    return CIMultiDict({"Authorization": f"Bearer {token}"})


async def refused(resolver: JwtIdentity, token: str, reason: str) -> None:
    with pytest.raises(InvalidToken) as info:
        await resolver.resolve(bearer(token))
    assert (info.value.status, info.value.code, info.value.reason) == (401, "invalid_token", reason)


@pytest.fixture
async def agents() -> AsyncIterator[IdentityProvider]:
    """The agents' user pool: machine-to-machine app clients, its own signing key."""
    async with IdentityProvider([make_key("agents-1", serial=11)], issuer_path="/pool/agents") as idp:
        yield idp


@pytest.fixture
async def people() -> AsyncIterator[IdentityProvider]:
    """The people's user pool: another issuer, another key."""
    async with IdentityProvider([make_key("people-1", serial=12)], issuer_path="/pool/people") as idp:
        yield idp


@pytest.fixture
async def resolvers() -> AsyncIterator[list[JwtIdentity]]:
    made: list[JwtIdentity] = []
    yield made
    for resolver in made:
        await resolver.close()


async def resolver_for(made: list[JwtIdentity], jwt: Any, *, start: bool = True) -> JwtIdentity:
    resolver = JwtIdentity(parse_settings({"identity": {"jwt": jwt}}).identity)
    made.append(resolver)
    if start:
        await resolver.start()
    return resolver


def entry(idp: IdentityProvider, **rules: Any) -> dict[str, Any]:
    return {"issuer": idp.issuer, "jwks_url": idp.jwks_url, "algorithms": ["RS256"], **rules}


# --------------------------------------------------------------------------- email


@pytest.mark.parametrize(
    ("verified", "served"),
    [
        (True, "alice@example.com"),
        # Only the JSON boolean true counts; the rest fall through to the next claim.
        (False, "user-7f3a"),
        ("true", "user-7f3a"),
        ("false", "user-7f3a"),
        (1, "user-7f3a"),
        (None, "user-7f3a"),  # no email_verified claim at all
    ],
)
async def test_email_names_the_caller_only_when_verified(
    people: IdentityProvider, resolvers: list[JwtIdentity], verified: object, served: str
) -> None:
    """A user who may edit their own e-mail attribute must not become alice by typing hers."""
    resolver = await resolver_for(resolvers, entry(people, client_id_claims=["email", "sub"]))
    token = people.mint(sub="user-7f3a", email="alice@example.com", email_verified=verified)
    assert (await resolver.resolve(bearer(token))).client_id == served


async def test_unverified_email_with_no_other_claim_is_refused_with_its_reason(
    people: IdentityProvider, resolvers: list[JwtIdentity]
) -> None:
    resolver = await resolver_for(resolvers, entry(people, client_id_claims=["email"]))
    await refused(resolver, people.mint(sub="u", email="alice@example.com", email_verified="true"), "email_not_verified")
    await refused(resolver, people.mint(sub="u"), "no_client_id_claim")


async def test_only_the_claim_named_email_needs_verification(
    people: IdentityProvider, resolvers: list[JwtIdentity]
) -> None:
    """upn and other claims are the provider's to vouch for; the rule is about `email`."""
    resolver = await resolver_for(resolvers, entry(people, client_id_claims=["upn"]))
    assert (await resolver.resolve(bearer(people.mint(upn="bob@corp.example")))).client_id == "bob@corp.example"


# --------------------------------------------------------------------------- required_claims


@pytest.mark.parametrize(
    ("claims", "accepted"),
    [
        ({"tenant": "acme", "token_use": "access", "custom:tier": 3, "mfa": True}, True),
        ({"tenant": "globex", "token_use": "access", "custom:tier": 3, "mfa": True}, False),
        ({"token_use": "access", "custom:tier": 3, "mfa": True}, False),  # missing
        ({"tenant": "acme", "token_use": "access", "custom:tier": "3", "mfa": True}, False),  # "3" is not 3
        ({"tenant": "acme", "token_use": "access", "custom:tier": 3, "mfa": 1}, False),  # 1 is not true
        ({"tenant": "acme", "token_use": "access", "custom:tier": True, "mfa": True}, False),  # true is not 1... nor 3
        ({"tenant": ["acme"], "token_use": "access", "custom:tier": 3, "mfa": True}, False),  # a list is not the value
    ],
)
async def test_required_claims_must_match_value_and_type(
    agents: IdentityProvider, resolvers: list[JwtIdentity], claims: dict[str, Any], accepted: bool
) -> None:
    rules = {"tenant": "acme", "token_use": "access", "custom:tier": 3, "mfa": True}
    resolver = await resolver_for(resolvers, entry(agents, client_id_claims=["client_id"], required_claims=rules))
    token = agents.mint(client_id="agent-1", **claims)
    if accepted:
        assert (await resolver.resolve(bearer(token))).client_id == "agent-1"
    else:
        await refused(resolver, token, "missing_required_claim")


# --------------------------------------------------------------------------- several issuers


async def test_each_token_is_checked_by_its_own_issuer_entry(
    agents: IdentityProvider, people: IdentityProvider, resolvers: list[JwtIdentity]
) -> None:
    resolver = await resolver_for(
        resolvers,
        [
            entry(agents, client_id_claims=["client_id"], required_claims={"token_use": "access"}),
            entry(people, client_id_claims=["sub"], audience="portal"),
        ],
    )
    assert resolver.ready
    agent = agents.mint(client_id="reporting-agent", sub="reporting-agent", token_use="access")
    person = people.mint(sub="user-7f3a", aud="portal", client_id="portal")
    assert (await resolver.resolve(bearer(agent))).client_id == "reporting-agent"
    # The person's token also carries client_id; the people entry reads sub only.
    assert (await resolver.resolve(bearer(person))).client_id == "user-7f3a"
    # Each entry's own rules: the agents' token_use pin does not apply to people, the
    # people's audience does not apply to agents, and each is enforced on its own tokens.
    await refused(resolver, agents.mint(client_id="reporting-agent", token_use="id"), "missing_required_claim")
    await refused(resolver, people.mint(sub="user-7f3a", aud="other-app"), "wrong_audience")


async def test_a_token_is_never_verified_with_another_issuers_keys(
    agents: IdentityProvider, people: IdentityProvider, resolvers: list[JwtIdentity]
) -> None:
    """Whoever holds one issuer's key must not mint tokens for the other by naming it in iss."""
    resolver = await resolver_for(resolvers, [entry(agents, client_id_claims=["client_id"]), entry(people)])
    agents_key, people_key = agents.keys[0], people.keys[0]
    # Signed by the agents' key, claiming to come from the people's pool: the people
    # entry's JWKS does not publish that kid.
    forged = agents.mint(agents_key, iss=people.issuer, sub="user-7f3a")
    await refused(resolver, forged, "unknown_kid")
    # Same, with the kid rewritten to the people key's kid: the signature does not verify.
    forged = agents.mint(agents_key, headers={"kid": people_key.kid}, iss=people.issuer, sub="user-7f3a")
    await refused(resolver, forged, "bad_signature")
    # An issuer that is in no entry is refused before any key is fetched.
    fetched = agents.hits["jwks"] + people.hits["jwks"]
    await refused(resolver, agents.mint(iss=agents.base_url + "/pool/other", client_id="x"), "wrong_issuer")
    await refused(resolver, agents.mint(iss=None, client_id="x"), "wrong_issuer")
    # iss as a list holding the right issuer (PyJWT will not mint it, so sign the bytes).
    payload = json.dumps({**agents.claims(client_id="x"), "iss": [agents.issuer]}).encode()
    listed = jwt.api_jws.encode(payload, agents_key.private, "RS256", headers={"kid": agents_key.kid})
    await refused(resolver, listed, "wrong_issuer")
    assert agents.hits["jwks"] + people.hits["jwks"] == fetched


async def test_one_issuer_down_keeps_the_other_working_and_the_pod_unready(
    agents: IdentityProvider, people: IdentityProvider, resolvers: list[JwtIdentity]
) -> None:
    people.fail_status = 503
    resolver = await resolver_for(
        resolvers, [entry(agents, client_id_claims=["client_id"]), entry(people, jwks_cooldown_seconds=0)]
    )
    assert not resolver.ready  # every issuer's keys, or not ready
    assert (await resolver.resolve(bearer(agents.mint(client_id="reporting-agent")))).client_id == "reporting-agent"
    with pytest.raises(IdentityProviderUnavailable):
        await resolver.resolve(bearer(people.mint(sub="user-7f3a")))
    people.fail_status = None
    await resolver.wait_ready()  # the background retry loads them
    assert resolver.ready
    assert (await resolver.resolve(bearer(people.mint(sub="user-7f3a")))).client_id == "user-7f3a"


async def test_cache_max_entries_zero_caches_none_of_that_issuers_tokens(
    agents: IdentityProvider, people: IdentityProvider, resolvers: list[JwtIdentity]
) -> None:
    resolver = await resolver_for(
        resolvers, [entry(agents, client_id_claims=["client_id"], cache_max_entries=0), entry(people)]
    )
    agent, person = agents.mint(client_id="a1"), people.mint(sub="p1")
    for token in (agent, person, agent, person):
        await resolver.resolve(bearer(token))
    assert len(resolver._cache) == 1  # the person's token only
