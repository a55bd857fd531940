"""OAuth credential providers: the value injected is an access token from the upstream's ``token_url``.

Three types (``upstreams.*.credential.type``, see docs/credentials.md):

- ``oauth2_client_credentials``: the store holds this client's own OAuth client
  (``{"client_id": ..., "client_secret": ...}``); tokens come from
  ``grant_type=client_credentials``.
- ``oauth2_refresh_token``: the store holds this user's grant (``{"refresh_token": ...}``)
  to the upstream's OAuth app (``credential.client_id``/secret). A rotated refresh token is
  written back to the store, check-and-set on the version read, before the access token
  is used; when another replica wrote first, the newer grant is read and used. When the
  store fails, the rotated grant is written again in the background until it lands, and
  once more when the provider is closed. No grant, or ``invalid_grant``:
  ``consent_required`` (with ``authorize_url`` when configured).
- ``token_exchange``: the caller's verified JWT (``Identity.token``) is exchanged
  (RFC 8693) for a token with the upstream's ``audience``; nothing is stored.

What the three share (``_TokenProvider``): access tokens are kept per client (per subject
for an exchange) until ``expires_in`` minus EXPIRY_MARGIN seconds (DEFAULT_LIFETIME when the
endpoint gives none). A warm request is a dict look-up and a clock read. Past that time
and before the token's real expiry it is still served while one background request gets
the next one; concurrent requests with nothing usable share one token request. An
upstream 401 drops the token and the request is replayed once with a new one. A token
endpoint that is down, failing or slow is ``token_endpoint_unavailable`` unless a token
that has not expired is cached; one that says no is ``credential_refused``.

``token_url`` is operator configuration: the egress address guard does not apply to it.
It is reached with the upstream's ``ca_file`` and within its ``timeout_seconds``.

Tokens, refresh tokens and client secrets are ``Secret``s: nothing here logs, counts or
raises one. The token endpoint's answers are never quoted (an error's ``error`` code is
read, and reduced to a bounded word, and that is all).

Not compiled: per request, only the warm look-up runs here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hashlib
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp

from sidecar import metrics
from sidecar.config import CredentialSettings, UpstreamSettings
from sidecar.errors import (
    ConsentRequired,
    CredentialRefused,
    NoCredential,
    SecretStoreUnavailable,
    SidecarError,
    TokenEndpointUnavailable,
)
from sidecar.identity.base import Identity
from sidecar.net import trust_context
from sidecar.secrets.base import (
    RawSecret,
    Secret,
    SecretNotFound,
    StoreError,
    StoreVersion,
    WriteConflict,
    Written,
    version_of,
)
from sidecar.secrets.cache import SecretCache

log = logging.getLogger("sidecar.credentials.oauth")

TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105 (a name)
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105 (a name)
#: a token is renewed this long before the ``expires_in`` its endpoint gave
EXPIRY_MARGIN = 30.0
#: how long a token is used when the endpoint gave no ``expires_in``
DEFAULT_LIFETIME = 60.0
#: after a failed token request, no other starts for this long while a valid token is served
RETRY_SECONDS = 5.0
#: a token got because the upstream refused the previous one, refused again within this
#: long, does not make another token request (an upstream that 401s everything)
REJECTED_BACKOFF_SECONDS = 30.0
#: after an ``invalid_grant``, the store is read again this many times, this far apart,
#: for a grant another replica may be about to write back
GRANT_REREADS = 3
GRANT_REREAD_SECONDS = 0.2
#: a rotated grant the store did not take is written again this long after the failure,
#: then twice as long after each failed try, up to WRITE_RETRY_MAX_SECONDS apart
WRITE_RETRY_FIRST_SECONDS = 1.0
WRITE_RETRY_MAX_SECONDS = 30.0
#: the largest token endpoint answer read
MAX_ANSWER_BYTES = 256 * 1024

#: error codes the contract maps to credential_refused (token exchange adds two); anything
#: else an endpoint says is reported as "other" (a bounded word for logs and metrics)
REFUSALS = frozenset({"invalid_client", "unauthorized_client", "invalid_scope", "access_denied"})
EXCHANGE_REFUSALS = REFUSALS | {"invalid_request", "invalid_grant", "invalid_target"}
#: GitHub's spellings of the standard codes (it answers errors with 200 and these)
_ALIASES = {
    "bad_refresh_token": "invalid_grant",
    "bad_verification_code": "invalid_grant",
    "incorrect_client_credentials": "invalid_client",
    "unverified_user_email": "access_denied",
}
#: error codes that say the endpoint is down, not that it refuses (RFC 6749 4.1.2.1; Keycloak,
#: Entra and Okta answer them during outages, often with 400): token_endpoint_unavailable
TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error"})
_KNOWN_ERRORS = EXCHANGE_REFUSALS | TRANSIENT_ERRORS | {"unsupported_grant_type"}


class TokenRefused(Exception):
    """The token endpoint said no; ``error`` is its (standard) code, or ``other``."""

    def __init__(self, error: str) -> None:
        self.error = error
        super().__init__(f"token endpoint refused: {error}")


class TokenUnavailable(Exception):
    """The token endpoint could not be reached, failed, or was too slow; ``kind`` says which."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        super().__init__(f"token endpoint unavailable: {kind}")


@dataclass(frozen=True, slots=True)
class TokenAnswer:
    access_token: Secret
    expires_in: float | None
    refresh_token: Secret | None = None


def _error_code(raw: object) -> str:
    code = _ALIASES.get(str(raw), str(raw)) if isinstance(raw, str) else "other"
    return code if code in _KNOWN_ERRORS else "other"


class TokenClient:
    """Token requests to one ``token_url``: form-encoded POSTs, client authentication, the answer read.

    One aiohttp session, opened on first use; ``close`` ends it. Every request ends within
    ``timeout`` seconds. Counts ``sidecar_token_requests_total{upstream,grant,result}``.
    """

    def __init__(
        self,
        upstream: str,
        credential: CredentialSettings,
        *,
        ca_file: Any = None,
        timeout: float = 30.0,
    ) -> None:
        if credential.token_url is None:
            raise ValueError("an OAuth credential needs token_url")
        self.upstream = upstream
        self.url = credential.token_url
        self.auth_method = credential.auth_method
        self.scopes = " ".join(credential.scopes)
        self.timeout = timeout
        self._ssl: ssl.SSLContext | None = trust_context(ca_file) if self.url.startswith("https:") else None
        self._session: aiohttp.ClientSession | None = None

    async def request(
        self, grant: str, form: dict[str, str], client_id: str | None, client_secret: Secret | None
    ) -> TokenAnswer:
        """POST ``form`` (plus grant_type and scope) as ``client_id``; the answer, or TokenRefused/TokenUnavailable."""
        label = "token_exchange" if grant == TOKEN_EXCHANGE_GRANT else grant
        try:
            answer = await self._request(grant, form, client_id, client_secret)
        except TokenRefused:
            metrics.TOKEN_REQUESTS.labels(self.upstream, label, "refused").inc()
            raise
        except TokenUnavailable as exc:
            metrics.TOKEN_REQUESTS.labels(self.upstream, label, "timeout" if exc.kind == "timeout" else "error").inc()
            raise
        metrics.TOKEN_REQUESTS.labels(self.upstream, label, "ok").inc()
        return answer

    async def _request(
        self, grant: str, form: dict[str, str], client_id: str | None, client_secret: Secret | None
    ) -> TokenAnswer:
        body = {"grant_type": grant, **form}
        if self.scopes and "scope" not in body:
            body["scope"] = self.scopes
        headers = {"Accept": "application/json", "Content-Type": "application/x-www-form-urlencoded"}
        if client_id is not None:
            if client_secret is None:
                body["client_id"] = client_id  # a public client: identified, not authenticated
            elif self.auth_method == "client_secret_post":
                body["client_id"] = client_id
                body["client_secret"] = client_secret.reveal()
            else:
                # RFC 6749 2.3.1: each part form-encoded before the Basic encoding.
                pair = quote(client_id, safe="") + ":" + quote(client_secret.reveal(), safe="")
                headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        data = urlencode(body)
        try:
            async with asyncio.timeout(self.timeout):
                session = self._open()
                async with session.post(self.url, data=data, headers=headers, allow_redirects=False) as resp:
                    status = resp.status
                    raw = await resp.content.read(MAX_ANSWER_BYTES + 1)
        except TimeoutError:
            raise TokenUnavailable("timeout") from None
        except aiohttp.ClientSSLError:
            raise TokenUnavailable("tls") from None
        except (aiohttp.ClientError, OSError):
            raise TokenUnavailable("connect") from None
        return self._read(status, raw)

    @staticmethod
    def _read(status: int, raw: bytes) -> TokenAnswer:
        """The answer classified, in this one place: a token, TokenUnavailable (try again later) or TokenRefused.

        Unavailable first, whatever the body says: a 5xx, 408 or 429, or an error code saying
        the endpoint is down (``temporarily_unavailable``, ``server_error``) with any status.
        Only then is an error a refusal: for a refresh token, a refusal can end in
        ``consent_required``, and an outage must never ask the user to consent again.
        """
        doc = _json_object(raw) if len(raw) <= MAX_ANSWER_BYTES else None
        if status >= 500 or status in (408, 429):
            raise TokenUnavailable("status_5xx" if status >= 500 else "throttled")
        if doc is not None and "error" in doc:
            # RFC 6749 5.2 (400, or 401 for client authentication); GitHub answers 200 with an error.
            code = _error_code(doc["error"])
            if code in TRANSIENT_ERRORS:
                raise TokenUnavailable(code)
            raise TokenRefused(code)
        if status == 401:
            raise TokenRefused("invalid_client")
        if status != 200 or doc is None:
            raise TokenUnavailable("bad_answer")
        access = doc.get("access_token")
        if not isinstance(access, str) or not access or not access.isascii() or not access.isprintable():
            raise TokenUnavailable("bad_answer")
        expires = doc.get("expires_in")
        if isinstance(expires, str) and expires.isdigit():
            expires = int(expires)  # some providers send it as a string
        lifetime = float(expires) if isinstance(expires, int | float) and not isinstance(expires, bool) else None
        if lifetime is not None and not 0 < lifetime < 10**9:
            lifetime = None
        refresh = doc.get("refresh_token")
        rotated = Secret(refresh) if isinstance(refresh, str) and refresh and refresh.isprintable() else None
        return TokenAnswer(Secret(access), lifetime, rotated)

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True, limit=16)
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _json_object(raw: bytes) -> dict[str, Any] | None:
    """The answer as a JSON object, or None; the parser's error (which quotes the text) is dropped."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _fields(raw: RawSecret) -> Mapping[str, Any] | None:
    """A stored secret as an object (a mapping, or a string holding a JSON object), or None."""
    if isinstance(raw, Mapping):
        return raw
    value = _json_object(raw.encode()) if raw.lstrip().startswith("{") else None
    return value


def _text(fields: Mapping[str, Any], name: str) -> str | None:
    value = fields.get(name)
    if isinstance(value, str) and value and value.isascii() and value.isprintable():
        return value
    return None


@dataclass(slots=True)
class _Token:
    value: Secret
    fresh_until: float  # used as it is until then
    valid_until: float  # still served past fresh_until (while a new one is got) until then
    retry_after: float  # no background request starts before this
    from_rejection: bool  # got because the upstream refused the token before it
    obtained: float


def _bounded_put(table: dict[str, Any], key: str, value: Any, limit: int) -> None:
    """``table[key] = value``, first dropping the oldest entries past ``limit`` (secrets.cache.max_entries).

    Any app may name any client ID in header mode; without a bound, one cycling through
    IDs would grow these tables (tokens, "nothing stored") without end. The oldest entry
    goes first: at worst a client it held makes one more token request or store read.
    """
    table.pop(key, None)
    while len(table) >= limit:
        del table[next(iter(table))]
    table[key] = value


def _drop_outcome(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


class _TokenProvider:
    """What every OAuth type shares: the per-client token cache, single flight, expiry and replay."""

    kind = ""
    grant = ""

    def __init__(
        self,
        settings: UpstreamSettings,
        cache: SecretCache,
        *,
        client: TokenClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self.credential = settings.credential
        self.cache = cache
        self.client = client or TokenClient(
            settings.name, settings.credential, ca_file=settings.ca_file, timeout=settings.timeout_seconds
        )
        self._clock = clock
        self._tokens: dict[str, _Token] = {}
        self._inflight: dict[str, asyncio.Task[_Token]] = {}
        self._refreshing: set[asyncio.Task[_Token]] = set()
        #: per key: until when "nothing stored" is remembered (negative_ttl_seconds)
        self._missing: dict[str, tuple[float, SidecarError]] = {}
        self._retired = False
        self._closed = False

    # ---- the seam

    def get(self, identity: Identity) -> Awaitable[tuple[Secret, str]]:
        """The access token for this caller and the cache word (hit, stale, miss)."""
        return self._get(identity)

    async def _get(self, identity: Identity) -> tuple[Secret, str]:
        key = self.key(identity)
        token = self._tokens.get(key)
        if token is not None:
            now = self._clock()
            if now < token.fresh_until:
                return token.value, "hit"
            if now < token.valid_until:
                # Near its end: served as it is; the next one is got behind this request.
                if now >= token.retry_after and key not in self._inflight and not self._retired:
                    task = self._start(identity, key, from_rejection=False)
                    self._refreshing.add(task)
                    task.add_done_callback(self._refreshing.discard)
                return token.value, "stale"
        token = await self._load(identity, key, from_rejection=False)
        return token.value, "miss"

    async def rejected(self, identity: Identity, value: Secret, status: int) -> Secret | None:
        """The upstream refused ``value``: on a 401 drop it and get a new token; None when there is no other.

        A 403 is about permissions, which another token of the same grant would not change: None.
        """
        if status != 401:
            return None
        key = self.key(identity)
        token = self._tokens.get(key)
        now = self._clock()
        if token is not None and not token.value == value:
            return token.value  # another request got a new one already
        if token is not None and token.from_rejection and now - token.obtained < REJECTED_BACKOFF_SECONDS:
            return None  # the new token was refused too: the upstream, not the token, is the problem
        self._tokens.pop(key, None)
        try:
            fresh = await self._load(identity, key, from_rejection=True)
        except SidecarError:
            return None
        return None if fresh.value == value else fresh.value

    async def prefetch(self, client_id: str) -> None:
        """Get this client's token before /readyz is 200 (client credentials); failures are only logged."""
        return None

    def retire(self) -> None:
        """A reload replaced this provider: start no more background token requests.

        One under way is left to finish (into the token table the new provider shares):
        cancelled, a refresh-token rotation could lose the grant between the token
        endpoint's answer and the write-back.
        """
        self._retired = True

    async def close(self) -> None:
        """Let token requests in flight finish, then close the client.

        A refresh answered with a rotated grant has already revoked the old one at the
        provider: cut before its write-back, the user's only grant would be lost. Each
        request is bounded (the upstream's ``timeout_seconds``, then the store's
        ``lookup_timeout_seconds`` for the write), so this wait is too; what is left after
        it is cancelled.
        """
        self._closed = True
        pending = set(self._inflight.values())
        if pending:
            bound = self.settings.timeout_seconds + self.cache.lookup_timeout + 1.0
            _, late = await asyncio.wait(pending, timeout=bound)
            for task in late:
                task.cancel()
        await self.client.close()

    def adopt(self, previous: object) -> None:
        """Keep the tokens a provider of the previous config got, when they came from the same place.

        A reload (SIGHUP) builds every provider anew (``credentials.factory``); one that
        changes nothing about where tokens come from must not make every client get a new
        one. With the same secret store, what was read from it is kept too: the "nothing
        stored" answers, and per type the last good read (a rotated grant not yet written
        back exists only there). The tables are shared, not copied: a token request the
        replaced provider still has in flight lands where this one looks.
        """
        if not (isinstance(previous, _TokenProvider) and type(previous) is type(self) and previous.same_source(self)):
            return
        self._tokens = previous._tokens
        if previous.cache is self.cache:
            self._missing = previous._missing
            self.keep_store_reads(previous)

    def keep_store_reads(self, previous: _TokenProvider) -> None:
        """Per type: take over what ``previous`` (of this type, over the same store) read from the store."""

    def same_source(self, other: _TokenProvider) -> bool:
        a, b = self.credential, other.credential
        return (
            (a.type, a.token_url, a.client_id, a.client_secret, a.client_secret_file, a.scopes, a.audience)
            == (b.type, b.token_url, b.client_id, b.client_secret, b.client_secret_file, b.scopes, b.audience)
            and self.settings.secret == other.settings.secret
        )

    # ---- per type

    def key(self, identity: Identity) -> str:
        return identity.client_id

    async def obtain(self, identity: Identity, key: str) -> TokenAnswer:
        """One token request for this caller (store reads and write-backs included)."""
        raise NotImplementedError

    # ---- machinery

    def secret_id(self, client_id: str) -> str:
        return self.settings.secret.format(client_id=client_id, upstream=self.name)

    async def _load(self, identity: Identity, key: str, *, from_rejection: bool) -> _Token:
        """One token request per key at a time; every caller awaits the same task."""
        missing = self._missing.get(key)
        if missing is not None:
            if self._clock() < missing[0]:
                raise copy.copy(missing[1]).with_traceback(None)
            del self._missing[key]
        task = self._inflight.get(key)
        if task is None:
            task = self._start(identity, key, from_rejection=from_rejection)
        return await asyncio.shield(task)

    def _start(self, identity: Identity, key: str, *, from_rejection: bool) -> asyncio.Task[_Token]:
        task = asyncio.get_running_loop().create_task(self._fetch(identity, key, from_rejection))
        self._inflight[key] = task
        task.add_done_callback(lambda done: self._fetch_done(key, done))
        return task

    def _fetch_done(self, key: str, task: asyncio.Task[_Token]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        _drop_outcome(task)

    async def _fetch(self, identity: Identity, key: str, from_rejection: bool) -> _Token:
        try:
            answer = await self.obtain(identity, key)
        except TokenUnavailable as exc:
            return self._unavailable(key, exc)
        except TokenRefused as exc:
            self._tokens.pop(key, None)
            log.warning(
                "token endpoint refused the credential",
                extra={
                    "upstream": self.name, "credential": self.kind, "client_id": identity.client_id,
                    "error": exc.error,
                },
            )
            raise self.refusal(exc) from None
        except (ConsentRequired, NoCredential) as err:
            self._tokens.pop(key, None)
            _bounded_put(
                self._missing, key, (self._clock() + self.cache.settings.negative_ttl_seconds, err),
                self.cache.settings.max_entries,
            )
            raise
        now = self._clock()
        lifetime = answer.expires_in
        if lifetime is None:
            fresh = valid = now + DEFAULT_LIFETIME
        else:
            fresh = now + max(lifetime - EXPIRY_MARGIN, lifetime / 2)
            valid = now + lifetime - 1.0
        token = _Token(answer.access_token, fresh, valid, fresh, from_rejection, now)
        _bounded_put(self._tokens, key, token, self.cache.settings.max_entries)
        return token

    def _unavailable(self, key: str, exc: TokenUnavailable) -> _Token:
        """A valid token still cached is served (a background retry later); else token_endpoint_unavailable."""
        now = self._clock()
        token = self._tokens.get(key)
        log.warning(
            "token endpoint unavailable",
            extra={"upstream": self.name, "credential": self.kind, "kind": exc.kind, "cached": token is not None},
        )
        if token is not None and now < token.valid_until:
            token.retry_after = now + RETRY_SECONDS
            return token
        raise TokenEndpointUnavailable(reason=exc.kind) from None

    def refusal(self, exc: TokenRefused) -> SidecarError:
        return CredentialRefused(reason=exc.error if exc.error in REFUSALS else "refused")

    async def read_store(self, secret_id: str) -> RawSecret:
        """The store's current value, within ``secrets.lookup_timeout_seconds``; never cached.

        Raises SecretNotFound, or StoreError (``timeout`` once the time is up), counted in
        ``sidecar_secret_store_errors_total`` here, as ``_store`` counts a failed write.
        """
        backend = self.cache.backend
        call = asyncio.get_running_loop().create_task(backend.fetch(secret_id))
        try:
            done, _ = await asyncio.wait((call,), timeout=self.cache.lookup_timeout)
        finally:
            if not call.done():
                call.cancel()
                call.add_done_callback(_drop_outcome)
        try:
            if not done:
                raise StoreError("timeout", "no answer within lookup_timeout_seconds")
            return call.result()
        except StoreError as exc:
            metrics.SECRET_STORE_ERRORS.labels(backend.name, exc.kind).inc()
            raise

    def store_failed(self, exc: StoreError) -> SecretStoreUnavailable:
        exc.__context__ = None  # counted where it was raised (read_store)
        log.error(
            "secret store failed reading an OAuth credential", extra={"upstream": self.name, "kind": exc.kind}
        )
        return SecretStoreUnavailable(reason=exc.kind)


@dataclass(slots=True)
class _Client:
    client_id: str
    secret: Secret


class ClientCredentials(_TokenProvider):
    """``oauth2_client_credentials``: each client's own OAuth client, from the store."""

    kind = "oauth2_client_credentials"
    grant = "client_credentials"

    def __init__(self, settings: UpstreamSettings, cache: SecretCache, **kwargs: Any) -> None:
        super().__init__(settings, cache, **kwargs)
        #: the last good read per client: used while the store fails
        self._clients: dict[str, _Client] = {}

    def keep_store_reads(self, previous: _TokenProvider) -> None:
        assert isinstance(previous, ClientCredentials)
        self._clients = previous._clients

    async def obtain(self, identity: Identity, key: str) -> TokenAnswer:
        client = await self._client(identity.client_id)
        return await self.client.request(self.grant, {}, client.client_id, client.secret)

    async def _client(self, caller: str) -> _Client:
        secret_id = self.secret_id(caller)
        try:
            raw = await self.read_store(secret_id)
        except SecretNotFound as missing:
            self._clients.pop(caller, None)
            raise NoCredential(reason=missing.reason) from None
        except StoreError as exc:
            last = self._clients.get(caller)
            if last is not None:
                return last  # a token request with what worked before beats a refusal
            raise self.store_failed(exc) from None
        fields = _fields(raw)
        client_id = _text(fields, "client_id") if fields is not None else None
        secret = _text(fields, "client_secret") if fields is not None else None
        if client_id is None or secret is None:
            raise NoCredential(
                "The stored secret is not an object with client_id and client_secret.", reason="secret_field_missing"
            )
        client = self._clients[caller] = _Client(client_id, Secret(secret))
        return client

    async def prefetch(self, client_id: str) -> None:
        try:
            await self.get(Identity(client_id, "prefetch"))
        except SidecarError as err:
            log.warning(
                "prefetch could not get an access token",
                extra={"upstream": self.name, "client_id": client_id, "error": err.code, "reason": err.reason},
            )


@dataclass(slots=True)
class _Grant:
    refresh_token: Secret
    version: StoreVersion | None
    #: the provider rotated it but the store did not take it yet: this is the only copy
    #: (written again in the background; a write that lands clears it, in place, so a
    #: refresh holding this grant writes its own rotation on the version now stored)
    unsaved: bool = False


@dataclass(slots=True)
class _WriteLock:
    lock: asyncio.Lock
    users: int = 0


class _WriteBacks:
    """The grant writes of one store: one at a time per secret id, and the retries of those that failed.

    Shared, like the grants, by the providers a reload chains over the same store
    (``adopt``). ``owner`` is the one whose ``close`` makes the last attempt and stops
    the retries: the provider that took over at a reload (``successor``, once the replaced
    one is retired), or the one that made it.
    """

    def __init__(self, owner: RefreshToken) -> None:
        self.owner = owner
        self.successor: RefreshToken | None = None
        self.locks: dict[str, _WriteLock] = {}
        #: per secret id: the task writing its unsaved grant again
        self.retries: dict[str, asyncio.Task[None]] = {}
        self.closed = False


class RefreshToken(_TokenProvider):
    """``oauth2_refresh_token``: each user's grant to the upstream's OAuth app, kept (and rotated) in the store."""

    kind = "oauth2_refresh_token"
    grant = "refresh_token"

    def __init__(self, settings: UpstreamSettings, cache: SecretCache, **kwargs: Any) -> None:
        super().__init__(settings, cache, **kwargs)
        self.app_id = settings.credential.client_id
        self.app_secret = app_secret(settings.credential)
        self._grants: dict[str, _Grant] = {}
        self._writebacks = _WriteBacks(self)

    def keep_store_reads(self, previous: _TokenProvider) -> None:
        assert isinstance(previous, RefreshToken)
        self._grants = previous._grants
        self._writebacks = previous._writebacks
        self._writebacks.successor = self

    def retire(self) -> None:
        """As for every provider; and the retries of unsaved grants pass to the provider that took them over."""
        super().retire()
        writebacks = self._writebacks
        heir = writebacks.successor
        # A reload that failed after adopting closed its provider: that one never takes over.
        if writebacks.owner is self and heir is not None and heir is not self and not heir._closed:
            writebacks.owner = heir

    async def close(self) -> None:
        """Let token requests in flight finish (and their write-backs); then one last write of every unsaved grant.

        Bounded: the wait for requests in flight as for every provider, then at most
        ``lookup_timeout_seconds`` for a retry's write under way and as long again for the
        last one. A grant still not stored after it is lost with this process: logged.
        """
        await super().close()
        writebacks = self._writebacks
        if writebacks.owner is not self or writebacks.closed:
            return  # a reload's successor shares these grants and writes them
        writebacks.closed = True
        unsaved = [key for key, grant in self._grants.items() if grant.unsaved]
        if unsaved:
            lasts = [asyncio.get_running_loop().create_task(self._last_write(key)) for key in unsaved]
            _, late = await asyncio.wait(lasts, timeout=2 * self.cache.lookup_timeout + 1.0)
            for task in late:
                task.cancel()
                task.add_done_callback(_drop_outcome)
        retries = list(writebacks.retries.values())
        writebacks.retries.clear()
        for task in retries:
            task.cancel()  # each sleeps, or waits for a lock no write holds now
        if retries:
            await asyncio.wait(retries, timeout=1.0)

    def consent(self, reason: str) -> ConsentRequired:
        return ConsentRequired(reason=reason, authorize_url=self.credential.authorize_url)

    def refusal(self, exc: TokenRefused) -> SidecarError:
        if exc.error == "invalid_grant":
            return self.consent("invalid_grant")
        return super().refusal(exc)

    async def obtain(self, identity: Identity, key: str) -> TokenAnswer:
        secret_id = self.secret_id(identity.client_id)
        grant = await self._current(secret_id, key)
        rereads = 0
        while True:
            try:
                answer = await self.client.request(
                    self.grant, {"refresh_token": grant.refresh_token.reveal()}, self.app_id, self.app_secret
                )
            except TokenRefused as exc:
                if exc.error != "invalid_grant" or grant.unsaved:
                    raise
                # Another replica may have used this grant and rotated it: the store then
                # holds the newer one (or will in a moment, once its write lands).
                newer = await self._newer(secret_id, grant)
                if newer is None or rereads >= GRANT_REREADS:
                    self._grants.pop(key, None)
                    raise
                rereads += 1
                grant = newer
                continue
            break
        rotated = answer.refresh_token
        if rotated is not None and not rotated == grant.refresh_token:
            grant = await self._write_back(secret_id, grant, rotated)
        self._grants[key] = grant
        if grant.unsaved:
            self._keep_writing(key, secret_id)
        return answer

    async def _current(self, secret_id: str, key: str) -> _Grant:
        """The grant to refresh with: the store's, or ours when the store has not taken our rotation."""
        last = self._grants.get(key)
        if last is not None and last.unsaved:
            return last
        try:
            return self._grant(await self.read_store(secret_id))
        except SecretNotFound:
            self._grants.pop(key, None)
            raise self.consent("no_grant") from None
        except StoreError as exc:
            if last is not None:
                return last
            raise self.store_failed(exc) from None

    def _grant(self, raw: RawSecret) -> _Grant:
        fields = _fields(raw)
        token = _text(fields, "refresh_token") if fields is not None else None
        if token is None:
            raise self.consent("no_grant")
        return _Grant(Secret(token), version_of(raw))

    async def _newer(self, secret_id: str, used: _Grant) -> _Grant | None:
        """A grant in the store other than ``used`` (another replica rotated it), waiting briefly for one."""
        for attempt in range(GRANT_REREADS):
            if attempt:
                await asyncio.sleep(GRANT_REREAD_SECONDS)
            try:
                current = self._grant(await self.read_store(secret_id))
            except (SecretNotFound, StoreError, ConsentRequired):
                return None
            if not current.refresh_token == used.refresh_token:
                return current
        return None

    @contextlib.asynccontextmanager
    async def _writing(self, secret_id: str) -> AsyncIterator[None]:
        """One grant write per secret id at a time: a request's write-back, a retry, the last try at close."""
        locks = self._writebacks.locks
        held = locks.get(secret_id)
        if held is None:
            held = locks[secret_id] = _WriteLock(asyncio.Lock())
        held.users += 1
        try:
            async with held.lock:
                yield
        finally:
            held.users -= 1
            if not held.users:
                del locks[secret_id]

    async def _store(self, secret_id: str, token: Secret, version: StoreVersion | None) -> Written | WriteConflict:
        """One check-and-set write of a grant, within ``lookup_timeout_seconds``; StoreError (counted) when it fails."""
        backend = self.cache.backend
        try:
            return await asyncio.wait_for(
                backend.write(secret_id, {"refresh_token": token.reveal()}, version), self.cache.lookup_timeout
            )
        except (StoreError, TimeoutError) as exc:
            failure = exc if isinstance(exc, StoreError) else StoreError("timeout")
            metrics.SECRET_STORE_ERRORS.labels(backend.name, failure.kind).inc()
            raise StoreError(failure.kind) from None
        finally:
            # Whatever the cache held for this secret predates the rotation.
            self.cache.invalidate(secret_id)
            self.cache.invalidate(secret_id, "refresh_token")

    async def _write_back(self, secret_id: str, grant: _Grant, rotated: Secret) -> _Grant:
        """Store the rotated refresh token, check-and-set on the version read; the grant to keep using.

        Written: the new grant. Another writer first: the store's (newer) grant. The store
        failing: the new grant, kept here as the only copy and written again in the
        background (``_keep_writing``).
        """
        async with self._writing(secret_id):
            # Read under the lock: a retry that just stored ``grant`` moved its version on.
            try:
                result = await self._store(secret_id, rotated, grant.version)
            except StoreError as exc:
                log.error(
                    "the rotated refresh token could not be written back; it is kept in memory and written again",
                    extra={"upstream": self.name, "secret_id": secret_id, "kind": exc.kind},
                )
                return _Grant(rotated, grant.version, unsaved=True)
        if isinstance(result, Written):
            return _Grant(rotated, result.version)
        log.info(
            "another replica rotated this grant first; using the stored one",
            extra={"upstream": self.name, "secret_id": secret_id},
        )
        try:
            return self._grant(await self.read_store(secret_id))
        except (SecretNotFound, StoreError, ConsentRequired):
            return _Grant(rotated, grant.version, unsaved=True)

    def _keep_writing(self, key: str, secret_id: str) -> None:
        """Write this key's unsaved grant again in the background, unless a task already does (one per secret id)."""
        writebacks = self._writebacks
        if writebacks.closed or secret_id in writebacks.retries:
            return
        task = asyncio.get_running_loop().create_task(self._retry_write(key, secret_id))
        writebacks.retries[secret_id] = task
        task.add_done_callback(_drop_outcome)

    async def _retry_write(self, key: str, secret_id: str) -> None:
        """Until the unsaved grant is stored, replaced (a newer rotation, another writer's grant) or dropped.

        Backing off from WRITE_RETRY_FIRST_SECONDS to WRITE_RETRY_MAX_SECONDS; one
        warning per failed try. Each try is bounded by ``lookup_timeout_seconds``.
        """
        writebacks = self._writebacks
        delay = WRITE_RETRY_FIRST_SECONDS
        try:
            while True:
                await asyncio.sleep(delay)
                delay = min(delay * 2, WRITE_RETRY_MAX_SECONDS)
                async with self._writing(secret_id):
                    failed = await self._write_unsaved(key, secret_id)
                if failed is None or failed == "unsupported":
                    return  # done; or a store that takes no writes, which trying again will not change
                log.warning(
                    "the rotated refresh token still cannot be written back; trying again",
                    extra={"upstream": self.name, "secret_id": secret_id, "kind": failed, "retry_in": delay},
                )
        finally:
            # No await between the last look at the grant and this: a newer unsaved grant
            # either was seen by this task or finds no task and starts one.
            if writebacks.retries.get(secret_id) is asyncio.current_task():
                del writebacks.retries[secret_id]

    async def _last_write(self, key: str) -> None:
        """At close: once more for this key's unsaved grant, after any try under way; the retry task stopped."""
        secret_id = self.secret_id(key)
        async with self._writing(secret_id):
            retry = self._writebacks.retries.pop(secret_id, None)
            if retry is not None:
                retry.cancel()  # it sleeps or waits for this lock: no write of it is cut
            failed = await self._write_unsaved(key, secret_id)
        if failed is not None:
            log.error(
                "the rotated refresh token could not be written back before the provider closed; "
                "the user will have to consent again",
                extra={"upstream": self.name, "secret_id": secret_id, "kind": failed},
            )

    async def _write_unsaved(self, key: str, secret_id: str) -> str | None:
        """Write this key's grant if it is still unsaved (the caller holds the write lock); None when done, or
        the store's failure kind (try again).

        A conflict means another writer stored a grant after the version ours follows:
        if it is ours (an earlier try landed after all), it is saved; if not, the store's
        grant is used from now on (none stored: none is kept), and ours is dropped.
        """
        grant = self._grants.get(key)
        if grant is None or not grant.unsaved:
            return None  # stored, replaced by a newer rotation that was, or dropped
        try:
            result = await self._store(secret_id, grant.refresh_token, grant.version)
        except StoreError as exc:
            return exc.kind
        if isinstance(result, Written):
            grant.version, grant.unsaved = result.version, False
            log.info(
                "the rotated refresh token was written back",
                extra={"upstream": self.name, "secret_id": secret_id},
            )
            return None
        try:
            stored: _Grant | None = self._grant(await self.read_store(secret_id))
        except StoreError as exc:
            return exc.kind
        except (SecretNotFound, ConsentRequired):
            stored = None
        if stored is not None and stored.refresh_token == grant.refresh_token:
            grant.version, grant.unsaved = stored.version, False
            log.info(
                "the rotated refresh token was written back",
                extra={"upstream": self.name, "secret_id": secret_id},
            )
            return None
        log.warning(
            "another writer stored a grant after the one the unsaved rotation follows; using the store's",
            extra={"upstream": self.name, "secret_id": secret_id, "stored": "grant" if stored else "none"},
        )
        if self._grants.get(key) is grant:
            if stored is None:
                del self._grants[key]
            else:
                self._grants[key] = stored
        return None


class TokenExchange(_TokenProvider):
    """``token_exchange``: the caller's verified token exchanged (RFC 8693) for one with ``audience``."""

    kind = "token_exchange"
    grant = TOKEN_EXCHANGE_GRANT

    def __init__(self, settings: UpstreamSettings, cache: SecretCache, **kwargs: Any) -> None:
        super().__init__(settings, cache, **kwargs)
        self.app_id = settings.credential.client_id
        self.app_secret = app_secret(settings.credential)

    def key(self, identity: Identity) -> str:
        """Per subject token, not per client ID: with ``azp`` or ``client_id`` as the client ID
        every user of one app shares it, and an exchanged token acts for its own subject only.
        A digest, so the cache's keys hold no token."""
        if identity.token is None:
            return identity.client_id  # obtain() refuses it
        return identity.client_id + "\x00" + hashlib.sha256(identity.token.reveal().encode()).hexdigest()

    def refusal(self, exc: TokenRefused) -> SidecarError:
        return CredentialRefused(
            "The token endpoint refused to exchange the caller's token.",
            reason=exc.error if exc.error in EXCHANGE_REFUSALS else "refused",
        )

    async def obtain(self, identity: Identity, key: str) -> TokenAnswer:
        if identity.token is None:
            raise CredentialRefused("Token exchange needs the caller's verified token.", reason="no_subject_token")
        form = {
            "subject_token": identity.token.reveal(),
            "subject_token_type": ACCESS_TOKEN_TYPE,
            "requested_token_type": ACCESS_TOKEN_TYPE,
        }
        if self.credential.audience:
            form["audience"] = self.credential.audience
        return await self.client.request(self.grant, form, self.app_id, self.app_secret)


def app_secret(credential: CredentialSettings) -> Secret | None:
    """The OAuth app's secret: ``client_secret``, or ``client_secret_file`` read now (each reload reads it again)."""
    if credential.client_secret:
        return Secret(credential.client_secret)
    if credential.client_secret_file is not None:
        text = credential.client_secret_file.read_text(encoding="utf-8").strip()
        return Secret(text) if text else None
    return None


PROVIDERS: dict[str, type[_TokenProvider]] = {
    "oauth2_client_credentials": ClientCredentials,
    "oauth2_refresh_token": RefreshToken,
    "token_exchange": TokenExchange,
}


def build_oauth_provider(settings: UpstreamSettings, cache: SecretCache, **kwargs: Any) -> _TokenProvider:
    """The provider for an upstream whose ``credential.type`` is one of the OAuth types."""
    return PROVIDERS[settings.credential.type](settings, cache, **kwargs)
