"""Secrets from HashiCorp Vault or OpenBao (KV version 2), over plain aiohttp calls.

Not hvac: it calls Vault through ``requests``, synchronously, so every read would
need a thread, and it would bring its own imports into a process that keeps
aiohttp's client loaded already. Vault's HTTP API is small and stable; the few
calls the sidecar makes are here::

    login   POST auth/<mount>/login              (approle, kubernetes, jwt)
    read    GET  <kv mount>/data/<secret id>      -> data.data, data.metadata.version
    write   POST <kv mount>/data/<secret id>      {"options": {"cas": <version read>}, "data": ...}
    renew   POST auth/token/renew-self            at 2/3 of the token's lease
    check   GET  auth/token/lookup-self           after a 403: is it the token or the policy?

Errors are sorted as the AWS backend sorts them: no secret at that path is
SecretNotFound (negatively cached, ``no_credential``); a policy denial, a sealed,
unreachable or failing Vault is a StoreError (stale values are served meanwhile).
One lookup, its retries and a new login included, starts nothing after
``secrets.lookup_timeout_seconds``. The sidecar's own token, the secret id and the
JWT it logs in with are secrets: held in a ``Secret`` or a local variable, never in
a log line, an error or a repr.

Not compiled: the SecretCache in front answers the warm path; this runs on a miss.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from sidecar.config import DEFAULT_LOOKUP_TIMEOUT_SECONDS, VaultBackendSettings, vault_path_problem
from sidecar.net import loggable_url, trust_context
from sidecar.secrets.base import (
    RawSecret,
    Secret,
    SecretNotFound,
    StoredFields,
    StoreError,
    StoreVersion,
    WriteConflict,
    WriteResult,
    Written,
)

log = logging.getLogger("sidecar.secrets.vault")

#: Calls to Vault per lookup at most: the first and two retries of a transient failure.
MAX_ATTEMPTS = 3
#: Before retry n (1, 2), a pause of random() * BACKOFF_SECONDS * 2**(n-1); none ends past the deadline.
BACKOFF_SECONDS = 0.5
#: A token is renewed when this share of its lease has passed (Vault Agent does the same).
RENEW_AT = 2 / 3
#: After a failed renewal or background login, the next try comes this long after (sooner near expiry).
RENEW_RETRY_SECONDS = 5.0
#: Connections to Vault at once; single flight in the cache keeps lookups few.
MAX_CONNECTIONS = 8
#: At most one "vault login failed" error per this many seconds.
LOGIN_FAILURE_LOG_INTERVAL = 30.0
#: Vault's answer to a check-and-set write whose version is no longer the current one.
_CAS_MISMATCH = "check-and-set parameter did not match"
#: Methods that log in with something the sidecar reads from a file (not a token it is given).
LOGIN_METHODS = frozenset({"approle", "kubernetes", "jwt"})


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """A file's identity (inode, size, mtime): a token file rewritten or swapped changes it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _read_secret_file(path: Path, what: str) -> str:
    """The stripped content of a token, secret id or JWT file; StoreError("auth") naming only the path."""
    problem = None
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        problem = f"{what} {path} cannot be read ({exc.strerror})"
    except UnicodeDecodeError:
        problem = f"{what} {path} is not UTF-8 text"
    if problem is not None:
        raise StoreError("auth", problem)
    if not text:
        raise StoreError("auth", f"{what} {path} is empty")
    return text


def _quote_path(path: str) -> str:
    """Each segment percent-encoded: the URL names exactly this path, nothing a URL library may rewrite."""
    return "/".join(quote(segment, safe="") for segment in path.split("/"))


def _errors(body: Any, scrub: tuple[str, ...] = ()) -> str:
    """Vault's own error words, shortened, with anything in ``scrub`` (a JWT, a secret id) cut out."""
    errors = body.get("errors") if isinstance(body, dict) else None
    if not isinstance(errors, list) or not errors:
        return ""
    text = "; ".join(str(e) for e in errors if e).replace("\n", " ").replace("\t", " ")
    for value in scrub:
        if value:
            text = text.replace(value, "********")
    return " ".join(text.split())[:200]


@dataclass(slots=True)
class _Login:
    """The token in use and what is known of its lease (monotonic clock)."""

    token: Secret
    obtained: float
    #: seconds; None: not known yet (a token given to the sidecar); 0: it never expires
    lease: float | None
    renewable: bool
    #: the token file's identity when the token came from one
    stamp: tuple[int, int, int] | None = None
    #: the lease first granted: a renewal that grants much less means max_ttl is near
    first_lease: float | None = None
    #: when the background task renews (or, near max_ttl, logs in again)
    renew_at: float | None = None
    #: the next background step is a new login, not a renewal
    relogin: bool = False

    def expired(self, now: float) -> bool:
        return bool(self.lease) and now >= self.obtained + (self.lease or 0.0)


class VaultBackend:
    """KV version 2 reads and check-and-set writes, with the sidecar's own login kept alive."""

    name = "vault"

    def __init__(
        self,
        settings: VaultBackendSettings,
        lookup_timeout: float = DEFAULT_LOOKUP_TIMEOUT_SECONDS,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.lookup_timeout = lookup_timeout
        self.env = os.environ if env is None else env
        self.backoff_seconds = BACKOFF_SECONDS
        self.on_change: Callable[[], None] | None = None  # Vault has no push; the cache's TTL covers changes
        self.method = settings.auth.method
        self._api = settings.address.rstrip("/") + "/v1/"
        self._mount = _quote_path(settings.mount)
        self._headers = {"X-Vault-Namespace": settings.namespace} if settings.namespace else {}
        self._session: aiohttp.ClientSession | None = None
        self._login: _Login | None = None
        #: the token Vault refused last (token method): read again unchanged, it is not tried again
        self._refused: Secret | None = None
        self._lock: asyncio.Lock | None = None
        self._changed: asyncio.Event | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._last_login_failure = -LOGIN_FAILURE_LOG_INTERVAL
        #: counts, for the tests and the log
        self.logins = 0
        self.renewals = 0

    def __repr__(self) -> str:
        return (
            f"VaultBackend({loggable_url(self.settings.address)}, mount={self.settings.mount}, "
            f"auth={self.method} at auth/{self.settings.auth.mount})"
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Make the HTTP client and start the login keeper; nothing here needs Vault to be up."""
        context: ssl.SSLContext | bool = True
        if self.settings.ca_file is not None:
            try:
                context = trust_context(self.settings.ca_file)
            except (ssl.SSLError, OSError, ValueError):
                problem = f"ca_file {self.settings.ca_file}: no PEM certificate could be loaded"
                raise StoreError("config", problem) from None
        connector = aiohttp.TCPConnector(ssl=context, limit=MAX_CONNECTIONS)
        self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._keeper = asyncio.get_running_loop().create_task(self._keep_alive())

    async def close(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            try:
                await self._keeper
            except asyncio.CancelledError:
                pass
            self._keeper = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------ reads and writes

    def _data_url(self, secret_id: str) -> URL:
        return URL(f"{self._api}{self._mount}/data/{_quote_path(secret_id)}", encoded=True)

    def _url(self, path: str) -> URL:
        return URL(self._api + path, encoded=True)

    async def fetch(self, secret_id: str) -> RawSecret:
        if vault_path_problem(secret_id):
            # An empty, . or .. segment names another path than the id asked for.
            raise SecretNotFound(secret_id)
        deadline = time.monotonic() + self.lookup_timeout
        status, body = await self._call("GET", self._data_url(secret_id), None, deadline)
        if status == 404:
            raise SecretNotFound(secret_id)  # no such path, or its current version deleted
        if status != 200:
            raise StoreError("invalid", f"Vault answered the read with {status}")
        return self._fields(body, secret_id)

    @staticmethod
    def _fields(body: Any, secret_id: str) -> StoredFields:
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, dict):
            raise StoreError("invalid", "Vault's answer is not a KV version 2 secret (is the mount KV v2?)")
        fields, metadata = data.get("data"), data.get("metadata")
        if fields is None:
            raise SecretNotFound(secret_id)  # the version read is deleted or destroyed
        if not isinstance(fields, dict):
            raise StoreError("invalid", "Vault's answer is not a KV version 2 secret (is the mount KV v2?)")
        version = metadata.get("version") if isinstance(metadata, dict) else None
        return StoredFields(fields, version if isinstance(version, int) and not isinstance(version, bool) else None)

    async def write(self, secret_id: str, value: Mapping[str, str], expected: StoreVersion | None) -> WriteResult:
        """A new version of the secret, if the current one is still ``expected`` (KV v2 check-and-set).

        ``expected`` None writes only when the path holds no secret yet (``cas: 0``).
        A write whose answer was lost is retried like a read; if the first one had
        landed, the retry comes back as WriteConflict, and a read then sees our value.
        """
        if vault_path_problem(secret_id):
            raise StoreError("invalid", "the secret id is not a Vault path")
        try:
            cas = 0 if expected is None else int(expected)
        except ValueError:
            raise StoreError("invalid", "a Vault version is a number") from None
        payload = {"options": {"cas": cas}, "data": dict(value)}
        deadline = time.monotonic() + self.lookup_timeout
        status, body = await self._call("POST", self._data_url(secret_id), payload, deadline)
        if status == 400 and _CAS_MISMATCH in _errors(body):
            return WriteConflict()
        if status not in (200, 204):
            raise StoreError("invalid", f"Vault refused the write ({status}: {_errors(body)})")
        data = body.get("data") if isinstance(body, dict) else None
        version = data.get("version") if isinstance(data, dict) else None
        return Written(version if isinstance(version, int) and not isinstance(version, bool) else None)

    async def _call(self, method: str, url: URL, payload: Any, deadline: float) -> tuple[int, Any]:
        """One request with the current token: retried when transient, logged in again once when the token was refused.

        Returns the status (200, 204, 400 or 404) and the parsed body; every other answer
        is a StoreError.
        """
        attempt = 1
        relogged = False
        while True:
            try:
                login = await self._current_login(deadline)
                status, body = await self._send(method, url, payload, login.token, deadline)
                if status == 403:
                    if not await self._token_refused(login, deadline):
                        raise StoreError("access_denied", "Vault's policy denies this path to the sidecar's token")
                    self._forget(login, "Vault refused the token (expired or revoked)")
                    if relogged:
                        raise StoreError("auth", "Vault refused the token of a new login too")
                    relogged = True
                    continue  # a new login is not a retry of a failing Vault: no attempt counted
                return self._status(status, body)
            except StoreError as failure:
                pause = random.random() * self.backoff_seconds * 2 ** (attempt - 1)  # noqa: S311 - jitter
                if not failure.transient or attempt >= MAX_ATTEMPTS or time.monotonic() + pause >= deadline:
                    raise
            await asyncio.sleep(pause)
            attempt += 1

    @staticmethod
    def _status(status: int, body: Any) -> tuple[int, Any]:
        """200, 204, 400 and 404 for the caller; the rest sorted into StoreErrors."""
        if status in (200, 204, 400, 404):
            return status, body
        if status == 503:
            sealed = "sealed" in _errors(body).lower()
            raise StoreError("sealed" if sealed else "unavailable", f"Vault answered {status}", transient=True)
        if status == 429:
            raise StoreError("throttled", "Vault answered 429", transient=True)
        if status == 412 or status >= 500:
            # 412: a performance standby has not caught up with the write index yet.
            raise StoreError("unavailable", f"Vault answered {status}", transient=True)
        raise StoreError("unavailable", f"Vault answered {status}")

    async def _send(
        self, method: str, url: URL, payload: Any, token: Secret | None, deadline: float
    ) -> tuple[int, Any]:
        """One HTTP exchange ending by ``deadline``: the status and the parsed JSON body (None when not JSON)."""
        if self._session is None:
            raise StoreError("unavailable", "backend not started")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise StoreError("timeout", "no answer within lookup_timeout_seconds")
        headers = dict(self._headers)
        if token is not None:
            headers["X-Vault-Token"] = token.reveal()
        try:
            # No redirects: the token goes to the configured address and nowhere else.
            async with self._session.request(
                method, url, json=payload, headers=headers, timeout=aiohttp.ClientTimeout(total=remaining),
                allow_redirects=False,
            ) as resp:
                status, raw = resp.status, await resp.read()
        except TimeoutError:
            raise StoreError("timeout", transient=True) from None
        except (aiohttp.ClientSSLError, ssl.SSLError):
            raise StoreError("tls", "Vault's TLS certificate is not trusted (secrets.vault.ca_file)") from None
        except aiohttp.ClientConnectorError:
            raise StoreError("unreachable", transient=True) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise StoreError("unavailable", type(exc).__name__, transient=True) from None
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        return status, body

    # ------------------------------------------------------------------ the sidecar's own token

    async def _current_login(self, deadline: float) -> _Login:
        login = self._login
        if login is not None and not self._outdated(login):
            return login
        assert self._lock is not None, "backend not started"
        async with self._lock:
            login = self._login
            if login is None or self._outdated(login):
                login = await self._log_in(deadline, login)
                self._use(login)
            return login

    def _outdated(self, login: _Login) -> bool:
        """A login past its lease (a login method logs in again), or a token file that changed."""
        if self.method in LOGIN_METHODS:
            return login.expired(time.monotonic())
        token_file = self.settings.auth.token_file
        return token_file is not None and _stamp(token_file) != login.stamp

    def _use(self, login: _Login) -> None:
        if login is not self._login:
            self._login = login
            if self._changed is not None:
                self._changed.set()

    def _forget(self, login: _Login, why: str) -> None:
        if self._login is login:
            log.warning("vault token no longer valid; logging in again", extra={"reason": why, "method": self.method})
            self._login = None
            if self.method == "token":
                self._refused = login.token

    async def _log_in(self, deadline: float, previous: _Login | None) -> _Login:
        """A token: read (token method) or from a login at auth/<mount>/login."""
        auth = self.settings.auth
        now = time.monotonic()
        if self.method == "token":
            stamp = _stamp(auth.token_file) if auth.token_file is not None else None
            if auth.token_file is not None:
                token = Secret(_read_secret_file(auth.token_file, "token_file"))
            else:
                value = self.env.get("VAULT_TOKEN", "").strip()
                if not value:
                    raise StoreError("auth", "no token: set secrets.vault.auth.token_file or VAULT_TOKEN")
                token = Secret(value)
            if previous is not None and previous.token == token:
                previous.stamp = stamp  # the file was touched, the token is the same: keep what is known of it
                return previous
            if self._refused is not None and self._refused == token:
                where = f"token_file {auth.token_file}" if auth.token_file is not None else "VAULT_TOKEN"
                raise StoreError("auth", f"the token in {where} was refused by Vault (expired or revoked)")
            self.logins += 1
            return _Login(token, now, None, False, stamp)
        if self.method == "approle":
            assert auth.secret_id_file is not None  # config requires it
            secret_id = _read_secret_file(auth.secret_id_file, "secret_id_file")
            payload = {"role_id": auth.role_id, "secret_id": secret_id}
            scrub: tuple[str, ...] = (secret_id,)
        else:
            jwt = _read_secret_file(auth.jwt_file, "jwt_file")  # read at every login: projected tokens rotate
            payload = {"role": auth.role, "jwt": jwt}
            scrub = (jwt,)
        url = self._url(f"auth/{_quote_path(auth.mount)}/login")
        status, body = await self._send("POST", url, payload, None, deadline)
        if status in (400, 403, 404):  # a wrong role, secret id or JWT; no such auth mount
            self._log_login_failure(status, _errors(body, scrub))
            raise StoreError("auth", f"Vault refused the login at auth/{auth.mount} ({status})")
        if status != 200:
            self._status(status, body)  # sealed, throttled, failing: transient StoreErrors
            raise StoreError("unavailable", f"Vault answered the login with {status}")
        granted = body.get("auth") if isinstance(body, dict) else None
        token_value = granted.get("client_token") if isinstance(granted, dict) else None
        if not isinstance(granted, dict) or not isinstance(token_value, str) or not token_value:
            raise StoreError("invalid", f"Vault's login answer at auth/{auth.mount} holds no token")
        lease = granted.get("lease_duration")
        lease_seconds = float(lease) if isinstance(lease, int | float) and not isinstance(lease, bool) else 0.0
        renewable = granted.get("renewable") is True
        self.logins += 1
        login = _Login(Secret(token_value), now, lease_seconds, renewable, first_lease=lease_seconds)
        self._schedule(login, now)
        log.info(
            "vault login",
            extra={"method": self.method, "mount": auth.mount, "lease_seconds": lease_seconds, "renewable": renewable},
        )
        return login

    def _log_login_failure(self, status: int, errors: str) -> None:
        now = time.monotonic()
        if now - self._last_login_failure >= LOGIN_FAILURE_LOG_INTERVAL:
            self._last_login_failure = now
            log.error(
                "vault login failed",
                extra={"method": self.method, "mount": self.settings.auth.mount, "status": status, "errors": errors},
            )

    def _schedule(self, login: _Login, now: float) -> None:
        """When the keeper acts on this login: at RENEW_AT of a finite lease.

        A renewable token is renewed then; a login that cannot be renewed is replaced by
        a new login; a token given to the sidecar that cannot be renewed is left alone.
        """
        lease = login.lease
        if lease and (login.renewable or self.method in LOGIN_METHODS):
            login.renew_at = now + lease * RENEW_AT
            login.relogin = not login.renewable
        else:
            login.renew_at = None

    async def _token_refused(self, login: _Login, deadline: float) -> bool:
        """After a 403: whether Vault refused the token itself (True) or only the path (False)."""
        if login.expired(time.monotonic()):
            return True
        status, _ = await self._send("GET", self._url("auth/token/lookup-self"), None, login.token, deadline)
        if status == 403:
            return True
        self._status(status, None)  # a failing Vault is a StoreError here too
        return False

    # ------------------------------------------------------------------ keeping the token alive

    async def _keep_alive(self) -> None:
        """Log in once at start, then renew each token at RENEW_AT of its lease; near max_ttl, log in anew."""
        assert self._changed is not None
        while True:
            self._changed.clear()
            try:
                wait = await self._keep_step()
            except asyncio.CancelledError:
                raise
            except Exception:  # the keeper must outlive any surprise
                log.exception("vault token keeper failed")
                wait = RENEW_RETRY_SECONDS
            try:
                await asyncio.wait_for(self._changed.wait(), wait)
            except TimeoutError:
                pass

    async def _keep_step(self) -> float | None:
        """One step of the keeper; how long until the next (None: until the login changes)."""
        login = self._login
        now = time.monotonic()
        deadline = now + self.lookup_timeout
        if login is None:
            try:
                await self._current_login(deadline)
            except StoreError:
                return RENEW_RETRY_SECONDS  # logged where it failed; a lookup may succeed first
            return 0.0
        if login.lease is None:
            return await self._look_up(login, deadline)
        if login.renew_at is None:
            return None
        if now < login.renew_at:
            return login.renew_at - now
        if login.relogin and self.method in LOGIN_METHODS:
            assert self._lock is not None
            try:
                async with self._lock:
                    if self._login is login:
                        self._use(await self._log_in(deadline, login))
            except StoreError:
                return self._retry(login, now)
            return 0.0
        return await self._renew(login, deadline)

    def _retry(self, login: _Login, now: float) -> float:
        """After a failed step: try again soon, sooner when the lease is nearly over."""
        left = login.obtained + (login.lease or 0.0) - now
        wait = max(0.1, min(RENEW_RETRY_SECONDS, left / 3))
        login.renew_at = now + wait
        return wait

    async def _look_up(self, login: _Login, deadline: float) -> float | None:
        """A token given to the sidecar: learn its lease and whether it renews (auth/token/lookup-self)."""
        now = time.monotonic()
        try:
            status, body = await self._send("GET", self._url("auth/token/lookup-self"), None, login.token, deadline)
        except StoreError:
            return RENEW_RETRY_SECONDS
        if status == 403:
            self._forget(login, "Vault refused the token (expired or revoked)")
            return None
        data = body.get("data") if status == 200 and isinstance(body, dict) else None
        if not isinstance(data, dict):
            return RENEW_RETRY_SECONDS
        ttl = data.get("ttl")
        login.lease = float(ttl) if isinstance(ttl, int | float) and not isinstance(ttl, bool) else 0.0
        login.first_lease = login.lease
        login.obtained = now
        login.renewable = data.get("renewable") is True
        self._schedule(login, now)
        return 0.0

    async def _renew(self, login: _Login, deadline: float) -> float | None:
        """auth/token/renew-self; a refused token is dropped (the next lookup logs in again)."""
        now = time.monotonic()
        try:
            status, body = await self._send("POST", self._url("auth/token/renew-self"), {}, login.token, deadline)
        except StoreError:
            return self._retry(login, now)
        if status == 403:
            self._forget(login, "Vault refused to renew the token (expired or revoked)")
            return 0.0
        granted = body.get("auth") if status == 200 and isinstance(body, dict) else None
        lease = granted.get("lease_duration") if isinstance(granted, dict) else None
        if not isinstance(lease, int | float) or isinstance(lease, bool):
            return self._retry(login, now)
        self.renewals += 1
        login.obtained, login.lease = now, float(lease)
        self._schedule(login, now)
        # Granted much less than the first lease: max_ttl is near. Renewing would only shorten
        # it further, so the next step is a new login (a token given to the sidecar just runs out).
        login.relogin = login.relogin or (
            bool(login.first_lease) and float(lease) < (login.first_lease or 0.0) * RENEW_AT
        )
        log.debug("vault token renewed", extra={"lease_seconds": float(lease), "method": self.method})
        return login.renew_at - now if login.renew_at is not None else None


__all__ = ["VaultBackend"]
