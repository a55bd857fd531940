"""Every refusal and failure the sidecar returns, and the one mapping to HTTP.

The hierarchy::

    SidecarError                      status  code
    ├── BadRequest                    400     bad_request
    │   └── UnsupportedHttpVersion    505     bad_request
    ├── InvalidClientId               400     invalid_client_id
    ├── MissingIdentity               401     missing_identity
    ├── InvalidToken                  401     invalid_token
    ├── ConsentRequired               401     consent_required
    ├── ClientNotAllowed              403     client_not_allowed
    ├── DestinationNotAllowed         403     destination_not_allowed
    ├── NoCredential                  403     no_credential
    ├── CredentialRefused             403     credential_refused
    ├── UnknownUpstream               404     unknown_upstream
    ├── UpstreamUnreachable           502     upstream_unreachable
    ├── SecretStoreUnavailable        503     secret_store_unavailable
    ├── IdentityProviderUnavailable   503     identity_provider_unavailable
    ├── TokenEndpointUnavailable      503     token_endpoint_unavailable
    └── UpstreamTimeout               504     upstream_timeout

    ConfigError (not an HTTP error: a list of "field.path: problem" lines)
    UpstreamBodyError (a ConnectionError: an answer's body broke off after its head went on)

Messages are written by us, never copied from a library exception, so no
secret or URL with an injected key can reach a response or a log line through
them. ``reason`` is a short machine-readable detail for the access log (for
example ``expired`` for an invalid token); it is never a secret either.
"""

from __future__ import annotations

import json

from sidecar.client_id import CLIENT_ID_PATTERN


class SidecarError(Exception):
    """A refusal or failure that becomes the contract's JSON error response."""

    status = 500
    code = "internal_error"
    default_message = "The sidecar failed to handle the request."

    def __init__(self, message: str | None = None, *, reason: str | None = None) -> None:
        self.message = message or self.default_message
        self.reason = reason or self.code
        #: the secret cache's outcome when the error came from a lookup (hit/miss/negative/...)
        self.lookup: str | None = None
        super().__init__(self.message)

    def body(self) -> bytes:
        """The JSON body sent to the app."""
        return json.dumps({"error": self.code, "message": self.message}).encode()


class BadRequest(SidecarError):
    status = 400
    code = "bad_request"
    default_message = "The request is malformed and will not be forwarded."


class UnsupportedHttpVersion(BadRequest):
    """A well-formed request line naming an HTTP version other than 1.0 and 1.1 (garbage is a 400)."""

    status = 505
    default_message = "Only HTTP/1.0 and HTTP/1.1 are served here."


class InvalidClientId(SidecarError):
    status = 400
    code = "invalid_client_id"
    default_message = f"The client ID must match ^{CLIENT_ID_PATTERN.pattern}$."


class MissingIdentity(SidecarError):
    status = 401
    code = "missing_identity"
    default_message = "No client identity was sent with the request."


class InvalidToken(SidecarError):
    status = 401
    code = "invalid_token"
    default_message = "The identity token is missing, expired or not valid."


class ConsentRequired(SidecarError):
    """``oauth2_refresh_token``: no grant is stored for this user, or the provider no longer honours it.

    The user has to grant access (again); ``authorize_url``, when configured, is where.
    """

    status = 401
    code = "consent_required"
    default_message = "This user has not granted access to the upstream, or the grant was revoked."

    def __init__(
        self, message: str | None = None, *, reason: str | None = None, authorize_url: str | None = None
    ) -> None:
        super().__init__(message, reason=reason)
        self.authorize_url = authorize_url

    def body(self) -> bytes:
        out = {"error": self.code, "message": self.message}
        if self.authorize_url:
            out["authorize_url"] = self.authorize_url
        return json.dumps(out).encode()


class ClientNotAllowed(SidecarError):
    status = 403
    code = "client_not_allowed"
    default_message = "This client may not use this upstream."


class DestinationNotAllowed(SidecarError):
    status = 403
    code = "destination_not_allowed"
    default_message = "The destination is not a configured upstream."


class NoCredential(SidecarError):
    status = 403
    code = "no_credential"
    default_message = "No credential is stored for this client and upstream."


class CredentialRefused(SidecarError):
    """The token endpoint refused the stored client or the exchange (invalid_client, access_denied, ...)."""

    status = 403
    code = "credential_refused"
    default_message = "The token endpoint refused the credential for this client."


class UnknownUpstream(SidecarError):
    status = 404
    code = "unknown_upstream"
    default_message = "No upstream is configured under this name."


class UpstreamUnreachable(SidecarError):
    status = 502
    code = "upstream_unreachable"
    default_message = "The upstream could not be reached."


class SecretStoreUnavailable(SidecarError):
    status = 503
    code = "secret_store_unavailable"
    default_message = "The secret store is unavailable and no cached credential can be used."


class IdentityProviderUnavailable(SidecarError):
    """JWT mode: no signing keys have been loaded yet, so no token can be checked.

    Not an authentication failure (the token may well be good): a retryable outage.
    """

    status = 503
    code = "identity_provider_unavailable"
    default_message = "The identity provider's signing keys could not be loaded; the token cannot be checked yet."


class TokenEndpointUnavailable(SidecarError):
    """OAuth types: the token endpoint is unreachable, failing or slow, and no valid token is cached."""

    status = 503
    code = "token_endpoint_unavailable"
    default_message = "The OAuth token endpoint is unavailable and no valid access token is cached."


class UpstreamTimeout(SidecarError):
    status = 504
    code = "upstream_timeout"
    default_message = "The upstream did not answer in time."


def _refusals(cls: type[SidecarError]) -> list[type[SidecarError]]:
    """Every subclass of ``cls``, its subclasses' subclasses too, in declaration order."""
    return [c for sub in cls.__subclasses__() for c in (sub, *_refusals(sub))]


#: Every refusal's code, in declaration order: each class above, written once (a subclass
#: that keeps its parent's code is listed once).
ERROR_CODES: tuple[str, ...] = tuple(dict.fromkeys(cls.code for cls in _refusals(SidecarError)))


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` holds one "path: message" line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class UpstreamBodyError(ConnectionError):
    """The upstream broke off or garbled a response body after its head was sent on.

    Kept here, not in transport/fast.py: a compiled (mypyc) module cannot define a
    subclass of ConnectionError.
    """
