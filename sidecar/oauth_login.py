"""``credential-sidecar oauth login``: a user grants an ``oauth2_refresh_token`` upstream once.

The authorization-code flow with PKCE (RFC 7636, S256) on a loopback redirect
(RFC 8252): this prints the provider's authorize URL, the user opens it in a
browser and consents, the provider redirects the browser to
``http://127.0.0.1:P/callback``, and this process exchanges the code at
``token_url`` with the upstream's OAuth app (``client_secret_basic`` or
``client_secret_post``, or the client id alone when the app has no secret) and
stores ``{"refresh_token": ...}`` under the upstream's secret for that client, in
the configured backend. From then on the sidecar refreshes, rotates and writes
back that grant itself.

Storing is a check-and-set write like a rotation's: the current entry is read and
replaced at the version read (a new grant replaces an old or revoked one), or
created when there is none; if a sidecar rotated the grant in between, it is read
again and replaced (a few times at most). No token, code or verifier is ever
printed or logged; the provider's error code and description are.

Exit codes (also in docs/credentials.md):

== ======================================================================
0  the grant is stored
2  configuration or usage: unknown upstream, not oauth2_refresh_token, no
   ``authorize_url``, a client ID the sidecar would refuse, the port taken
3  the authorization came back without a code: the provider's error
   (``error=access_denied``: the user declined), or a ``state`` other
   than the one sent (the redirect is not an answer to this login)
4  the token endpoint: unreachable, slow, an error answer, or no
   ``refresh_token`` in it (the app or scopes do not grant offline access)
5  no redirect came within ``--timeout`` seconds (default 300)
6  the store: unreachable, refused the write, or kept changing under it
== ======================================================================

Not compiled: run once by a person.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TextIO
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import aiohttp
from aiohttp import web

from sidecar.client_id import CLIENT_ID_PATTERN
from sidecar.config import Settings, UpstreamSettings
from sidecar.net import loggable_url, trust_context
from sidecar.secrets.base import SecretBackend, SecretNotFound, StoreError, WriteConflict, version_of
from sidecar.secrets.factory import BackendStartError, start_backend

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_REFUSED = 3
EXIT_TOKEN_ENDPOINT = 4
EXIT_TIMEOUT = 5
EXIT_STORE = 6

#: How long the command waits for the browser's redirect unless ``--timeout`` says.
DEFAULT_TIMEOUT_SECONDS = 300.0
#: Check-and-set attempts when sidecars keep rotating the grant while it is stored.
WRITE_ATTEMPTS = 3
#: The longest provider error description repeated to the user.
MAX_DESCRIPTION = 300


class LoginError(Exception):
    """The login cannot go on; ``code`` is the exit code, the message one line for the user."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Pkce:
    """The login's one-time values: ``state`` ties the redirect to it, the verifier proves the code is ours."""

    state: str
    verifier: str

    @classmethod
    def new(cls) -> Pkce:
        return cls(secrets.token_urlsafe(32), secrets.token_urlsafe(64))  # 86 characters: RFC 7636 allows 43-128

    @property
    def challenge(self) -> str:
        digest = hashlib.sha256(self.verifier.encode("ascii")).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def authorize_url(upstream: UpstreamSettings, redirect_uri: str, pkce: Pkce) -> str:
    """``credential.authorize_url`` with the contract's parameters (its own query kept; ``scope`` when configured)."""
    cred = upstream.credential
    assert cred.authorize_url is not None and cred.client_id is not None
    params: dict[str, str] = {
        "response_type": "code",
        "client_id": cred.client_id,
        "redirect_uri": redirect_uri,
    }
    if cred.scopes:
        params["scope"] = " ".join(cred.scopes)
    params.update(
        {"state": pkce.state, "code_challenge": pkce.challenge, "code_challenge_method": "S256"}
    )
    parts = urlsplit(cred.authorize_url)
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    query = urlencode([*kept, *params.items()], quote_via=quote)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def _target(settings: Settings, upstream_name: str, client_id: str) -> tuple[UpstreamSettings, str]:
    """The upstream (checked to be an oauth2_refresh_token one) and the secret id to store under."""
    upstream = settings.upstreams.get(upstream_name)
    if upstream is None:
        known = ", ".join(sorted(settings.upstreams)) or "none"
        raise LoginError(EXIT_CONFIG, f"no upstream named {upstream_name!r} (configured: {known})")
    kind = upstream.credential.type
    if kind != "oauth2_refresh_token":
        raise LoginError(
            EXIT_CONFIG,
            f"upstreams.{upstream_name}.credential.type is {kind}; oauth login stores a user's grant "
            "for type oauth2_refresh_token only",
        )
    if not upstream.credential.authorize_url:
        raise LoginError(EXIT_CONFIG, f"upstreams.{upstream_name}.credential.authorize_url is needed for oauth login")
    if not CLIENT_ID_PATTERN.fullmatch(client_id):
        raise LoginError(EXIT_CONFIG, f"--client {client_id!r} is not a client ID the sidecar accepts")
    return upstream, upstream.secret.format(client_id=client_id, upstream=upstream.name)


def _client_secret(upstream: UpstreamSettings) -> str | None:
    cred = upstream.credential
    if cred.client_secret is not None:
        return cred.client_secret
    if cred.client_secret_file is None:
        return None
    try:
        value = cred.client_secret_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        value = None  # raised below: a decoder's error holds the file's bytes
    if not value:
        raise LoginError(
            EXIT_CONFIG, f"upstreams.{upstream.name}.credential.client_secret_file cannot be read or is empty"
        )
    return value


def _one_line(value: str | None) -> str:
    """A provider's words, safe to print: printable, one line, bounded."""
    text = "".join(c if c.isprintable() else " " for c in (value or ""))
    return " ".join(text.split())[:MAX_DESCRIPTION]


async def exchange_code(upstream: UpstreamSettings, code: str, redirect_uri: str, verifier: str) -> str:
    """The refresh token the token endpoint gives for ``code``; LoginError(EXIT_TOKEN_ENDPOINT) otherwise."""
    cred = upstream.credential
    assert cred.token_url is not None and cred.client_id is not None
    secret = _client_secret(upstream)
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "code_verifier": verifier,
    }
    headers = {"Accept": "application/json"}
    if secret is not None and cred.auth_method == "client_secret_basic":
        # RFC 6749 2.3.1: each part form-encoded before the base64.
        pair = f"{quote(cred.client_id, safe='')}:{quote(secret, safe='')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
    else:
        form["client_id"] = cred.client_id
        if secret is not None:
            form["client_secret"] = secret
    where = loggable_url(cred.token_url)
    try:
        ssl_context = trust_context(upstream.ca_file) if cred.token_url.startswith("https:") else None
    except (OSError, ValueError):
        raise LoginError(EXIT_CONFIG, f"upstreams.{upstream.name}.ca_file cannot be loaded") from None
    timeout = aiohttp.ClientTimeout(total=upstream.timeout_seconds)
    problem: str | None = None
    status, raw = 0, b""
    try:
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session, session.post(
            cred.token_url, data=form, headers=headers, ssl=ssl_context if ssl_context is not None else True,
            allow_redirects=False,
        ) as resp:
            status, raw = resp.status, await resp.read()
    except TimeoutError:
        problem = f"the token endpoint {where} did not answer within {upstream.timeout_seconds:g} s"
    except (aiohttp.ClientError, OSError) as exc:
        problem = f"the token endpoint {where} cannot be reached ({type(exc).__name__})"
    if problem is not None:
        raise LoginError(EXIT_TOKEN_ENDPOINT, problem)
    try:
        body: Any = json.loads(raw)
    except ValueError:
        body = None
    if status != 200:
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            said = _one_line(body["error"])
            description = _one_line(body.get("error_description") if isinstance(body.get("error_description"), str)
                                    else None)
            raise LoginError(
                EXIT_TOKEN_ENDPOINT,
                f"the token endpoint {where} refused the code: {said}" + (f" ({description})" if description else ""),
            )
        raise LoginError(EXIT_TOKEN_ENDPOINT, f"the token endpoint {where} answered {status}")
    refresh = body.get("refresh_token") if isinstance(body, dict) else None
    if not isinstance(refresh, str) or not refresh:
        raise LoginError(
            EXIT_TOKEN_ENDPOINT,
            f"the token endpoint {where} issued no refresh token: the app or its scopes do not grant offline "
            "access (some providers need a scope such as offline_access)",
        )
    return refresh


async def store_grant(backend: SecretBackend, secret_id: str, refresh_token: str) -> None:
    """``{"refresh_token": ...}`` under ``secret_id``: replacing what is there at the version read, or creating it."""
    for _ in range(WRITE_ATTEMPTS):
        try:
            expected = version_of(await backend.fetch(secret_id))
        except SecretNotFound:
            expected = None
        result = await backend.write(secret_id, {"refresh_token": refresh_token}, expected)
        if not isinstance(result, WriteConflict):
            return
    raise StoreError("conflict", f"the secret kept changing while it was written ({WRITE_ATTEMPTS} tries)")


@dataclass
class _Callback:
    """What the browser's redirect brought, once."""

    code: str | None = None
    error: LoginError | None = None


class _Receiver:
    """The loopback server: the first request to /callback ends the wait; anything else is 404."""

    def __init__(self, state: str) -> None:
        self.state = state
        self.arrived: asyncio.Future[_Callback] = asyncio.get_running_loop().create_future()
        #: set once the login is over: the browser's page (status, text) says how it ended
        self.outcome: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path != "/callback" or request.method != "GET" or self.arrived.done():
            return web.Response(status=404, text="Not found.\n")
        query: Mapping[str, str] = request.query
        if not secrets.compare_digest(query.get("state", "").encode(), self.state.encode()):
            failure = LoginError(
                EXIT_REFUSED, "the redirect's state is not this login's: it answers another request; start again"
            )
            self.arrived.set_result(_Callback(error=failure))
        elif "error" in query:
            description = _one_line(query.get("error_description"))
            failure = LoginError(
                EXIT_REFUSED,
                f"the provider did not grant access: {_one_line(query['error'])}"
                + (f" ({description})" if description else ""),
            )
            self.arrived.set_result(_Callback(error=failure))
        elif not query.get("code"):
            self.arrived.set_result(_Callback(error=LoginError(EXIT_REFUSED, "the redirect carries no code")))
        else:
            self.arrived.set_result(_Callback(code=query["code"]))
        status, page = await asyncio.shield(self.outcome)
        return web.Response(status=status, text=page + "\n", headers={"Cache-Control": "no-store"})


def _listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        raise LoginError(EXIT_CONFIG, f"cannot listen on 127.0.0.1:{port} ({exc.strerror})") from None
    sock.listen(16)
    sock.setblocking(False)
    return sock


async def login(
    settings: Settings,
    upstream_name: str,
    client_id: str,
    port: int = 0,
    wait_seconds: float = DEFAULT_TIMEOUT_SECONDS,
    out: TextIO = sys.stdout,
) -> int:
    """The whole flow; the exit code. Raises LoginError for a failure (the CLI prints it)."""
    upstream, secret_id = _target(settings, upstream_name, client_id)
    try:
        backend = await start_backend(settings.secrets)  # a store that cannot start fails before the browser step
    except BackendStartError as exc:
        raise LoginError(EXIT_STORE, str(exc)) from None
    try:
        return await _login(upstream, secret_id, client_id, backend, port, wait_seconds, out)
    finally:
        await backend.close()


async def _login(
    upstream: UpstreamSettings, secret_id: str, client_id: str, backend: SecretBackend, port: int,
    wait_seconds: float, out: TextIO,
) -> int:
    pkce = Pkce.new()
    sock = _listen(port)
    port = sock.getsockname()[1]
    redirect_uri = f"http://127.0.0.1:{port}/callback"
    receiver = _Receiver(pkce.state)
    server = web.Server(receiver.handle, access_log=None)
    runner = web.ServerRunner(server, handle_signals=False)
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    page = (500, "The login did not finish; see the terminal.")  # the browser's page, unless replaced
    try:
        print(
            f"Open this URL in a browser and grant access for client {client_id} to upstream {upstream.name}:\n\n"
            f"  {authorize_url(upstream, redirect_uri, pkce)}\n\n"
            f"Waiting for the redirect to {redirect_uri} (up to {wait_seconds:g} s)...",
            file=out, flush=True,
        )
        try:
            callback = await asyncio.wait_for(asyncio.shield(receiver.arrived), wait_seconds)
        except TimeoutError:
            raise LoginError(EXIT_TIMEOUT, f"no redirect came to {redirect_uri} within {wait_seconds:g} s") from None
        if callback.error is not None:
            raise callback.error
        assert callback.code is not None
        refresh = await exchange_code(upstream, callback.code, redirect_uri, pkce.verifier)
        try:
            await store_grant(backend, secret_id, refresh)
        except StoreError as exc:
            raise LoginError(
                EXIT_STORE, f"the grant could not be stored under {secret_id} ({backend.name} backend): "
                f"{exc.detail or exc.kind}"
            ) from None
        page = (200, "Access granted and stored. You can close this window.")
        print(f"Stored the grant for client {client_id} under {secret_id} ({backend.name} backend).", file=out)
        return EXIT_OK
    except LoginError as exc:
        page = (400, f"The login failed: {exc}")
        raise
    finally:
        if not receiver.outcome.done():
            receiver.outcome.set_result(page)
        await runner.cleanup()


def run_login(
    settings: Settings, upstream_name: str, client_id: str, port: int, timeout: float
) -> int:
    """For the CLI: the exit code, a failure printed as one ``error:`` line on stderr."""
    try:
        return asyncio.run(login(settings, upstream_name, client_id, port, timeout))
    except LoginError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


__all__ = ["DEFAULT_TIMEOUT_SECONDS", "LoginError", "Pkce", "authorize_url", "login", "run_login"]
