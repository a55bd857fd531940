"""A verified JWT in, an Identity out: keys from the provider's JWKS, claims checked here.

The flow for one request::

    header -> token -> cache (sha256 of the token) -> hit: Identity
                                                   -> miss: header checks (alg, crit, kid)
                                                            -> key from the JWKS
                                                            -> signature (PyJWT)
                                                            -> claims (exp nbf iat iss aud token_use)
                                                            -> client ID + scopes -> cache

Security choices, each for a known attack on JWT verifiers:

- The algorithm must be one of ``identity.jwt.algorithms`` (asymmetric only; config
  refuses ``none`` and ``HS*``), and the key is built for that algorithm from the
  JWKS entry, so a public key can never become an HMAC secret.
- Keys come only from the configured JWKS (or the issuer's discovery document).
  Token headers such as ``jku``, ``x5u``, ``jwk`` and ``x5c`` are ignored: a token
  cannot name where its own key comes from.
- A ``kid`` the cache does not know triggers at most one JWKS fetch per
  ``jwks_cooldown_seconds``, and concurrent refreshes share one fetch, so a flood
  of made-up ``kid`` values cannot hammer the identity provider.
- Until keys are loaded, no token can be checked: that is an outage (503
  ``identity_provider_unavailable``), not a bad token, and the keys are fetched
  again in the background with backoff, not by requests.
- Tokens are never logged or put in an error message; the verified-token cache is
  keyed by a SHA-256 digest of the token.

PyJWT only checks the signature here; every claim is checked by this module against
one clock so a cached result and a fresh verification always agree.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import random
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from jwt.algorithms import AllowedPublicKeys

from sidecar.config import ASYMMETRIC_ALGORITHMS, ClaimValue, IdentitySettings, JwtSettings
from sidecar.errors import BadRequest, IdentityProviderUnavailable, InvalidToken
from sidecar.identity.base import (
    PROXY_AUTHORIZATION,
    HeaderReader,
    Identity,
    claim_strings,
    single_header,
    validate_client_id,
)
from sidecar.metrics import JWKS_REFRESHES, TOKEN_CACHE, bump
from sidecar.net import loggable_url, split_http_url, trust_context
from sidecar.secrets.base import Secret

#: Named as when this module was sidecar/tokens.py: log levels and filters set on that name still apply.
log = logging.getLogger("sidecar.tokens")

# A bearer token larger than this is refused before any parsing. Real access and ID
# tokens from Cognito, Keycloak, Entra and Okta stay well under 8 KiB.
MAX_TOKEN_LENGTH: Final = 16 * 1024
# A longer "kid" is not a key ID any provider issues; refusing it early keeps
# attacker-chosen junk out of every lookup.
MAX_KID_LENGTH: Final = 256
# Discovery documents and JWKS are a few KiB; more is a misbehaving endpoint.
MAX_DOCUMENT_BYTES: Final = 1024 * 1024
# RSA keys shorter than this are not accepted from a JWKS (NIST SP 800-131A).
MIN_RSA_KEY_BITS: Final = 2048
# Claims whose values become Identity.scopes: OAuth scopes (scope, scp), groups
# (Cognito, Okta, Entra ID) and roles (Entra ID app roles, Keycloak realm roles).
_TOKEN_HIT = TOKEN_CACHE.labels(result="hit")
_TOKEN_MISS = TOKEN_CACHE.labels(result="miss")
SCOPE_CLAIMS: Final = ("scope", "scp", "cognito:groups", "groups", "roles", "realm_access.roles")
DISCOVERY_PATH: Final = "/.well-known/openid-configuration"
#: While no signing keys are loaded they are fetched again in the background: the wait
#: after the first failure is up to 1 s, each next one doubles up to 15 s, and each wait
#: is drawn from the upper half of its step (jitter: sidecars restarted together do not
#: ask the provider in step). From the provider's return to loaded keys it is therefore
#: at most one wait at the cap plus an attempt that was still timing out.
JWKS_RETRY_FIRST_SECONDS: Final = 1.0
JWKS_RETRY_MAX_SECONDS: Final = 15.0
USER_AGENT: Final = "mcp-credential-sidecar"

# Compact JWS: three base64url parts. The signature may be empty so that an
# ``alg: none`` token is refused for its algorithm, which is the clearer reason.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
# JWK members that only private keys carry; a JWKS must never publish them.
_PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

_JWS = jwt.PyJWS()

_MESSAGES: Final[Mapping[str, str]] = {
    "missing": "No identity token was sent with the request.",
    "not_bearer": "The Authorization header does not carry a Bearer token.",
    "oversized": "The identity token is too large.",
    "malformed": "The identity token is malformed.",
    "alg_not_allowed": "The identity token is signed with an algorithm that is not allowed.",
    "unsupported_crit": "The identity token requires an extension the sidecar does not support.",
    "jwks_unavailable": "The identity provider's signing keys could not be loaded.",
    "unknown_kid": "The identity token is signed with a key the identity provider does not publish.",
    "key_mismatch": "The identity token's algorithm does not match its signing key.",
    "bad_signature": "The identity token's signature is not valid.",
    "no_expiry": "The identity token has no expiry time.",
    "expired": "The identity token has expired.",
    "not_yet_valid": "The identity token is not valid yet.",
    "wrong_issuer": "The identity token was issued by an issuer that is not trusted.",
    "wrong_audience": "The identity token is not meant for this audience.",
    "wrong_token_use": "The identity token is not of the required kind (token_use).",
    "missing_required_claim": "The identity token lacks a claim value this sidecar requires.",
    "no_client_id_claim": "The identity token carries none of the configured client ID claims.",
    "email_not_verified": "The identity token's email is not verified, so it cannot name the caller.",
}


def _refuse(reason: str) -> InvalidToken:
    """The InvalidToken for ``reason``, with our fixed sentence (never library text, never the token)."""
    return InvalidToken(_MESSAGES[reason], reason=reason)


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True, slots=True)
class _Jwk:
    """One usable JWKS entry: its kid and the verification key per allowed algorithm."""

    kid: str | None
    keys: Mapping[str, AllowedPublicKeys]


class KeySet:
    """The usable keys of one JWKS document, indexed by kid."""

    __slots__ = ("_by_kid", "entries")

    def __init__(self, entries: tuple[_Jwk, ...]) -> None:
        self.entries = entries
        self._by_kid = {e.kid: e for e in entries if e.kid is not None}

    def find(self, kid: str | None, alg: str) -> _Jwk | None:
        """The entry for ``kid``; without a kid, the one entry usable with ``alg`` if unambiguous."""
        if kid is not None:
            return self._by_kid.get(kid)
        usable = [e for e in self.entries if alg in e.keys]
        return usable[0] if len(usable) == 1 else None

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._by_kid)


def downgrades(trusted: str, url: str) -> bool:
    """True when ``url`` is plain http although ``trusted`` (where it came from) is https."""
    return urlsplit(trusted).scheme == "https" and urlsplit(url).scheme != "https"


class _FetchError(Exception):
    """A discovery or JWKS fetch failed; the message is ours and safe to log."""


def parse_jwks(document: object, algorithms: tuple[str, ...]) -> KeySet:
    """Build the usable keys of a JWKS document; entries that fail to parse are skipped."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise _FetchError("the JWKS document has no 'keys' list")
    entries: list[_Jwk] = []
    seen: set[str] = set()
    for index, raw in enumerate(document["keys"]):
        entry = _parse_jwk(raw, index, algorithms)
        if entry is None:
            continue
        if entry.kid is not None:
            if entry.kid in seen:
                log.warning("JWKS key %d repeats kid %r; the first one is used", index, entry.kid[:64])
                continue
            seen.add(entry.kid)
        entries.append(entry)
    return KeySet(tuple(entries))


def _parse_jwk(raw: object, index: int, algorithms: tuple[str, ...]) -> _Jwk | None:
    if not isinstance(raw, dict):
        log.warning("JWKS key %d is not an object; skipped", index)
        return None
    kid = raw.get("kid")
    if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID_LENGTH):
        log.warning("JWKS key %d has an unusable kid; skipped", index)
        return None
    if raw.get("use") not in (None, "sig"):
        return None  # an encryption key published alongside the signing keys
    if not _PRIVATE_JWK_MEMBERS.isdisjoint(raw):
        # Never verify with (or keep in memory) key material that should be secret.
        log.warning("JWKS key %d carries private or symmetric key material; skipped", index)
        return None
    jwk_alg = raw.get("alg")
    candidates = algorithms if jwk_alg is None else tuple(a for a in algorithms if a == jwk_alg)
    keys: dict[str, AllowedPublicKeys] = {}
    for alg in candidates:
        key = _key_for_algorithm(raw, alg)
        if key is not None:
            keys[alg] = key
    if not keys:
        log.info("JWKS key %d (kid %r) fits none of the allowed algorithms; skipped", index, str(kid)[:64])
        return None
    return _Jwk(kid, keys)


def _key_for_algorithm(raw: dict[str, Any], alg: str) -> AllowedPublicKeys | None:
    """The public key of ``raw`` prepared for ``alg``, or None when the two do not fit."""
    algorithm = jwt.get_algorithm_by_name(alg)
    try:
        # from_jwk checks kty (RSA, EC, OKP); prepare_key checks the curve fits the alg.
        key: AllowedPublicKeys = algorithm.prepare_key(algorithm.from_jwk(raw))
    except (jwt.PyJWTError, ValueError, TypeError, KeyError):
        return None
    if isinstance(key, RSAPublicKey) and key.key_size < MIN_RSA_KEY_BITS:
        return None
    return key


def retry_delay(failures: int, draw: Callable[[], float] = random.random) -> float:
    """The wait after ``failures`` (1 or more) failed loads in a row: 1 s doubling to 15 s, jittered."""
    step = min(JWKS_RETRY_FIRST_SECONDS * 2.0 ** min(max(failures, 1) - 1, 16), JWKS_RETRY_MAX_SECONDS)
    return step / 2 + draw() * step / 2


class JwksSource:
    """The provider's signing keys: fetched with aiohttp, cached, refreshed with a cooldown.

    - Until keys are loaded once, one background task fetches them, retrying with
      ``retry_delay`` whether or not requests arrive. A request meanwhile waits for a
      fetch in flight (at most ``jwks_timeout_seconds``) and is otherwise refused at once
      with IdentityProviderUnavailable; requests never start these fetches.
    - Keys are reused for ``jwks_cache_seconds``; after that the next request starts a
      refresh in the background and is verified with the keys at hand meanwhile.
    - A kid the cache does not know triggers a refresh, but fetches start at most once
      per ``jwks_cooldown_seconds`` and concurrent callers share one in-flight fetch;
      only the request with that kid waits for it.
    - When a refresh fails, the last good keys stay in use (the provider may be briefly down).
    - Discovery and JWKS fetch together are bounded by ``jwks_timeout_seconds``.
    - Logging: one warning when fetching starts to fail (not one per attempt or request),
      one info line when keys load.
    """

    def __init__(
        self, settings: JwtSettings, *, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self._settings = settings
        self._monotonic = monotonic
        self._jwks_url = settings.jwks_url
        self._keys: KeySet | None = None
        self._fetched_at = 0.0
        self._last_attempt: float | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self._loader: asyncio.Task[None] | None = None
        self._loaded = asyncio.Event()
        self._failures = 0  # fetches failed in a row
        self._session: aiohttp.ClientSession | None = None
        self._retired = False  # no fetch starts any more

    @property
    def loaded(self) -> bool:
        """True once signing keys have been loaded (they stay loaded: a failed refresh keeps them)."""
        return self._keys is not None

    async def wait_loaded(self) -> None:
        await self._loaded.wait()

    def start(self) -> asyncio.Task[None] | None:
        """Load the keys in the background, retrying until they load; returns the fetch in flight."""
        if self._keys is not None:
            return None
        if self._loader is None and not self._retired:
            first = self._refresh_task or self._begin_fetch()
            self._loader = asyncio.create_task(self._load(first), name="sidecar-jwks-load")
        return self._refresh_task

    async def _load(self, task: asyncio.Task[None]) -> None:
        failures = 0
        while True:
            await asyncio.wait((task,))
            if self._keys is not None:
                return
            failures += 1
            await asyncio.sleep(retry_delay(failures))
            if self._keys is not None:
                return
            task = self._refresh_task or self._begin_fetch()

    async def key_for(self, kid: str | None, alg: str) -> AllowedPublicKeys:
        """The key that verifies a token with this ``kid`` and ``alg``.

        Raises InvalidToken, or IdentityProviderUnavailable while no keys are loaded.
        """
        keys = self._keys
        if keys is None:
            keys = await self._first_keys()
        entry = keys.find(kid, alg)
        if entry is None:
            await self.refresh()
            entry = self._keys.find(kid, alg) if self._keys is not None else None
        elif self._monotonic() - self._fetched_at >= self._settings.jwks_cache_seconds:
            # Known key, expired cache: refresh in the background and verify now, so a slow
            # provider delays no request; a key the provider dropped goes with that refresh.
            await self.refresh(wait=False)
        if entry is None:
            raise _refuse("unknown_kid")
        key = entry.keys.get(alg)
        if key is None:
            raise _refuse("key_mismatch")
        return key

    async def _first_keys(self) -> KeySet:
        """No keys yet: wait for the fetch in flight, if any (bounded by its timeout), else refuse now."""
        task = self.start()
        if task is not None:
            await asyncio.wait((task,))
        if self._keys is None:
            raise IdentityProviderUnavailable(_MESSAGES["jwks_unavailable"], reason="jwks_unavailable")
        return self._keys

    async def refresh(self, *, wait: bool = True) -> None:
        """Fetch the keys unless a fetch ran within the cooldown; join a fetch in flight."""
        task = self._refresh_task
        if task is None:
            if self._retired:
                return
            now = self._monotonic()
            if self._last_attempt is not None and now - self._last_attempt < self._settings.jwks_cooldown_seconds:
                JWKS_REFRESHES.labels(result="cooldown").inc()
                return
            task = self._begin_fetch()
        if wait:
            # asyncio.wait, unlike awaiting the task, leaves the shared fetch running when
            # this one caller is cancelled.
            await asyncio.wait((task,))

    def _begin_fetch(self) -> asyncio.Task[None]:
        self._last_attempt = self._monotonic()
        task = asyncio.create_task(self._fetch_keys(), name="sidecar-jwks-refresh")
        self._refresh_task = task
        task.add_done_callback(self._refresh_finished)
        return task

    def _refresh_finished(self, task: asyncio.Task[None]) -> None:
        if self._refresh_task is task:
            self._refresh_task = None

    async def _fetch_keys(self) -> None:
        try:
            async with asyncio.timeout(self._settings.jwks_timeout_seconds):
                url = self._jwks_url or await self._discover()
                document = await self._get_json(url)
            keys = parse_jwks(document, self._settings.algorithms)
            if not keys.entries:
                raise _FetchError("the JWKS has no key usable with the allowed algorithms")
        except _FetchError as exc:
            self._failed(str(exc))
            return
        except TimeoutError:
            self._failed(f"no answer within {self._settings.jwks_timeout_seconds:g}s")
            return
        except aiohttp.ClientConnectorCertificateError as failure:
            self._failed(self._untrusted(failure.host))
            return
        except (aiohttp.ClientError, OSError) as failure:
            # The class name only: library messages are not ours to put in a log line.
            self._failed(f"request failed ({type(failure).__name__})")
            return
        except Exception as bug:  # a background task must not die with an unretrieved error
            self._failed(f"unexpected {type(bug).__name__}")
            return
        JWKS_REFRESHES.labels(result="ok").inc()
        previous = self._keys.kids if self._keys is not None else None
        failures, self._failures = self._failures, 0
        self._keys = keys
        self._fetched_at = self._monotonic()
        self._loaded.set()
        if previous != keys.kids or failures:
            after = f" after {failures} failed {'fetch' if failures == 1 else 'fetches'}" if failures else ""
            log.info("loaded %d signing keys from %s%s", len(keys.entries), loggable_url(url), after)

    def _untrusted(self, host: str) -> str:
        """What to do when the provider's TLS certificate is not trusted."""
        where = self._settings.config_path
        ca_file = self._settings.ca_file
        if ca_file is None:
            return (
                f"the TLS certificate of {host} is not trusted; for a provider on a private CA set"
                f" {where}.ca_file to that CA's PEM bundle"
            )
        return f"the TLS certificate of {host} is trusted neither by {where}.ca_file ({ca_file}) nor the system CAs"

    def _failed(self, problem: str) -> None:
        JWKS_REFRESHES.labels(result="error").inc()
        self._failures += 1
        if self._failures > 1:
            # Warned at the first failure; the retries say no more until keys load.
            log.debug("signing keys still not loaded (%d failed fetches in a row): %s", self._failures, problem)
            return
        if self._keys is not None:
            kept = "keeping the previously loaded keys"
        else:
            kept = (
                "no keys are loaded, so tokens get 503 identity_provider_unavailable and /readyz is 503;"
                " retrying in the background"
            )
        log.warning(
            "could not load the signing keys of %s: %s; %s", loggable_url(self._settings.issuer or ""), problem, kept
        )

    async def _discover(self) -> str:
        issuer = self._settings.issuer
        where = self._settings.config_path
        assert issuer is not None  # the config requires an issuer
        url = issuer.rstrip("/") + DISCOVERY_PATH
        document = await self._get_json(url, hint=f"check {where}.issuer, or set {where}.jwks_url")
        if not isinstance(document, dict):
            raise _FetchError(f"the discovery document at {loggable_url(url)} is not a JSON object")
        # OpenID Connect Discovery 1.0 section 4.3: the document must name the issuer it
        # was fetched for, or its keys are not that issuer's.
        named = document.get("issuer")
        if named != issuer:
            if isinstance(named, str) and len(named) <= 512 and not isinstance(split_http_url(named), str):
                raise _FetchError(
                    f"the discovery document names the issuer {loggable_url(named)!r}, not {where}.issuer"
                    f" {issuer!r}; if that is the provider meant, set {where}.issuer to exactly what it names"
                    " (tokens carry it in iss)"
                )
            raise _FetchError(f"the discovery document names no issuer, or not {where}.issuer")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or urlsplit(jwks_uri).scheme not in ("http", "https"):
            raise _FetchError(f"the discovery document has no http(s) jwks_uri; set {where}.jwks_url")
        if downgrades(issuer, jwks_uri) and not self._settings.allow_http_jwks:
            # Keys fetched in the clear could be anyone's: whoever is on the path would mint identities.
            raise _FetchError(
                "the discovery document names a plain-http jwks_uri for an https issuer"
                f" (set {where}.allow_http_jwks: true only for a local emulator)"
            )
        self._jwks_url = jwks_uri
        return jwks_uri

    async def _get_json(self, url: str, *, hint: str = "") -> object:
        if self._session is None:
            # trust_env stays off: HTTP_PROXY in this pod may well point at the sidecar itself.
            # The issuer's ca_file is trusted here only, beside the system CAs.
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
                connector=aiohttp.TCPConnector(ssl=trust_context(self._settings.ca_file)),
            )
        async with self._session.get(url) as response:
            # Every hop: a plain-http hop that redirects on to https would otherwise pass.
            if not self._settings.allow_http_jwks and any(
                downgrades(url, str(hop.url)) for hop in (*response.history, response)
            ):
                raise _FetchError(f"{loggable_url(url)} redirected to plain http")
            if response.status != 200:
                raise _FetchError(
                    f"{loggable_url(url)} answered HTTP {response.status}" + (f" ({hint})" if hint else "")
                )
            body = bytearray()
            async for chunk in response.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise _FetchError(f"{loggable_url(url)} returned more than {MAX_DOCUMENT_BYTES} bytes")
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise _FetchError(f"{loggable_url(url)} did not return JSON") from None

    def retire(self) -> None:
        """Start no fetch any more (a newer runtime took over); a fetch in flight may finish."""
        self._retired = True
        if self._loader is not None:
            self._loader.cancel()

    async def close(self) -> None:
        """Stop the background retries and a fetch in flight, close the HTTP session; no fetch starts afterwards."""
        self.retire()
        for task in (self._loader, self._refresh_task):
            if task is not None:
                task.cancel()
                await asyncio.wait((task,))
        if self._session is not None:
            await self._session.close()
            self._session = None


# --------------------------------------------------------------------------- cache


@dataclass(frozen=True, slots=True)
class _Verified:
    identity: Identity
    expires_at: float  # the token's exp


class VerifiedTokenCache:
    """Identities of verified tokens by SHA-256 of the token, LRU-bounded, dropped at exp."""

    def __init__(self, max_entries: int) -> None:
        self._max_entries = max_entries
        self._entries: OrderedDict[bytes, _Verified] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: bytes, now: float) -> Identity | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if now >= entry.expires_at:
            del self._entries[digest]
            return None
        self._entries.move_to_end(digest)
        return entry.identity

    def put(self, digest: bytes, identity: Identity, expires_at: float, now: float) -> None:
        if self._max_entries <= 0 or now >= expires_at:
            return
        self._entries[digest] = _Verified(identity, expires_at)
        self._entries.move_to_end(digest)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


# --------------------------------------------------------------------------- resolver


class _Issuer:
    """One ``identity.jwt`` entry: its signing keys and the rules its tokens' claims must meet.

    ``iss`` must equal ``issuer`` exactly (a trailing slash counts); the config refuses an
    entry without an issuer, so this check always runs.

    With ``audience`` configured, ``aud`` must name one of its values; a Cognito access
    token has no ``aud``, so for ``token_use: access`` its ``client_id`` is compared instead.
    """

    __slots__ = ("algorithms", "audience", "keys", "settings")

    def __init__(self, settings: JwtSettings, monotonic: Callable[[], float]) -> None:
        if settings.issuer is None:
            raise ValueError(f"{settings.config_path}.issuer is required")
        self.settings = settings
        # Config already refuses none/HS*; intersecting again keeps that true for any caller.
        self.algorithms = frozenset(settings.algorithms) & ASYMMETRIC_ALGORITHMS
        self.audience = frozenset(settings.audience)
        self.keys = JwksSource(settings, monotonic=monotonic)

    def check_claims(self, claims: dict[str, Any], now: float, token: Secret | None = None) -> tuple[Identity, float]:
        s = self.settings
        exp = claims.get("exp")
        if exp is None:
            raise _refuse("no_expiry")
        exp = _numeric_date(exp)
        if now >= exp + s.leeway_seconds:
            raise _refuse("expired")
        nbf = claims.get("nbf")
        if nbf is not None and _numeric_date(nbf) > now + s.leeway_seconds:
            raise _refuse("not_yet_valid")
        iat = claims.get("iat")
        if iat is not None and _numeric_date(iat) > now + s.leeway_seconds:
            raise _refuse("not_yet_valid")  # issued in the future
        if claims.get("iss") != s.issuer:
            raise _refuse("wrong_issuer")
        if s.require_token_use is not None and claims.get("token_use") != s.require_token_use:
            raise _refuse("wrong_token_use")
        if self.audience and not self.audience & _audiences(claims):
            raise _refuse("wrong_audience")
        for name, expected in s.required_claims:
            if not _same_json_value(claims.get(name), expected):
                log.debug("identity token refused: required claim %r does not match", name[:64])
                raise _refuse("missing_required_claim")
        client_id = self._client_id(claims)
        identity = Identity(validate_client_id(client_id), "jwt", claim_strings(claims, *SCOPE_CLAIMS), token)
        return identity, exp

    def _client_id(self, claims: Mapping[str, Any]) -> str:
        """The first configured claim holding a non-empty string that may name the caller.

        ``email`` counts only when the same token says ``email_verified: true`` (the JSON
        boolean): in Cognito and many other providers a user can set their own e-mail
        address to anybody's, and it is unverified until they prove they own it.
        """
        skipped_email = False
        for name in self.settings.client_id_claims:
            value = claims.get(name)
            if not isinstance(value, str) or not value:
                continue
            if name == "email" and claims.get("email_verified") is not True:
                skipped_email = True
                continue
            return value
        raise _refuse("email_not_verified" if skipped_email else "no_client_id_claim")


class JwtIdentity:
    """Take the client ID from a JWT whose signature and claims the sidecar verifies.

    With several ``identity.jwt`` entries (agents in one user pool, people in another), a
    token's unverified ``iss`` picks the one entry whose ``issuer`` equals it; only that
    entry's keys can verify the token and only its rules apply. A token naming no listed
    issuer is refused before any key is looked up.
    """

    def __init__(
        self,
        settings: IdentitySettings,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not settings.jwt:
            raise ValueError("JwtIdentity needs identity.jwt settings")
        first = settings.jwt[0]
        self._issuers = {entry.issuer: _Issuer(entry, monotonic) for entry in settings.jwt}
        self._header = first.header
        self._bearer = first.header.lower() == "authorization"
        self._clock = clock
        # One cache for every issuer, keyed by the token's digest: the issuer is not known
        # before the token is decoded. An entry with cache_max_entries 0 caches none of its tokens.
        self._cache = VerifiedTokenCache(sum(entry.cache_max_entries for entry in settings.jwt))
        # A forwarded client ID header is stripped too: in JWT mode only the token speaks.
        self.strip_headers = frozenset({first.header.lower(), settings.header.lower()})
        self._client_header = settings.header
        self._proxy_auth_is_token = first.header.lower() == PROXY_AUTHORIZATION.lower()

    @property
    def ready(self) -> bool:
        """True once every issuer's signing keys are loaded."""
        return all(issuer.keys.loaded for issuer in self._issuers.values())

    async def wait_ready(self) -> None:
        for issuer in self._issuers.values():
            await issuer.keys.wait_loaded()

    async def start(self, *, wait: bool = True) -> None:
        """Load every issuer's signing keys in the background, retried until they load; never raises.

        With ``wait``, return once each first attempt is over (at most ``jwks_timeout_seconds``).
        """
        tasks = [task for issuer in self._issuers.values() if (task := issuer.keys.start()) is not None]
        if wait and tasks:
            await asyncio.wait(tasks)

    def retire(self) -> None:
        for issuer in self._issuers.values():
            issuer.keys.retire()

    async def close(self) -> None:
        for issuer in self._issuers.values():
            await issuer.keys.close()

    def proxy_client_id(self, headers: HeaderReader, *, connect: bool) -> str | None:
        """Always None: a client ID given to the proxy (a Basic user name, the identity header on a
        CONNECT) is not verified, so it is refused rather than ignored.

        A token in Proxy-Authorization, when that is ``identity.jwt.header``, is read per request as
        usual; on a CONNECT it would cover no request inside the tunnel, so it is refused there too.
        """
        named = connect and bool(single_header(headers, self._client_header))
        proxy_auth = (connect or not self._proxy_auth_is_token) and PROXY_AUTHORIZATION in headers
        if named or proxy_auth:
            raise self._unverified()
        return None

    def _unverified(self) -> BadRequest:
        return BadRequest(
            f"A client ID given to the proxy (a Proxy-Authorization user name, or {self._client_header} on "
            f"the CONNECT) is not a verified identity: send the token in {self._header} on each request.",
            reason="unverified_proxy_identity",
        )

    async def resolve(self, headers: HeaderReader, proxy_client_id: str | None = None) -> Identity:
        """The verified caller, from the cache or a full verification.

        Raises InvalidToken, or IdentityProviderUnavailable while the token's issuer has no
        signing keys loaded.
        """
        if proxy_client_id is not None:
            raise self._unverified()  # proxy_client_id above refuses first; never taken on trust
        token = self._read_token(headers)
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(digest, self._clock())
        if cached is not None:
            bump(_TOKEN_HIT)
            return cached
        bump(_TOKEN_MISS)
        try:
            identity, expires_at, issuer = await self._verify(token)
        except InvalidToken as exc:
            log.debug("identity token refused: %s", exc.reason)
            raise
        if issuer.settings.cache_max_entries > 0:
            self._cache.put(digest, identity, expires_at, self._clock())
        return identity

    def _read_token(self, headers: HeaderReader) -> str:
        value = single_header(headers, self._header)
        value = (value or "").strip()
        if not value:
            raise _refuse("missing")
        scheme, _, rest = value.partition(" ")
        if scheme.lower() == "bearer":
            value = rest.strip()
        elif self._bearer:
            raise _refuse("not_bearer")
        if not value:
            raise _refuse("missing")
        # Before anything hashes it: aiohttp hands undecodable bytes over as surrogates,
        # which .encode() refuses (a 500 per hostile request otherwise).
        if len(value) > MAX_TOKEN_LENGTH:
            raise _refuse("oversized")
        if not value.isascii():
            raise _refuse("malformed")
        return value

    async def _verify(self, token: str) -> tuple[Identity, float, _Issuer]:
        if _COMPACT_JWS.fullmatch(token) is None:
            raise _refuse("malformed")
        head, payload, _ = token.split(".")
        header = _decode_part(head)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ASYMMETRIC_ALGORITHMS:
            raise _refuse("alg_not_allowed")
        if "crit" in header:
            raise _refuse("unsupported_crit")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or not kid or len(kid) > MAX_KID_LENGTH):
            raise _refuse("malformed")
        # Read once. Before the signature is checked, only iss is used: to pick whose keys may
        # verify the token. The signature covers exactly this payload segment, so once it
        # verifies these are the verified claims, checked by that issuer's rules (iss again too).
        claims = _decode_part(payload)
        issuer = self._issuers.get(_text_or_none(claims.get("iss")))
        if issuer is None:
            raise _refuse("wrong_issuer")
        if alg not in issuer.algorithms:
            raise _refuse("alg_not_allowed")
        key = await issuer.keys.key_for(kid, alg)
        try:
            _JWS.decode_complete(token, key=key, algorithms=[alg])
        except jwt.InvalidSignatureError:
            raise _refuse("bad_signature") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise _refuse("malformed") from None
        identity, expires_at = issuer.check_claims(claims, self._clock(), Secret(token))
        return identity, expires_at, issuer


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _same_json_value(actual: object, expected: ClaimValue) -> bool:
    """Equal value and JSON type: true is not 1, "1" is not 1."""
    return type(actual) is type(expected) and actual == expected


def _decode_part(part: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except ValueError:
        raise _refuse("malformed") from None
    return _load_object(raw)


def _load_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise _refuse("malformed") from None
    if not isinstance(value, dict):
        raise _refuse("malformed")
    return value


def _numeric_date(value: object) -> float:
    # RFC 7519 NumericDate: a finite JSON number. A bool is an int in Python and is
    # refused; NaN would make every comparison false and the token never expire.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _refuse("malformed")
    try:
        number = float(value)
    except OverflowError:
        raise _refuse("malformed") from None
    if not math.isfinite(number):
        raise _refuse("malformed")
    return number


def _audiences(claims: Mapping[str, Any]) -> frozenset[str]:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return frozenset({aud})
    if isinstance(aud, list):
        return frozenset(a for a in aud if isinstance(a, str))
    if aud is None and claims.get("token_use") == "access" and isinstance(claims.get("client_id"), str):
        # Cognito access tokens carry the app client in client_id and no aud.
        return frozenset({claims["client_id"]})
    return frozenset()
