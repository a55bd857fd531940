"""A real OpenID Connect identity provider for tests: discovery, JWKS and token minting.

It listens on 127.0.0.1 (random port) with aiohttp and serves

- ``/.well-known/openid-configuration`` naming ``issuer`` and ``jwks_uri``,
- ``/jwks.json`` with the public halves of the published keys,
- ``/attacker/jwks.json``, a key set a hostile token may point at with ``jku``/``x5u``
  (the sidecar must never fetch it).

Tests rotate keys (``rotate``), count requests per path (``hits``), make the JWKS
hang (``hang``) or fail (``fail_status``), and stop the listener (``go_down``).

For tests that drive the real CLI (synchronous code), ``ThreadedIdP`` runs the provider
on its own event loop thread, and ``BlackHole`` is a provider that is down the hard
way: it accepts connections and never answers.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import hmac
import json
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from tests.support.upstream import Connections, close_connections, tracking

DISCOVERY = "/.well-known/openid-configuration"
JWKS = "/jwks.json"
ATTACKER_JWKS = "/attacker/jwks.json"

T = TypeVar("T")

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@dataclass(frozen=True)
class SigningKey:
    """A private key the provider signs with, and its public JWK."""

    kid: str
    alg: str
    private: PrivateKey

    @property
    def public_jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig"}

    @property
    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@functools.cache
def _private_key(kind: str, serial: int) -> PrivateKey:
    # Generated once per test session: RSA key generation dominates test time otherwise.
    del serial
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "rsa1024":
        # Deliberately weak: the sidecar must refuse to load it from a JWKS.
        return rsa.generate_private_key(public_exponent=65537, key_size=1024)
    if kind == "ec256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(kind)


_ALG_FOR_KIND = {"rsa": "RS256", "rsa1024": "RS256", "ec256": "ES256", "ec384": "ES384", "ed25519": "EdDSA"}


def make_key(kid: str, kind: str = "rsa", serial: int = 0, alg: str | None = None) -> SigningKey:
    """A signing key; the same (kind, serial) gives the same key material within a session."""
    return SigningKey(kid=kid, alg=alg or _ALG_FOR_KIND[kind], private=_private_key(kind, serial))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: object) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def hs256_token(claims: dict[str, Any], secret: bytes, header: dict[str, Any] | None = None) -> str:
    """An HS256 token built by hand: PyJWT rightly refuses to HMAC with a PEM key."""
    signing_input = f"{b64json({'alg': 'HS256', 'typ': 'JWT', **(header or {})})}.{b64json(claims)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def unsigned_token(claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
    """An ``alg: none`` token (empty signature)."""
    return f"{b64json({'alg': 'none', 'typ': 'JWT', **(header or {})})}.{b64json(claims)}."


class IdentityProvider:
    """An in-process OIDC provider on 127.0.0.1; use ``async with IdentityProvider() as idp``."""

    def __init__(
        self, keys: list[SigningKey] | None = None, *, issuer_path: str = "/realms/test",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.keys: list[SigningKey] = list(keys) if keys is not None else [make_key("key-1")]
        self.tls = tls  # serve https (the certificate must name 127.0.0.1)
        #: /redirect/<name> answers 302 to redirects[name]
        self.redirects: dict[str, str] = {}
        self.attacker_keys: list[SigningKey] = []
        self.issuer_path = issuer_path
        self.hits: Counter[str] = Counter()
        self.hang = False
        self.delay = 0.0
        self.fail_status: int | None = None
        self.discovery_overrides: dict[str, Any] = {}
        self.extra_jwks: list[Any] = []  # raw entries appended to the JWKS
        self._release = asyncio.Event()
        self._runner: web.AppRunner | None = None
        #: every connection a request came in on: ``stop`` closes what is left open
        self._connections: Connections = {}
        self.port = 0

    # ---- lifecycle

    async def __aenter__(self) -> IdentityProvider:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        app = web.Application(middlewares=[tracking(self._connections)])
        app.router.add_get(self.issuer_path + DISCOVERY, self._discovery)
        app.router.add_get(JWKS, self._jwks)
        app.router.add_get(ATTACKER_JWKS, self._attacker_jwks)
        app.router.add_get("/redirect/{name}", self._redirect)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.tls)
        await site.start()
        if self.port == 0:
            self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening and close every connection, sockets included, before returning."""
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await close_connections(self._connections)

    def release_hang(self) -> None:
        """Let requests held by ``hang`` answer now (with the keys published by then)."""
        self.hang = False
        self._release.set()
        self._release = asyncio.Event()

    async def go_down(self) -> None:
        """Stop listening: connections are refused until ``come_back``."""
        await self.stop()

    async def come_back(self) -> None:
        self._release = asyncio.Event()
        await self.start()

    # ---- addresses

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def issuer(self) -> str:
        return self.base_url + self.issuer_path

    @property
    def jwks_url(self) -> str:
        return self.base_url + JWKS

    @property
    def attacker_jwks_url(self) -> str:
        return self.base_url + ATTACKER_JWKS

    # ---- keys

    def rotate(self, new: SigningKey) -> None:
        """Publish only ``new`` from now on."""
        self.keys = [new]

    def add(self, key: SigningKey) -> None:
        self.keys.append(key)

    # ---- tokens

    def claims(self, **overrides: Any) -> dict[str, Any]:
        """Claims of a valid token: issuer, one hour of validity; ``None`` values are dropped."""
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.issuer, "iat": now, "exp": now + 3600}
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def mint(
        self,
        key: SigningKey | None = None,
        headers: dict[str, Any] | None = None,
        alg: str | None = None,
        **claims: Any,
    ) -> str:
        """A token signed by ``key`` (default: the first published key) with ``claims``.

        ``headers`` are added to the JOSE header; a ``None`` value removes one (``kid=None``).
        """
        key = key or self.keys[0]
        header = {k: v for k, v in {"kid": key.kid, **(headers or {})}.items() if v is not None}
        return jwt.encode(self.claims(**claims), key.private, algorithm=alg or key.alg, headers=header)

    # ---- handlers

    async def _discovery(self, request: web.Request) -> web.Response:
        self.hits["discovery"] += 1
        document = {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_url,
            "authorization_endpoint": self.issuer + "/auth",
            "token_endpoint": self.issuer + "/token",
            "id_token_signing_alg_values_supported": ["RS256"],
            **self.discovery_overrides,
        }
        return web.json_response(document)

    async def _jwks(self, request: web.Request) -> web.Response:
        self.hits["jwks"] += 1
        if self.hang:
            await self._release.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_status is not None:
            return web.json_response({"error": "unavailable"}, status=self.fail_status)
        return web.json_response({"keys": [k.public_jwk for k in self.keys] + self.extra_jwks})

    async def _redirect(self, request: web.Request) -> web.Response:
        self.hits["redirect"] += 1
        raise web.HTTPFound(self.redirects[request.match_info["name"]])

    async def _attacker_jwks(self, request: web.Request) -> web.Response:
        self.hits["attacker"] += 1
        return web.json_response({"keys": [k.public_jwk for k in self.attacker_keys]})


class ThreadedIdP:
    """The test identity provider on its own loop, so blocking test code cannot stall it.

    ``start=False`` leaves it down (its port may be set first, to take over from a
    ``BlackHole``); ``come_back()`` starts it.
    """

    def __init__(self, idp: IdentityProvider | None = None, *, start: bool = True) -> None:
        self.loop = asyncio.new_event_loop()
        self.idp = idp or IdentityProvider(issuer_path="/realms/corp")
        self.thread = threading.Thread(target=self.loop.run_forever, name="idp", daemon=True)
        self.thread.start()
        if start:
            try:
                self.run(self.idp.start())
            except BaseException:
                self._stop_loop()
                raise

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        """Run a coroutine on the provider's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` on the provider's loop (asyncio objects are not thread-safe)."""

        async def call() -> T:
            return fn()

        result: T = self.run(call())
        return result

    def go_down(self) -> None:
        """Stop listening: connections are refused until ``come_back``."""
        self.run(self.idp.go_down())

    def come_back(self) -> None:
        self.run(self.idp.come_back())

    def close(self) -> None:
        try:
            self.run(self.idp.stop())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        assert not self.thread.is_alive(), "the identity provider's loop did not stop"
        self.loop.close()


class BlackHole:
    """A listener on 127.0.0.1 that accepts every connection and never answers.

    What a provider behind a broken load balancer or a dropped route looks like: TCP
    connects, the request goes out, nothing comes back. ``close()`` stops listening
    (the port can then be taken over) but keeps holding what it accepted, as a real
    black hole would, until ``release()``.
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._held: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="black-hole", daemon=True)
        self._thread.start()

    @property
    def accepted(self) -> int:
        """Connections accepted so far."""
        with self._lock:
            return len(self._held)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                self._held.append(conn)

    def close(self) -> None:
        """Stop accepting; the port is free for another listener."""
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        except OSError:
            pass
        self._listener.close()
        self._thread.join(5)

    def release(self) -> None:
        """Close the listener and every connection it is holding."""
        self.close()
        with self._lock:
            held, self._held = self._held, []
        for conn in held:
            conn.close()
