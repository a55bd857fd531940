"""A real OAuth 2.0 authorization server for tests, built from Authlib's server components.

Authlib's ``AuthorizationServer`` (its Flask integration) with its own grants, served
by werkzeug on 127.0.0.1 (random port) in a thread:

- ``client_credentials``;
- ``refresh_token`` WITH rotation: every refresh issues a new refresh token and
  revokes the old one (``rotate = False`` keeps the old one, as GitHub Apps without
  expiring tokens do);
- ``authorization_code`` with PKCE (``S256`` required) on ``/authorize``, approved at
  once for ``login_user`` (or a ``login_hint``), redirecting to a loopback
  ``redirect_uri`` on any port (RFC 8252);
- RFC 8693 token exchange (``urn:ietf:params:oauth:grant-type:token-exchange``) as a
  custom grant on Authlib's ``BaseGrant``: the ``subject_token`` is checked with
  ``subject_verifier`` (tests plug in their IdP's key) and the new token is bound to
  that subject and the requested ``audience``.

Client authentication is ``client_secret_basic`` or ``client_secret_post``, whichever
the client was registered with (the other is refused, as real servers do). Answers
carry ``expires_in`` (``access_lifetime``; None leaves it out).

``/resource/...`` is a protected resource that accepts only live access tokens from
here (401 otherwise) and echoes what it saw (subject, client, audience, scope, path):
an upstream that refuses a revoked or expired token for real.

Controls for tests: ``requests`` (token requests by grant type), ``fail_status`` (answer
every token request with that status and no token: a plain-text body, or with ``fail_error``
set an RFC 6749 5.2 JSON error with that code, as providers answer during an outage), ``hang()`` / ``release()`` (token requests wait),
``refuse(client_id)`` (the client is unknown: ``invalid_client``), ``revoke_grant`` /
``revoke_access`` / ``revoke_user``. ``issue_grant`` seeds a refresh token as if the user
had gone through the authorization-code flow.

Every token, code and client secret it makes is registered with the leak check
(tests/support/leaks.py): none may appear in any output of the run.
"""

from __future__ import annotations

import json
import logging
import secrets as _random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest
from authlib.integrations.flask_oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import grants
from authlib.oauth2.rfc6749.errors import InvalidGrantError, InvalidRequestError, OAuth2Error, UnauthorizedClientError
from authlib.oauth2.rfc7636 import CodeChallenge
from flask import Flask, Response, jsonify, request
from werkzeug.serving import make_server

from tests.support.leaks import make_secret, register_secret

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
AUTH_METHODS = ["client_secret_basic", "client_secret_post"]
#: how long a hung token request waits at most (a test that forgets release() still ends)
HANG_LIMIT_SECONDS = 60.0

# Authlib logs issued tokens at debug level ("Issue token ..."); the suite's root logger
# records debug into the output the leak check reads.
for _noisy in ("authlib", "werkzeug"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)


@dataclass
class User:
    id: str

    def get_user_id(self) -> str:
        return self.id


@dataclass
class Client:
    client_id: str
    client_secret: str
    auth_method: str = "client_secret_basic"
    grant_types: tuple[str, ...] = ("client_credentials",)
    scope: str = ""
    redirect_uris: tuple[str, ...] = ()
    #: token exchange: the audiences this client may ask for
    audiences: tuple[str, ...] = ()

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        return self.redirect_uris[0] if self.redirect_uris else None

    def get_allowed_scope(self, scope: str | None) -> str:
        if not scope:
            return self.scope
        allowed = set(self.scope.split())
        return " ".join(s for s in scope.split() if s in allowed)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        if redirect_uri in self.redirect_uris:
            return True
        # RFC 8252 7.3: a loopback redirect matches on any port.
        got = urlsplit(redirect_uri)
        for registered in self.redirect_uris:
            want = urlsplit(registered)
            if (
                got.scheme == want.scheme == "http"
                and got.hostname == want.hostname
                and got.hostname in ("127.0.0.1", "::1")
                and got.path == want.path
            ):
                return True
        return False

    def check_client_secret(self, client_secret: str) -> bool:
        return _random.compare_digest(client_secret, self.client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return endpoint != "token" or method == self.auth_method

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code" and "authorization_code" in self.grant_types

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.grant_types


@dataclass
class Token:
    client_id: str
    access_token: str
    scope: str
    issued_at: float
    expires_in: int
    user_id: str | None = None
    refresh_token: str | None = None
    audience: str | None = None
    grant_type: str = ""
    access_revoked: bool = False
    refresh_revoked: bool = False

    def check_client(self, client: Client) -> bool:
        return self.client_id == client.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return self.expires_in

    def is_expired(self) -> bool:
        return time.time() >= self.issued_at + self.expires_in

    def is_revoked(self) -> bool:
        return self.access_revoked

    def get_user(self) -> User | None:
        return User(self.user_id) if self.user_id else None


@dataclass
class AuthorizationCode:
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    user_id: str
    code_challenge: str | None
    code_challenge_method: str | None

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope


@dataclass
class _State:
    clients: dict[str, Client] = field(default_factory=dict)
    tokens: dict[str, Token] = field(default_factory=dict)  # by access token
    grants: dict[str, Token] = field(default_factory=dict)  # by refresh token
    codes: dict[str, AuthorizationCode] = field(default_factory=dict)
    refused: set[str] = field(default_factory=set)


class _ClientCredentials(grants.ClientCredentialsGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = AUTH_METHODS


class _AuthorizationCode(grants.AuthorizationCodeGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = AUTH_METHODS

    def save_authorization_code(self, code: str, req: Any) -> None:
        server: OAuthServer = self.server.owner
        data = req.payload.data
        server.state.codes[register_secret(code)] = AuthorizationCode(
            code=code,
            client_id=req.client.client_id,
            redirect_uri=req.payload.redirect_uri or "",
            scope=req.payload.scope or "",
            user_id=req.user.id,
            code_challenge=data.get("code_challenge"),
            code_challenge_method=data.get("code_challenge_method"),
        )

    def query_authorization_code(self, code: str, client: Client) -> AuthorizationCode | None:
        found = self.server.owner.state.codes.get(code)
        return found if found is not None and found.client_id == client.client_id else None

    def delete_authorization_code(self, authorization_code: AuthorizationCode) -> None:
        self.server.owner.state.codes.pop(authorization_code.code, None)

    def authenticate_user(self, authorization_code: AuthorizationCode) -> User:
        return User(authorization_code.user_id)


class _RefreshToken(grants.RefreshTokenGrant):
    TOKEN_ENDPOINT_AUTH_METHODS = AUTH_METHODS
    INCLUDE_NEW_REFRESH_TOKEN = True

    def authenticate_refresh_token(self, refresh_token: str) -> Token | None:
        found = self.server.owner.state.grants.get(refresh_token)
        return found if found is not None and not found.refresh_revoked else None

    def authenticate_user(self, refresh_token: Token) -> User | None:
        return refresh_token.get_user()

    def issue_token(self, user: User, refresh_token: Token) -> dict[str, Any]:
        owner: OAuthServer = self.server.owner
        token: dict[str, Any] = self.generate_token(
            user=user, scope=self.request.payload.scope or refresh_token.get_scope(),
            include_refresh_token=owner.rotate,
        )
        if not owner.rotate:
            token["refresh_token"] = refresh_token.refresh_token  # the same grant goes on
        return token

    def revoke_old_credential(self, refresh_token: Token) -> None:
        if self.server.owner.rotate:
            refresh_token.refresh_revoked = True


class _TokenExchange(grants.BaseGrant, grants.TokenEndpointMixin):
    """RFC 8693: the caller's token (a JWT from the tests' IdP) for one with another audience."""

    GRANT_TYPE = TOKEN_EXCHANGE
    TOKEN_ENDPOINT_AUTH_METHODS = AUTH_METHODS

    def validate_token_request(self) -> None:
        client = self.authenticate_token_endpoint_client()
        if not client.check_grant_type(self.GRANT_TYPE):
            raise UnauthorizedClientError("The client may not exchange tokens.")
        form = self.request.form
        subject_token = form.get("subject_token")
        token_type = form.get("subject_token_type")
        if not subject_token or token_type not in (JWT_TOKEN_TYPE, ACCESS_TOKEN_TYPE):
            raise InvalidRequestError("subject_token and a supported subject_token_type are required.")
        audience = form.get("audience")
        if audience is not None and audience not in client.audiences:
            error = InvalidRequestError("The audience is not one this client may ask for.")
            error.error = "invalid_target"
            raise error
        verifier = self.server.owner.subject_verifier
        subject = verifier(subject_token) if verifier is not None else None
        if subject is None:
            raise InvalidGrantError("The subject token is not valid.")
        self.request.client = client
        self.request.user = User(subject)
        self.request.exchange_audience = audience

    def create_token_response(self) -> tuple[int, dict[str, Any], list[tuple[str, str]]]:
        token: dict[str, Any] = self.generate_token(
            user=self.request.user, scope=self.request.payload.scope, include_refresh_token=False
        )
        token["issued_token_type"] = ACCESS_TOKEN_TYPE
        self.save_token(token)
        return 200, token, self.TOKEN_RESPONSE_HEADER


class OAuthServer:
    """The authorization server and its protected resource; see the module docstring."""

    def __init__(self, *, access_lifetime: int | None = 3600) -> None:
        self.state = _State()
        #: seconds every access token lives; None: answers carry no expires_in (the server's
        #: tokens then live an hour)
        self.access_lifetime = access_lifetime
        #: refresh rotates the refresh token (the old one is revoked)
        self.rotate = True
        #: who approves an authorization request that names no login_hint
        self.login_user = "alice"
        #: token exchange: the subject of a valid subject token, None for an invalid one
        self.subject_verifier: Callable[[str], str | None] | None = None
        #: answer every token request with this status and no token
        self.fail_status: int | None = None
        #: with fail_status: the body is ``{"error": fail_error, ...}`` (RFC 6749 5.2), not plain text
        self.fail_error: str | None = None
        self.requests: Counter[str] = Counter()  # token requests by grant type
        self.resource_hits = 0
        self._lock = threading.Lock()
        self._grant_lock = threading.Lock()
        self._hang = threading.Event()
        self._released = threading.Event()
        self.hanging = 0  # token requests waiting in hang()
        self.app = self._make_app()
        self._server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.port = self._server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="oauth-server", daemon=True)
        self._thread.start()

    # ---- addresses

    @property
    def token_url(self) -> str:
        return self.url + "/token"

    @property
    def authorize_url(self) -> str:
        return self.url + "/authorize"

    @property
    def resource_url(self) -> str:
        return self.url + "/resource"

    # ---- set-up

    def register_client(
        self,
        client_id: str,
        *,
        grant_types: tuple[str, ...] = ("client_credentials",),
        auth_method: str = "client_secret_basic",
        scope: str = "",
        redirect_uris: tuple[str, ...] = (),
        audiences: tuple[str, ...] = (),
        client_secret: str | None = None,
    ) -> Client:
        client = Client(
            client_id=client_id,
            client_secret=client_secret or make_secret(f"cs-{client_id}"),
            auth_method=auth_method,
            grant_types=grant_types,
            scope=scope,
            redirect_uris=redirect_uris,
            audiences=audiences,
        )
        with self._lock:
            self.state.clients[client_id] = client
        return client

    def issue_grant(self, client_id: str, user_id: str, scope: str = "") -> str:
        """A refresh token for ``user_id`` at ``client_id``, as the authorization-code flow leaves one."""
        refresh = register_secret(f"rt-{_random.token_hex(16)}")
        with self._lock:
            self.state.grants[refresh] = Token(
                client_id=client_id, access_token="", scope=scope, issued_at=time.time(),
                expires_in=0, user_id=user_id, refresh_token=refresh, grant_type="seed",
            )
        return refresh

    # ---- controls

    def refuse(self, client_id: str) -> None:
        """The client no longer exists here: its token requests get ``invalid_client``."""
        with self._lock:
            self.state.refused.add(client_id)

    def revoke_grant(self, refresh_token: str) -> None:
        with self._lock:
            grant = self.state.grants.get(refresh_token)
            if grant is not None:
                grant.refresh_revoked = True

    def revoke_user(self, user_id: str) -> None:
        """Every grant and access token of this user is revoked (the user withdrew consent)."""
        with self._lock:
            for token in [*self.state.grants.values(), *self.state.tokens.values()]:
                if token.user_id == user_id:
                    token.refresh_revoked = token.access_revoked = True

    def revoke_access(self, access_token: str | None = None) -> None:
        """One access token (or every one) stops working at the resource."""
        with self._lock:
            for token in self.state.tokens.values():
                if access_token is None or token.access_token == access_token:
                    token.access_revoked = True

    def live_grants(self, user_id: str) -> list[str]:
        """The refresh tokens of this user that still work."""
        with self._lock:
            return [
                t.refresh_token for t in self.state.grants.values()
                if t.user_id == user_id and not t.refresh_revoked and t.refresh_token
            ]

    def access_tokens(self) -> list[Token]:
        with self._lock:
            return list(self.state.tokens.values())

    def hang(self) -> None:
        """Token requests from now on wait until ``release`` (or HANG_LIMIT_SECONDS)."""
        self._released.clear()
        self._hang.set()

    def release(self) -> None:
        self._hang.clear()
        self._released.set()

    @property
    def total_requests(self) -> int:
        with self._lock:
            return sum(self.requests.values())

    def close(self) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    # ---- the app

    def _make_app(self) -> Flask:
        app = Flask("oauth-test-server")
        app.config["OAUTH2_REFRESH_TOKEN_GENERATOR"] = lambda *a, **k: register_secret(f"rt-{_random.token_hex(16)}")
        app.config["OAUTH2_ACCESS_TOKEN_GENERATOR"] = lambda *a, **k: register_secret(f"at-{_random.token_hex(16)}")
        server = AuthorizationServer()
        server.owner = self  # type: ignore[attr-defined]
        server.init_app(app, query_client=self._query_client, save_token=self._save_token)
        generator = server._token_generators["default"]
        generator.expires_generator = lambda client, grant_type: self.access_lifetime or 3600
        server.register_grant(_ClientCredentials)
        server.register_grant(_AuthorizationCode, [CodeChallenge(required=True)])
        server.register_grant(_RefreshToken)
        server.register_grant(_TokenExchange)
        self.authorization = server

        @app.post("/token")
        def token() -> Response:
            grant_type = request.form.get("grant_type", "")
            with self._lock:
                self.requests[grant_type] += 1
            if self._hang.is_set():
                with self._lock:
                    self.hanging += 1
                self._released.wait(HANG_LIMIT_SECONDS)
            if self.fail_status is not None:
                if self.fail_error is None:
                    return Response("upstream trouble", status=self.fail_status)
                body = {"error": self.fail_error, "error_description": "The service is not available. Try again later."}
                return Response(json.dumps(body), status=self.fail_status, content_type="application/json")
            # One grant decision at a time, as a database transaction makes it: two uses of
            # one refresh token cannot both see it unrevoked.
            with self._grant_lock:
                return server.create_token_response()  # type: ignore[no-any-return]

        @app.get("/authorize")
        def authorize() -> Response:
            user = User(request.args.get("login_hint") or self.login_user)
            try:
                grant = server.get_consent_grant(end_user=user)
            except OAuth2Error as error:
                return jsonify(dict(error.get_body())), 400  # type: ignore[return-value]
            return server.create_authorization_response(grant=grant, grant_user=user)  # type: ignore[no-any-return]

        @app.route("/resource", defaults={"rest": ""}, methods=["GET", "POST"])
        @app.route("/resource/<path:rest>", methods=["GET", "POST"])
        def resource(rest: str) -> Response:
            with self._lock:
                self.resource_hits += 1
            scheme, _, value = request.headers.get("Authorization", "").partition(" ")
            with self._lock:
                token = self.state.tokens.get(value) if scheme.lower() == "bearer" else None
                live = token is not None and not token.is_revoked() and not token.is_expired()
            if token is None or not live:
                return Response(
                    json.dumps({"error": "invalid_token"}), status=401, content_type="application/json",
                    headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
                )
            return jsonify(
                path="/" + rest, query=request.query_string.decode(), client_id=token.client_id,
                subject=token.user_id, audience=token.audience, scope=token.scope, grant=token.grant_type,
                token_id=token.access_token[-6:],
            )

        return app

    def _query_client(self, client_id: str) -> Client | None:
        with self._lock:
            if client_id in self.state.refused:
                return None
            return self.state.clients.get(client_id)

    def _save_token(self, token: dict[str, Any], req: Any) -> None:
        grant_type = req.payload.grant_type or ""
        user = req.user
        record = Token(
            client_id=req.client.client_id,
            access_token=token["access_token"],
            scope=token.get("scope", ""),
            issued_at=time.time(),
            expires_in=int(token.get("expires_in", 3600)),
            user_id=user.id if user is not None else None,
            refresh_token=token.get("refresh_token"),
            audience=getattr(req, "exchange_audience", None),
            grant_type=grant_type,
        )
        with self._lock:
            self.state.tokens[record.access_token] = record
            if record.refresh_token and record.refresh_token not in self.state.grants:
                self.state.grants[record.refresh_token] = record
        if self.access_lifetime is None:
            token.pop("expires_in", None)


@pytest.fixture
def oauth_server() -> Iterator[OAuthServer]:
    """A fresh authorization server per test."""
    server = OAuthServer()
    yield server
    server.close()
