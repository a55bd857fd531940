"""YAML and environment in, frozen validated settings out.

Every problem is collected with its field path (``upstreams.polygon.inject: ...``)
so ``credential-sidecar check`` can list all of them at once. Nothing here
touches the network or a secret store; of ours it imports errors, policy and net
(the host, port and URL helpers).
"""

from __future__ import annotations

import importlib.util
import ipaddress
import math
import os
import re
import ssl
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sidecar.client_id import CLIENT_ID_PATTERN
from sidecar.errors import ConfigError
from sidecar.net import (
    HostPort,
    parse_host_port,
    parse_listen,
    parse_passthrough,
    parse_upstream_url,
    split_http_url,
    trust_context,
    url_scheme,
)
from sidecar.policy import ip_literal, is_forbidden_address

# Defaults, named once. The contract's example config shows the same values.
DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:9901"
DEFAULT_SHUTDOWN_GRACE_SECONDS = 20.0
DEFAULT_WORKERS = 1
DEFAULT_LOG_LEVEL = "info"
DEFAULT_LOG_FORMAT = "json"
DEFAULT_TRACING_SERVICE_NAME = "credential-sidecar"
DEFAULT_TRACING_TIMEOUT_SECONDS = 5.0
DEFAULT_IDENTITY_HEADER = "X-Client-Id"
DEFAULT_JWT_HEADER = "Authorization"
DEFAULT_JWT_ALGORITHMS = ("RS256",)
DEFAULT_CLIENT_ID_CLAIMS = ("client_id", "azp", "sub")
DEFAULT_JWT_LEEWAY_SECONDS = 30.0
DEFAULT_JWKS_CACHE_SECONDS = 3600.0
DEFAULT_JWKS_COOLDOWN_SECONDS = 30.0
DEFAULT_JWKS_TIMEOUT_SECONDS = 5.0
DEFAULT_TOKEN_CACHE_ENTRIES = 10000
DEFAULT_SECRETS_BACKEND = "file"
DEFAULT_AWS_VERSION_STAGE = "AWSCURRENT"
DEFAULT_VAULT_MOUNT = "secret"
#: The pod's own service-account identity: nothing long-lived to mount, the usual way in a cluster.
DEFAULT_VAULT_AUTH_METHOD = "kubernetes"
#: Where Kubernetes mounts the pod's service-account token (the kubernetes and jwt methods' default).
DEFAULT_VAULT_JWT_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
DEFAULT_LOOKUP_TIMEOUT_SECONDS = 5.0
DEFAULT_CACHE_TTL_SECONDS = 300.0
DEFAULT_NEGATIVE_TTL_SECONDS = 30.0
DEFAULT_STALE_IF_ERROR_SECONDS = 3600.0
DEFAULT_CACHE_MAX_ENTRIES = 10000
DEFAULT_UPSTREAM_TIMEOUT_SECONDS = 30.0
DEFAULT_INJECT_FORMAT = "{secret}"
DEFAULT_CREDENTIAL_TYPE = "api_key"
DEFAULT_OAUTH_AUTH_METHOD = "client_secret_basic"

# Asymmetric signature algorithms PyJWT verifies. 'none' and HS* are never allowed:
# with an HMAC algorithm the public key itself would become the signing secret.
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)

UPSTREAM_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
HEADER_NAME_PATTERN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_ENV_PATTERN = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SECRET_PLACEHOLDERS = frozenset({"client_id", "upstream"})
#: A Secrets Manager ARN ending in its random suffix (sidecar/secrets/aws.py reads ARNs as partial only).
_COMPLETE_ARN = re.compile(r"-[A-Za-z0-9]{6}$")
#: ``upstreams.*.credential.type``: what the stored secret is and how the injected value is got
CREDENTIAL_TYPES = ("api_key", "oauth2_client_credentials", "oauth2_refresh_token", "token_exchange")
OAUTH_CREDENTIAL_TYPES = frozenset(CREDENTIAL_TYPES[1:])
OAUTH_AUTH_METHODS = ("client_secret_basic", "client_secret_post")
#: credential keys and the types they apply to (type and its presence checks are in ``credential``)
_CREDENTIAL_KEYS: dict[str, tuple[str, ...]] = {
    "token_url": CREDENTIAL_TYPES[1:],
    "client_id": ("oauth2_refresh_token", "token_exchange"),
    "client_secret": ("oauth2_refresh_token", "token_exchange"),
    "client_secret_file": ("oauth2_refresh_token", "token_exchange"),
    "auth_method": CREDENTIAL_TYPES[1:],
    "scopes": CREDENTIAL_TYPES[1:],
    "audience": ("token_exchange",),
    "authorize_url": ("oauth2_refresh_token",),
}
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")
BACKENDS = ("file", "aws", "vault")
VAULT_AUTH_METHODS = ("token", "approle", "kubernetes", "jwt")
#: secrets.vault.auth keys that apply to only some methods -> those methods.
_VAULT_AUTH_KEYS = {
    "role": ("kubernetes", "jwt"),
    "jwt_file": ("kubernetes", "jwt"),
    "token_file": ("token",),
    "role_id": ("approle",),
    "secret_id_file": ("approle",),
}

#: The settings' name for a listen address (``listen``, ``admin_listen``): a net.HostPort.
ListenAddress = HostPort


#: A required_claims value: compared with the token's claim by JSON type and value.
ClaimValue = str | bool | int

#: Claims that name the OAuth client (the agent), and claims that name the person. A
#: client_id_claims list with both gives one person two identities (see _Reader.warn_about_claims).
AGENT_CLAIMS = frozenset({"client_id", "azp", "appid", "cid"})
PERSON_CLAIMS = frozenset(
    {"sub", "oid", "email", "username", "cognito:username", "preferred_username", "upn", "uid"}
)
#: Claims the person can change about themselves in common identity providers (Cognito lets
#: a user update preferred_username or name with their own access token).
OWNER_EDITABLE_CLAIMS = frozenset({"preferred_username", "name", "nickname", "given_name", "family_name"})


@dataclass(frozen=True)
class LogSettings:
    level: str = DEFAULT_LOG_LEVEL
    format: str = DEFAULT_LOG_FORMAT


@dataclass(frozen=True)
class TracingSettings:
    """``tracing``: one span per proxied request, exported over OTLP/HTTP (sidecar/tracing.py)."""

    otlp_endpoint: str | None = None  # the collector's base URL; None: tracing off
    service_name: str = DEFAULT_TRACING_SERVICE_NAME
    timeout_seconds: float = DEFAULT_TRACING_TIMEOUT_SECONDS  # one export, retries included; the flush at drain
    client_id: bool = False  # the client ID as a span attribute (personal data in user-based identity)


@dataclass(frozen=True)
class JwtSettings:
    header: str = DEFAULT_JWT_HEADER
    jwks_url: str | None = None
    issuer: str | None = None
    audience: tuple[str, ...] = ()
    algorithms: tuple[str, ...] = DEFAULT_JWT_ALGORITHMS
    client_id_claims: tuple[str, ...] = DEFAULT_CLIENT_ID_CLAIMS
    leeway_seconds: float = DEFAULT_JWT_LEEWAY_SECONDS
    jwks_cache_seconds: float = DEFAULT_JWKS_CACHE_SECONDS
    jwks_cooldown_seconds: float = DEFAULT_JWKS_COOLDOWN_SECONDS
    jwks_timeout_seconds: float = DEFAULT_JWKS_TIMEOUT_SECONDS
    require_token_use: str | None = None
    cache_max_entries: int = DEFAULT_TOKEN_CACHE_ENTRIES
    #: claim -> the exact value (same JSON type) every token of this issuer must carry
    required_claims: tuple[tuple[str, ClaimValue], ...] = ()
    #: extra CAs trusted for this issuer's discovery document and JWKS only
    ca_file: Path | None = None
    allow_http_jwks: bool = False
    #: where this entry sits in the config (``identity.jwt`` or ``identity.jwt[1]``), for messages
    config_path: str = "identity.jwt"


@dataclass(frozen=True)
class IdentitySettings:
    header: str = DEFAULT_IDENTITY_HEADER
    default_client_id: str | None = None
    #: JWT mode: one entry per trusted issuer (empty: header mode). A token is checked
    #: against the entry whose ``issuer`` equals its ``iss`` claim, never another's keys.
    jwt: tuple[JwtSettings, ...] = ()


@dataclass(frozen=True)
class FileBackendSettings:
    path: Path | None = None


@dataclass(frozen=True)
class AwsBackendSettings:
    region: str | None = None
    endpoint_url: str | None = None
    version_stage: str = DEFAULT_AWS_VERSION_STAGE
    #: connect and read timeout of one attempt; None: secrets.lookup_timeout_seconds (one attempt may use it all)
    timeout_seconds: float | None = None


@dataclass(frozen=True)
class VaultAuthSettings:
    """How the sidecar logs in to Vault. Only paths and names: the token and secret id stay in their files."""

    method: str = DEFAULT_VAULT_AUTH_METHOD
    #: the auth method's mount path (default: the method's name)
    mount: str = DEFAULT_VAULT_AUTH_METHOD
    role: str | None = None
    jwt_file: Path = DEFAULT_VAULT_JWT_FILE
    #: token: a file holding the token (a Vault Agent sink), reread when it changes; None: ${VAULT_TOKEN}
    token_file: Path | None = None
    role_id: str | None = None
    secret_id_file: Path | None = None


@dataclass(frozen=True)
class VaultBackendSettings:
    #: the config's address, else VAULT_ADDR's; "" only when another backend is configured
    address: str = ""
    namespace: str | None = None
    #: the KV version 2 mount; a secret id is the path under it
    mount: str = DEFAULT_VAULT_MOUNT
    ca_file: Path | None = None
    auth: VaultAuthSettings = field(default_factory=VaultAuthSettings)


@dataclass(frozen=True)
class CacheSettings:
    ttl_seconds: float = DEFAULT_CACHE_TTL_SECONDS
    negative_ttl_seconds: float = DEFAULT_NEGATIVE_TTL_SECONDS
    stale_if_error_seconds: float = DEFAULT_STALE_IF_ERROR_SECONDS
    max_entries: int = DEFAULT_CACHE_MAX_ENTRIES


@dataclass(frozen=True)
class SecretsSettings:
    backend: str = DEFAULT_SECRETS_BACKEND
    #: one lookup, every attempt and retry of every backend included, ends within this
    lookup_timeout_seconds: float = DEFAULT_LOOKUP_TIMEOUT_SECONDS
    file: FileBackendSettings = field(default_factory=FileBackendSettings)
    aws: AwsBackendSettings = field(default_factory=AwsBackendSettings)
    vault: VaultBackendSettings = field(default_factory=VaultBackendSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    prefetch: tuple[str, ...] = ()


@dataclass(frozen=True)
class InjectSettings:
    kind: str  # "query" or "header"
    name: str
    format: str = DEFAULT_INJECT_FORMAT


@dataclass(frozen=True)
class CredentialSettings:
    """``upstreams.*.credential``: what the stored secret is and how the value injected is got.

    ``client_secret`` is the OAuth app's secret (from ``${VAR}``), kept out of ``repr``;
    ``client_secret_file`` is read when the upstream is built (each reload reads it again).
    """

    type: str = DEFAULT_CREDENTIAL_TYPE
    token_url: str | None = None
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    client_secret_file: Path | None = None
    auth_method: str = DEFAULT_OAUTH_AUTH_METHOD
    scopes: tuple[str, ...] = ()
    audience: str | None = None
    authorize_url: str | None = None

    @property
    def oauth(self) -> bool:
        """Every type but api_key: the value injected is an access token from ``token_url``."""
        return self.type in OAUTH_CREDENTIAL_TYPES


@dataclass(frozen=True)
class UpstreamSettings:
    name: str
    url: str
    scheme: str
    host: str  # lower-case, IDNA-encoded, no trailing dot, no brackets
    port: int
    base_path: str  # "" or "/prefix" without a trailing slash, percent-encoding kept
    secret: str
    inject: InjectSettings
    secret_field: str | None = None
    clients: tuple[str, ...] = ("*",)
    scopes: tuple[str, ...] = ()
    timeout_seconds: float = DEFAULT_UPSTREAM_TIMEOUT_SECONDS
    allow_private: bool = False
    ca_file: Path | None = None
    #: (host, port) dialled instead of url's; TLS server name, certificate check and Host stay url's
    connect_to: tuple[str, int] | None = None
    #: take part in forward-proxy host matching (absolute-form and CONNECT); False: route mode only
    forward_proxy: bool = True
    credential: CredentialSettings = field(default_factory=CredentialSettings)


@dataclass(frozen=True)
class MitmSettings:
    enabled: bool = False
    ca_cert: Path | None = None
    ca_key: Path | None = None
    ca_cert_out: Path | None = None


@dataclass(frozen=True)
class ForwardProxySettings:
    enabled: bool = True
    passthrough_hosts: tuple[str, ...] = ()  # as written: host or host:port (port 443 when absent)
    passthrough_allow_private: bool = False
    mitm: MitmSettings = field(default_factory=MitmSettings)


@dataclass(frozen=True)
class Settings:
    listen: ListenAddress
    admin_listen: ListenAddress
    upstreams: Mapping[str, UpstreamSettings]
    shutdown_grace_seconds: float = DEFAULT_SHUTDOWN_GRACE_SECONDS
    workers: int = DEFAULT_WORKERS
    log: LogSettings = field(default_factory=LogSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    identity: IdentitySettings = field(default_factory=IdentitySettings)
    secrets: SecretsSettings = field(default_factory=SecretsSettings)
    forward_proxy: ForwardProxySettings = field(default_factory=ForwardProxySettings)
    source: Path | None = None
    #: things that work but are probably not what was meant; ``check`` prints them, ``run`` logs them
    warnings: tuple[str, ...] = ()


# --------------------------------------------------------------------------- loading


class _FromEnv(str):
    """A string produced by ${VAR} interpolation; numbers and booleans may be spelled so."""

    __slots__ = ()


def interpolate(value: Any, path: str, problems: list[str], env: Mapping[str, str]) -> Any:
    """Replace ${NAME} and ${NAME:-default} in every string value; $$ is a literal $."""
    if isinstance(value, dict):
        return {k: interpolate(v, _join(path, str(k)), problems, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, f"{path}[{i}]", problems, env) for i, v in enumerate(value)]
    if not isinstance(value, str) or "$" not in value:
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in env and (env[name] != "" or default is None):
            return env[name]
        if default is not None:
            return default
        problems.append(f"{path}: environment variable {name} is not set")
        return ""

    return _FromEnv(_ENV_PATTERN.sub(replace, value))


def load_settings(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Settings:
    """Read, interpolate and validate a config file; raises ConfigError with every problem."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{source}: cannot read the config file ({exc.strerror})"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError([f"{source}: {problem}{at}"]) from None
    return parse_settings(raw, base_dir=source.resolve().parent, env=env, source=source)


def parse_settings(
    raw: Any,
    *,
    base_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    source: Path | None = None,
) -> Settings:
    """Validate an already-parsed document (a dict) into Settings."""
    problems: list[str] = []
    if raw is None:
        raw = {}
    env = os.environ if env is None else env
    raw = interpolate(raw, "", problems, env)
    r = _Reader(problems, base_dir or Path.cwd(), env)
    settings = r.settings(raw)
    if problems or settings is None:
        raise ConfigError(problems)
    return settings if source is None else replace(settings, source=source)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


T = TypeVar("T")


class _Reader:
    """Typed accessors that record problems with their path instead of raising."""

    def __init__(self, problems: list[str], base_dir: Path, env: Mapping[str, str] | None = None) -> None:
        self.problems = problems
        self.base_dir = base_dir
        #: the environment defaults come from (secrets.vault: VAULT_ADDR, VAULT_TOKEN)
        self.env: Mapping[str, str] = env if env is not None else {}
        self.warnings: list[str] = []

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(f"{path}: {message}")

    def fail(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def check_header_name(self, name: str, path: str) -> bool:
        if HEADER_NAME_PATTERN.fullmatch(name):
            return True
        self.fail(path, "is not a valid HTTP header name")
        return False

    def check_service_url(self, value: str | None, path: str) -> None:
        """An http(s) URL the sidecar itself calls (identity provider, store endpoint).

        No user information: these URLs are logged (``check``'s summary, key loading),
        and none of these services takes credentials that way.
        """
        if not value:
            return
        parts = split_http_url(value)
        if isinstance(parts, str):
            self.fail(path, parts)

    # ---- primitives

    def mapping(self, raw: Any, path: str, allowed: frozenset[str]) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.fail(path or "(top level)", f"expected a mapping, got {_kind(raw)}")
            return {}
        for key in raw:
            if not isinstance(key, str) or key not in allowed:
                near = _closest(str(key), allowed)
                hint = f" (did you mean {near}?)" if near else ""
                self.fail(_join(path, str(key)), f"unknown key{hint}")
        return {k: v for k, v in raw.items() if isinstance(k, str) and k in allowed}

    def string(
        self,
        m: dict[str, Any],
        key: str,
        path: str,
        default: str | None,
        *,
        choices: tuple[str, ...] | None = None,
    ) -> str | None:
        p = _join(path, key)
        if key not in m or m[key] is None:
            return default
        value = m[key]
        if _empty_interpolation(value):
            return default
        if not isinstance(value, str):
            # A YAML number is not read as text: 'secret_field: 0123' would be '83'.
            number = isinstance(value, int | float) and not isinstance(value, bool)
            hint = " (quote it to mean the text)" if number else ""
            self.fail(p, f"expected a string, got {_kind(value)}{hint}")
            return default
        if choices is not None and value not in choices:
            self.fail(p, f"expected one of {', '.join(choices)}")
            return default
        return value

    def required_string(self, m: dict[str, Any], key: str, path: str) -> str:
        value = self.string(m, key, path, None)
        if value is None or value == "":
            if key not in m or m[key] is None or m[key] == "":
                self.fail(_join(path, key), "is required")
            return ""
        return value

    def number(
        self, m: dict[str, Any], key: str, path: str, default: float, *, minimum: float = 0.0,
        positive: bool = False,
    ) -> float:
        p = _join(path, key)
        if key not in m or m[key] is None:
            return default
        value = _coerce(m[key], float)
        if value is None:
            self.fail(p, f"expected a number, got {_kind(m[key])}")
            return default
        if not math.isfinite(value):
            self.fail(p, "must be a finite number")
            return default
        if positive and value <= 0:
            self.fail(p, "must be greater than 0")
            return default
        if value < minimum:
            self.fail(p, f"must be at least {minimum:g}")
            return default
        return float(value)

    def integer(
        self, m: dict[str, Any], key: str, path: str, default: int, *, minimum: int, maximum: int
    ) -> int:
        p = _join(path, key)
        if key not in m or m[key] is None:
            return default
        value = _coerce(m[key], int)
        if value is None:
            self.fail(p, f"expected an integer, got {_kind(m[key])}")
            return default
        if not minimum <= value <= maximum:
            self.fail(p, f"must be between {minimum} and {maximum}")
            return default
        return value

    def boolean(self, m: dict[str, Any], key: str, path: str, default: bool) -> bool:
        p = _join(path, key)
        if key not in m or m[key] is None:
            return default
        value = m[key]
        if isinstance(value, bool):
            return value
        if isinstance(value, _FromEnv) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        self.fail(p, f"expected true or false, got {_kind(value)}")
        return default

    def string_list(
        self,
        m: dict[str, Any],
        key: str,
        path: str,
        default: tuple[str, ...],
        *,
        item_check: Callable[[str], str | None] | None = None,
        allow_scalar: bool = False,
    ) -> tuple[str, ...]:
        p = _join(path, key)
        if key not in m or m[key] is None:
            return default
        value = m[key]
        if _empty_interpolation(value):
            return default
        if allow_scalar and isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            self.fail(p, f"expected a list of strings, got {_kind(value)}")
            return default
        out: list[str] = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.fail(f"{p}[{i}]", f"expected a string, got {_kind(item)}")
                continue
            if item_check is not None:
                problem = item_check(item)
                if problem:
                    self.fail(f"{p}[{i}]", problem)
                    continue
            out.append(item)
        return tuple(out)

    def path_value(self, m: dict[str, Any], key: str, path: str, *, must_exist: bool) -> Path | None:
        value = self.string(m, key, path, None)
        if value is None or value == "":
            return None
        resolved = Path(value)
        if not resolved.is_absolute():
            resolved = self.base_dir / resolved
        if must_exist and not resolved.is_file():
            self.fail(_join(path, key), f"file {value} does not exist")
        return resolved

    def ca_file(self, m: dict[str, Any], path: str) -> Path | None:
        """Extra trusted CAs (an upstream's, an issuer's): a file that holds at least one PEM certificate."""
        resolved = self.path_value(m, "ca_file", path, must_exist=True)
        if resolved is not None and resolved.is_file():
            try:
                trust_context(resolved)
            except (ssl.SSLError, OSError, ValueError):
                # Not the library's text: it can quote what it read.
                self.fail(_join(path, "ca_file"), f"no PEM certificate could be loaded from {m['ca_file']}")
        return resolved

    def listen(self, m: dict[str, Any], key: str, default: str) -> ListenAddress:
        value = self.string(m, key, "", default) or default
        parsed = parse_listen(value)
        if parsed is None:
            self.fail(key, f"expected host:port (for example {default}), got {value!r}")
            return parse_listen(default)  # type: ignore[return-value]
        return parsed

    # ---- sections

    def settings(self, raw: Any) -> Settings | None:
        m = self.mapping(
            raw,
            "",
            frozenset(
                {
                    "listen", "admin_listen", "shutdown_grace_seconds", "workers", "log", "tracing",
                    "identity", "secrets", "upstreams", "forward_proxy",
                }
            ),
        )
        listen = self.listen(m, "listen", DEFAULT_LISTEN)
        admin = self.listen(m, "admin_listen", DEFAULT_ADMIN_LISTEN)
        if listen.port == admin.port != 0 and _same_socket(listen.host, admin.host):
            self.fail("admin_listen", "must differ from listen")
        grace = self.number(m, "shutdown_grace_seconds", "", DEFAULT_SHUTDOWN_GRACE_SECONDS)
        workers = self.integer(m, "workers", "", DEFAULT_WORKERS, minimum=1, maximum=64)
        log = self.log(m.get("log"))
        tracing = self.tracing(m.get("tracing"))
        identity = self.identity(m.get("identity"))
        secrets = self.secrets(m.get("secrets"))
        upstreams = self.upstreams(m.get("upstreams"))
        forward_proxy = self.forward_proxy(m.get("forward_proxy"), upstreams)
        stored = any(up.secret for up in upstreams.values())  # token_exchange stores nothing
        if stored and secrets.backend == "file" and secrets.file.path is None:
            self.fail("secrets.file.path", "is required with backend file")
        if secrets.backend == "aws":
            for up in upstreams.values():
                if up.secret.startswith("arn:") and _COMPLETE_ARN.search(up.secret):
                    self.fail(
                        f"upstreams.{up.name}.secret",
                        "is a complete secret ARN (it ends in - and six characters), which the sidecar "
                        "refuses for every client: it cannot tell that suffix from one a client ID wrote; "
                        "write the secret's name or its ARN without the suffix",
                    )
        for up in upstreams.values():
            if up.credential.type == "token_exchange" and not identity.jwt:
                self.fail(
                    f"upstreams.{up.name}.credential.type",
                    "token_exchange needs identity.jwt: it exchanges the caller's verified token",
                )
        if secrets.backend == "vault":
            for up in upstreams.values():
                problem = vault_path_problem(up.secret.replace("{client_id}", "x").replace("{upstream}", "x"))
                if up.secret and problem:
                    self.fail(f"upstreams.{up.name}.secret", f"is not a Vault KV path: {problem}")
        return Settings(
            listen=listen,
            admin_listen=admin,
            shutdown_grace_seconds=grace,
            workers=workers,
            log=log,
            tracing=tracing,
            identity=identity,
            secrets=secrets,
            upstreams=upstreams,
            forward_proxy=forward_proxy,
            warnings=tuple(self.warnings),
        )

    def log(self, raw: Any) -> LogSettings:
        m = self.mapping(raw, "log", frozenset({"level", "format"}))
        return LogSettings(
            level=self.string(m, "level", "log", DEFAULT_LOG_LEVEL, choices=LOG_LEVELS)
            or DEFAULT_LOG_LEVEL,
            format=self.string(m, "format", "log", DEFAULT_LOG_FORMAT, choices=LOG_FORMATS)
            or DEFAULT_LOG_FORMAT,
        )

    def tracing(self, raw: Any) -> TracingSettings:
        path = "tracing"
        m = self.mapping(raw, path, frozenset({"otlp_endpoint", "service_name", "timeout_seconds", "client_id"}))
        endpoint = self.string(m, "otlp_endpoint", path, None) or None
        self.check_service_url(endpoint, f"{path}.otlp_endpoint")
        if endpoint is not None and ("?" in endpoint or "#" in endpoint):
            self.fail(f"{path}.otlp_endpoint", "must not contain a query or fragment")
        if endpoint is not None and importlib.util.find_spec("opentelemetry.sdk") is None:
            # Found, not imported: the SDK loads only when the sidecar starts with tracing on.
            self.fail(
                f"{path}.otlp_endpoint",
                "needs the OpenTelemetry SDK, which is not installed: pip install 'mcp-credential-sidecar[tracing]'",
            )
        return TracingSettings(
            otlp_endpoint=endpoint,
            service_name=self.string(m, "service_name", path, DEFAULT_TRACING_SERVICE_NAME)
            or DEFAULT_TRACING_SERVICE_NAME,
            timeout_seconds=self.number(
                m, "timeout_seconds", path, DEFAULT_TRACING_TIMEOUT_SECONDS, positive=True
            ),
            client_id=self.boolean(m, "client_id", path, False),
        )

    def identity(self, raw: Any) -> IdentitySettings:
        path = "identity"
        m = self.mapping(raw, path, frozenset({"header", "default_client_id", "jwt"}))
        header = self.string(m, "header", path, DEFAULT_IDENTITY_HEADER) or DEFAULT_IDENTITY_HEADER
        self.check_header_name(header, f"{path}.header")
        default_id = self.string(m, "default_client_id", path, None)
        problem = _check_client_id(default_id) if default_id is not None else None
        if problem is not None:
            self.fail(f"{path}.default_client_id", problem)
        issuers = self.jwt_entries(m.get("jwt"))
        if issuers and default_id is not None:
            self.fail(f"{path}.default_client_id", "has no effect with identity.jwt (every caller needs a token)")
        return IdentitySettings(header=header, default_client_id=default_id, jwt=issuers)

    def jwt_entries(self, raw: Any) -> tuple[JwtSettings, ...]:
        """``identity.jwt``: one mapping, or a list of them (one per issuer)."""
        path = "identity.jwt"
        if raw is None:
            return ()
        if isinstance(raw, dict):
            return (self.jwt(raw, path),)
        if not isinstance(raw, list):
            self.fail(path, f"expected a mapping (one issuer) or a list of them, got {_kind(raw)}")
            return ()
        if not raw:
            self.fail(path, "an empty list: give at least one issuer, or leave identity.jwt out for header mode")
            return ()
        entries: list[JwtSettings] = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict):
                self.fail(f"{path}[{i}]", f"expected a mapping, got {_kind(item)}")
                continue
            entries.append(self.jwt(item, f"{path}[{i}]"))
        by_issuer: dict[str, str] = {}
        for entry in entries:
            if entry.issuer is None:
                continue
            if entry.issuer in by_issuer:
                self.fail(
                    f"{entry.config_path}.issuer",
                    f"the same issuer as {by_issuer[entry.issuer]}: a token's iss picks exactly one entry,"
                    " so merge the two",
                )
            by_issuer.setdefault(entry.issuer, entry.config_path)
        headers = {entry.header.lower() for entry in entries}
        if len(headers) > 1:
            self.fail(
                path,
                "every issuer entry must read the token from the same header (found "
                + ", ".join(sorted({entry.header for entry in entries}))
                + "): the token is read before its issuer is known",
            )
        return tuple(entries)

    def jwt(self, raw: Any, path: str = "identity.jwt") -> JwtSettings:
        m = self.mapping(
            raw,
            path,
            frozenset(
                {
                    "header", "jwks_url", "issuer", "audience", "algorithms", "client_id_claims",
                    "leeway_seconds", "jwks_cache_seconds", "jwks_cooldown_seconds",
                    "jwks_timeout_seconds", "require_token_use", "cache_max_entries",
                    "required_claims", "ca_file", "allow_http_jwks",
                }
            ),
        )
        header = self.string(m, "header", path, DEFAULT_JWT_HEADER) or DEFAULT_JWT_HEADER
        self.check_header_name(header, f"{path}.header")
        jwks_url = self.string(m, "jwks_url", path, None)
        issuer = self.string(m, "issuer", path, None)
        if not issuer:
            # The iss claim is always checked: without it any issuer whose keys happen to
            # be in the JWKS could mint identities. jwks_url alone is not enough.
            self.fail(f"{path}.issuer", "is required (the token's iss claim is always checked)")
        for key, value in (("jwks_url", jwks_url), ("issuer", issuer)):
            self.check_service_url(value, f"{path}.{key}")
        allow_http_jwks = self.boolean(m, "allow_http_jwks", path, False)
        if allow_http_jwks and issuer and url_scheme(issuer) == "https":
            how = "may be fetched (discovery, redirects)"
            if jwks_url and url_scheme(jwks_url) == "http":
                how = "are fetched"
            self.warn(
                f"{path}.allow_http_jwks",
                f"signing keys of an https issuer {how} over plain http: anyone on that path"
                " could mint identities (meant for a local emulator only)",
            )
        if issuer and jwks_url and url_scheme(issuer) == "https" and url_scheme(jwks_url) == "http":
            if not allow_http_jwks:
                self.fail(
                    f"{path}.jwks_url",
                    "is plain http for an https issuer: keys fetched in the clear could be anyone's;"
                    " use the https URL, or set allow_http_jwks: true for a local emulator",
                )

        def check_alg(alg: str) -> str | None:
            if alg.lower() == "none" or alg.upper().startswith("HS"):
                return f"{alg} is refused: only asymmetric algorithms are allowed"
            if alg not in ASYMMETRIC_ALGORITHMS:
                return f"expected one of {', '.join(sorted(ASYMMETRIC_ALGORITHMS))}"
            return None

        algorithms = self.string_list(
            m, "algorithms", path, DEFAULT_JWT_ALGORITHMS, item_check=check_alg
        )
        if "algorithms" in m and not algorithms:
            self.fail(f"{path}.algorithms", "needs at least one algorithm")
        claims = self.string_list(m, "client_id_claims", path, DEFAULT_CLIENT_ID_CLAIMS)
        if "client_id_claims" in m and not claims:
            self.fail(f"{path}.client_id_claims", "needs at least one claim")
        claims = claims or DEFAULT_CLIENT_ID_CLAIMS
        token_use = self.string(m, "require_token_use", path, None, choices=("access", "id"))
        self.warn_about_claims(claims, token_use, path)
        return JwtSettings(
            header=header,
            jwks_url=jwks_url,
            issuer=issuer,
            audience=self.string_list(m, "audience", path, (), allow_scalar=True),
            algorithms=algorithms or DEFAULT_JWT_ALGORITHMS,
            client_id_claims=claims,
            leeway_seconds=self.number(m, "leeway_seconds", path, DEFAULT_JWT_LEEWAY_SECONDS),
            jwks_cache_seconds=self.number(
                m, "jwks_cache_seconds", path, DEFAULT_JWKS_CACHE_SECONDS, positive=True
            ),
            jwks_cooldown_seconds=self.number(
                m, "jwks_cooldown_seconds", path, DEFAULT_JWKS_COOLDOWN_SECONDS
            ),
            jwks_timeout_seconds=self.number(
                m, "jwks_timeout_seconds", path, DEFAULT_JWKS_TIMEOUT_SECONDS, positive=True
            ),
            require_token_use=token_use,
            cache_max_entries=self.integer(
                m, "cache_max_entries", path, DEFAULT_TOKEN_CACHE_ENTRIES,
                minimum=0, maximum=10_000_000,
            ),
            required_claims=self.required_claims(m.get("required_claims"), f"{path}.required_claims"),
            ca_file=self.ca_file(m, path),
            allow_http_jwks=allow_http_jwks,
            config_path=path,
        )

    def required_claims(self, raw: Any, path: str) -> tuple[tuple[str, ClaimValue], ...]:
        """claim -> exact value; a string, true/false or an integer (compared with its JSON type)."""
        if raw is None or _empty_interpolation(raw):
            return ()
        if not isinstance(raw, dict):
            self.fail(path, f"expected a mapping of claim name to value, got {_kind(raw)}")
            return ()
        out: list[tuple[str, ClaimValue]] = []
        for name, value in raw.items():
            if not isinstance(name, str) or not name:
                self.fail(path, f"claim names must be non-empty strings, got {name!r}")
                continue
            where = f"{path}.{name}"
            if isinstance(value, _FromEnv):
                value = str(value)  # ${VAR} reads as text; YAML true/1 are typed already
            if not isinstance(value, str | bool | int):
                self.fail(where, f"expected a string, true/false or an integer, got {_kind(value)}")
                continue
            if name in ("iss", "exp", "nbf", "iat"):
                self.fail(where, "is checked by the sidecar itself; it cannot be pinned here")
                continue
            out.append((name, value))
        return tuple(out)

    def warn_about_claims(self, claims: tuple[str, ...], token_use: str | None, path: str) -> None:
        """Warnings for client_id_claims that work but are likely to hurt (docs/identity.md)."""
        agents = [c for c in claims if c in AGENT_CLAIMS]
        people = [c for c in claims if c in PERSON_CLAIMS]
        if agents and people and token_use is None:
            self.warn(
                f"{path}.client_id_claims",
                f"mixes agent claims ({', '.join(agents)}) and person claims ({', '.join(people)}) without"
                f" require_token_use: a person's access token also names the app client ({agents[0]}),"
                f" so the same person has two identities; list only one kind, give agents and people"
                " separate issuer entries, or (Cognito only) set require_token_use"
                " (docs/identity.md, Choosing the claim)",
            )
        editable = [c for c in claims if c in OWNER_EDITABLE_CLAIMS]
        if editable:
            self.warn(
                f"{path}.client_id_claims",
                f"{', '.join(editable)} can be changed by the person it describes in many identity"
                " providers, who would then get another person's credential; use sub (or oid in Entra ID)",
            )

    def secrets(self, raw: Any) -> SecretsSettings:
        path = "secrets"
        m = self.mapping(
            raw, path, frozenset({"backend", "lookup_timeout_seconds", "file", "aws", "vault", "cache", "prefetch"})
        )
        backend = (
            self.string(m, "backend", path, DEFAULT_SECRETS_BACKEND, choices=BACKENDS)
            or DEFAULT_SECRETS_BACKEND
        )
        lookup_timeout = self.number(
            m, "lookup_timeout_seconds", path, DEFAULT_LOOKUP_TIMEOUT_SECONDS, positive=True
        )
        fm = self.mapping(m.get("file"), f"{path}.file", frozenset({"path"}))
        file_settings = FileBackendSettings(
            path=self.path_value(fm, "path", f"{path}.file", must_exist=backend == "file")
        )
        am = self.mapping(
            m.get("aws"),
            f"{path}.aws",
            frozenset({"region", "endpoint_url", "version_stage", "timeout_seconds"}),
        )
        endpoint = self.string(am, "endpoint_url", f"{path}.aws", None)
        self.check_service_url(endpoint, f"{path}.aws.endpoint_url")
        aws = AwsBackendSettings(
            region=self.string(am, "region", f"{path}.aws", None),
            endpoint_url=endpoint or None,
            version_stage=self.string(am, "version_stage", f"{path}.aws", DEFAULT_AWS_VERSION_STAGE)
            or DEFAULT_AWS_VERSION_STAGE,
            timeout_seconds=(
                self.number(am, "timeout_seconds", f"{path}.aws", lookup_timeout, positive=True)
                if am.get("timeout_seconds") is not None
                else None
            ),
        )
        if backend == "aws" and aws.timeout_seconds is not None and aws.timeout_seconds > lookup_timeout:
            # One attempt may not outlast the whole lookup: the lookup would end first, every time.
            self.fail(
                f"{path}.aws.timeout_seconds",
                f"{aws.timeout_seconds:g} is longer than secrets.lookup_timeout_seconds ({lookup_timeout:g}), "
                "which bounds the whole lookup with every retry; lower it or raise lookup_timeout_seconds",
            )
        vault = self.vault(m.get("vault"), active=backend == "vault")
        cm = self.mapping(
            m.get("cache"),
            f"{path}.cache",
            frozenset({"ttl_seconds", "negative_ttl_seconds", "stale_if_error_seconds", "max_entries"}),
        )
        cp = f"{path}.cache"
        cache = CacheSettings(
            ttl_seconds=self.number(cm, "ttl_seconds", cp, DEFAULT_CACHE_TTL_SECONDS),
            negative_ttl_seconds=self.number(
                cm, "negative_ttl_seconds", cp, DEFAULT_NEGATIVE_TTL_SECONDS
            ),
            stale_if_error_seconds=self.number(
                cm, "stale_if_error_seconds", cp, DEFAULT_STALE_IF_ERROR_SECONDS
            ),
            max_entries=self.integer(
                cm, "max_entries", cp, DEFAULT_CACHE_MAX_ENTRIES, minimum=1, maximum=10_000_000
            ),
        )
        prefetch = self.string_list(m, "prefetch", path, (), item_check=_check_client_id)
        return SecretsSettings(
            backend=backend, lookup_timeout_seconds=lookup_timeout, file=file_settings, aws=aws, vault=vault,
            cache=cache, prefetch=prefetch,
        )

    def vault(self, raw: Any, *, active: bool) -> VaultBackendSettings:
        """``secrets.vault``; what is missing fails only when it is the configured backend."""
        path = "secrets.vault"
        m = self.mapping(raw, path, frozenset({"address", "namespace", "mount", "ca_file", "auth"}))
        address = (self.string(m, "address", path, None) or self.env.get("VAULT_ADDR") or "").rstrip("/")
        if address:
            self.check_service_url(address, f"{path}.address")
        elif active:
            self.fail(f"{path}.address", "is required (or set VAULT_ADDR)")
        namespace = (self.string(m, "namespace", path, None) or "").strip("/") or None
        mount = (self.string(m, "mount", path, DEFAULT_VAULT_MOUNT) or DEFAULT_VAULT_MOUNT).strip("/")
        problem = vault_path_problem(mount)
        if problem:
            self.fail(f"{path}.mount", problem)
        ap = f"{path}.auth"
        known = len(self.problems)
        am = self.mapping(
            m.get("auth"), ap,
            frozenset({"method", "mount", "role", "jwt_file", "token_file", "role_id", "secret_id_file"}),
        )
        method = (
            self.string(am, "method", ap, DEFAULT_VAULT_AUTH_METHOD, choices=VAULT_AUTH_METHODS)
            or DEFAULT_VAULT_AUTH_METHOD
        )
        # A misspelt key or method leaves the method unsure: what the default method would need is no clue then.
        method_sure = len(self.problems) == known
        auth_mount = (self.string(am, "mount", ap, None) or method).strip("/")
        problem = vault_path_problem(auth_mount)
        if problem:
            self.fail(f"{ap}.mount", problem)
        auth = VaultAuthSettings(
            method=method,
            mount=auth_mount,
            role=self.string(am, "role", ap, None) or None,
            jwt_file=self.path_value(am, "jwt_file", ap, must_exist=False) or DEFAULT_VAULT_JWT_FILE,
            # Not required to exist now: a Vault Agent or an init container may write it after start.
            token_file=self.path_value(am, "token_file", ap, must_exist=False),
            role_id=self.string(am, "role_id", ap, None) or None,
            secret_id_file=self.path_value(am, "secret_id_file", ap, must_exist=False),
        )
        if active and method_sure:
            self.check_vault_auth(auth, am, ap)
        return VaultBackendSettings(
            address=address, namespace=namespace, mount=mount, ca_file=self.ca_file(m, path), auth=auth
        )

    def check_vault_auth(self, auth: VaultAuthSettings, am: dict[str, Any], path: str) -> None:
        """What the chosen method needs is there, and nothing that only another method reads."""
        for key, methods in _VAULT_AUTH_KEYS.items():
            if am.get(key) not in (None, "") and auth.method not in methods:
                self.fail(f"{path}.{key}", f"applies to method {' or '.join(methods)}, not {auth.method}")
        method = auth.method
        if method in ("kubernetes", "jwt") and auth.role is None:
            self.fail(f"{path}.role", f"is required with method {method} (the Vault role to log in as)")
        if method == "approle":
            if auth.role_id is None:
                self.fail(f"{path}.role_id", "is required with method approle")
            if auth.secret_id_file is None:
                self.fail(f"{path}.secret_id_file", "is required with method approle (a file holding the secret id)")
        if method == "token" and auth.token_file is None and not self.env.get("VAULT_TOKEN"):
            self.fail(f"{path}.token_file", "is required with method token when VAULT_TOKEN is not set")

    def upstreams(self, raw: Any) -> dict[str, UpstreamSettings]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.fail("upstreams", f"expected a mapping of name to upstream, got {_kind(raw)}")
            return {}
        out: dict[str, UpstreamSettings] = {}
        for name, value in raw.items():
            path = f"upstreams.{name}"
            if not isinstance(name, str):
                # YAML read '123:' or 'on:' as a number or a boolean.
                self.fail(path, f"an upstream name must be text, got {_kind(name)} (quote it)")
                continue
            if not UPSTREAM_NAME_PATTERN.fullmatch(name):
                self.fail(path, "upstream names are letters, digits, '-' and '_' (a path segment)")
                continue
            up = self.upstream(name, value, path)
            if up is None:
                continue
            out[name] = up
        return out

    def upstream(self, name: str, raw: Any, path: str) -> UpstreamSettings | None:
        m = self.mapping(
            raw,
            path,
            frozenset(
                {
                    "url", "secret", "secret_field", "inject", "clients", "scopes",
                    "timeout_seconds", "allow_private", "ca_file", "connect_to", "forward_proxy",
                    "credential",
                }
            ),
        )
        if not m and not isinstance(raw, dict):
            return None
        url = self.required_string(m, "url", path)
        parsed = parse_upstream_url(url) if url else None
        if url and isinstance(parsed, str):
            self.fail(f"{path}.url", parsed)
        credential = self.credential(m.get("credential"), f"{path}.credential")
        if credential.type == "token_exchange":
            # The caller's own token is exchanged: nothing is stored per client.
            secret = ""
            if m.get("secret") not in (None, ""):
                self.fail(f"{path}.secret", "does not apply to credential type token_exchange (nothing is stored)")
        else:
            secret = self.required_string(m, "secret", path)
        if secret:
            problem = check_template(secret, _SECRET_PLACEHOLDERS)
            if problem:
                self.fail(f"{path}.secret", problem)
        if credential.oauth and m.get("secret_field") not in (None, ""):
            self.fail(
                f"{path}.secret_field",
                f"does not apply to credential type {credential.type} (the stored object's fields are fixed)",
            )
        if credential.oauth and m.get("inject") is None:
            # An access token goes where OAuth puts it unless the upstream says otherwise.
            inject: InjectSettings | None = InjectSettings("header", "Authorization", "Bearer {secret}")
        else:
            inject = self.inject(m.get("inject"), f"{path}.inject")
        clients = self.string_list(m, "clients", path, ("*",))
        allow_private = self.boolean(m, "allow_private", path, False)
        connect_to = self.connect_to(m, path)
        # The guard looks at the address dialled: connect_to's when set, else url's host.
        dialled = connect_to[0] if connect_to else parsed[1] if isinstance(parsed, tuple) else None
        if dialled is not None and not allow_private:
            literal = ip_literal(dialled)
            if literal is not None and is_forbidden_address(literal):
                self.fail(
                    f"{path}.connect_to" if connect_to else f"{path}.url",
                    f"{dialled} is a loopback, private or reserved address; "
                    "set allow_private: true for an internal API",
                )
        up = UpstreamSettings(
            name=name,
            url=url,
            scheme=parsed[0] if isinstance(parsed, tuple) else "https",
            host=parsed[1] if isinstance(parsed, tuple) else "",
            port=parsed[2] if isinstance(parsed, tuple) else 443,
            base_path=parsed[3] if isinstance(parsed, tuple) else "",
            secret=secret,
            secret_field=self.string(m, "secret_field", path, None) or None,
            inject=inject or InjectSettings("query", "apiKey"),
            clients=clients,
            scopes=self.string_list(m, "scopes", path, ()),
            timeout_seconds=self.number(
                m, "timeout_seconds", path, DEFAULT_UPSTREAM_TIMEOUT_SECONDS, positive=True
            ),
            allow_private=allow_private,
            ca_file=self.ca_file(m, path),
            connect_to=connect_to,
            forward_proxy=self.boolean(m, "forward_proxy", path, True),
            credential=credential,
        )
        if not isinstance(parsed, tuple) or inject is None:
            return None
        if not secret and credential.type != "token_exchange":
            return None
        return up

    def credential(self, raw: Any, path: str) -> CredentialSettings:
        """``upstreams.*.credential``: the type, and for the OAuth types the token endpoint and app."""
        m = self.mapping(raw, path, frozenset({"type", *_CREDENTIAL_KEYS}))
        kind = self.string(m, "type", path, DEFAULT_CREDENTIAL_TYPE, choices=CREDENTIAL_TYPES)
        kind = kind or DEFAULT_CREDENTIAL_TYPE
        for key, types in _CREDENTIAL_KEYS.items():
            if m.get(key) not in (None, "", []) and kind not in types:
                self.fail(f"{path}.{key}", f"applies to type {' or '.join(types)}, not {kind}")
        if kind not in OAUTH_CREDENTIAL_TYPES:
            return CredentialSettings(type=kind)
        token_url = self.required_string(m, "token_url", path) or None
        self.check_service_url(token_url, f"{path}.token_url")
        authorize_url = self.string(m, "authorize_url", path, None) or None
        self.check_service_url(authorize_url, f"{path}.authorize_url")
        client_id = self.string(m, "client_id", path, None) or None
        secret_value = self.string(m, "client_secret", path, None) or None
        secret_file = self.path_value(m, "client_secret_file", path, must_exist=True)
        if kind != "oauth2_client_credentials" and client_id is None:
            self.fail(f"{path}.client_id", f"is required with type {kind} (the OAuth app the sidecar acts as)")
        if secret_value is not None and secret_file is not None:
            self.fail(f"{path}.client_secret", "give client_secret or client_secret_file, not both")
        if secret_value is not None and not isinstance(m.get("client_secret"), _FromEnv):
            # A config file lives in a ConfigMap, a repository, a chart's values: no place for a secret.
            self.warn(
                f"{path}.client_secret",
                "is written in the config file; take it from the environment (${VAR}) or client_secret_file",
            )
        return CredentialSettings(
            type=kind,
            token_url=token_url,
            client_id=client_id,
            client_secret=secret_value,
            client_secret_file=secret_file,
            auth_method=self.string(m, "auth_method", path, DEFAULT_OAUTH_AUTH_METHOD, choices=OAUTH_AUTH_METHODS)
            or DEFAULT_OAUTH_AUTH_METHOD,
            scopes=self.string_list(m, "scopes", path, ()),
            audience=self.string(m, "audience", path, None) or None,
            authorize_url=authorize_url,
        )

    def connect_to(self, m: dict[str, Any], path: str) -> tuple[str, int] | None:
        """``connect_to: host:port`` (IPv6 as ``[::1]:443``), normalised; None when absent or invalid."""
        value = self.string(m, "connect_to", path, None)
        if not value:
            return None
        parsed = parse_host_port(value)
        if isinstance(parsed, str):
            self.fail(_join(path, "connect_to"), parsed)
            return None
        return parsed.host, parsed.port

    def inject(self, raw: Any, path: str) -> InjectSettings | None:
        if raw is None:
            self.fail(path, "is required (query: NAME or header: NAME)")
            return None
        m = self.mapping(raw, path, frozenset({"query", "header", "format"}))
        kinds = [k for k in ("query", "header") if k in m]
        if len(kinds) != 1:
            self.fail(path, "expected one of query, header")
            return None
        kind = kinds[0]
        name = self.string(m, kind, path, None)
        if not name:
            self.fail(f"{path}.{kind}", "is required")
            return None
        if kind == "header" and not self.check_header_name(name, f"{path}.header"):
            return None
        if kind == "header" and name.lower() in _FORBIDDEN_INJECT_HEADERS:
            self.fail(f"{path}.header", f"{name} is managed by the sidecar and cannot carry a key")
            return None
        fmt = self.string(m, "format", path, DEFAULT_INJECT_FORMAT) or DEFAULT_INJECT_FORMAT
        problem = check_template(fmt, frozenset({"secret"}), required="secret")
        if problem:
            self.fail(f"{path}.format", problem)
            return None
        return InjectSettings(kind=kind, name=name, format=fmt)

    def forward_proxy(
        self, raw: Any, upstreams: Mapping[str, UpstreamSettings]
    ) -> ForwardProxySettings:
        path = "forward_proxy"
        m = self.mapping(
            raw, path, frozenset({"enabled", "passthrough_hosts", "passthrough_allow_private", "mitm"})
        )
        mm = self.mapping(
            m.get("mitm"), f"{path}.mitm", frozenset({"enabled", "ca_cert", "ca_key", "ca_cert_out"})
        )
        mitm = MitmSettings(
            enabled=self.boolean(mm, "enabled", f"{path}.mitm", False),
            ca_cert=self.path_value(mm, "ca_cert", f"{path}.mitm", must_exist=True),
            ca_key=self.path_value(mm, "ca_key", f"{path}.mitm", must_exist=True),
            ca_cert_out=self.path_value(mm, "ca_cert_out", f"{path}.mitm", must_exist=False),
        )
        if (mitm.ca_cert is None) != (mitm.ca_key is None):
            self.fail(f"{path}.mitm", "ca_cert and ca_key go together")
        hosts = self.string_list(m, "passthrough_hosts", path, (), item_check=_check_passthrough)
        enabled = self.boolean(m, "enabled", path, True)
        if not enabled:
            # Both act on CONNECT, which a disabled forward proxy refuses: they could never apply.
            if mitm.enabled:
                self.fail(f"{path}.mitm.enabled", "needs forward_proxy.enabled (interception serves CONNECT)")
            if hosts:
                self.fail(f"{path}.passthrough_hosts", "needs forward_proxy.enabled (tunnels are CONNECTs)")
        elif mitm.enabled and mitm.ca_cert is None and mitm.ca_key is None and mitm.ca_cert_out is None:
            # A CA generated at start and written nowhere: no app could trust it, so every
            # intercepted CONNECT would end in a failed TLS handshake.
            self.fail(
                f"{path}.mitm.ca_cert_out",
                "is required when the CA is generated (no ca_cert/ca_key): without it no app can trust "
                "the interception CA; set it to a path the app reads (REQUESTS_CA_BUNDLE, SSL_CERT_FILE, "
                "CURL_CA_BUNDLE), or give your own ca_cert and ca_key",
            )
        if enabled:
            self.check_forward_proxy_origins(upstreams)
        return ForwardProxySettings(
            enabled=enabled,
            passthrough_hosts=hosts,
            passthrough_allow_private=self.boolean(m, "passthrough_allow_private", path, False),
            mitm=mitm,
        )

    def check_forward_proxy_origins(self, upstreams: Mapping[str, UpstreamSettings]) -> None:
        """At most one upstream per host, port and path takes part in forward-proxy matching.

        Route mode names the upstream in the path, so any number may share an origin
        (two key sets for one API). Forward-proxy mode matches by host, port and longest
        base path: two upstreams with all three equal would make that match ambiguous.
        """
        seen: dict[tuple[str, int, str], str] = {}
        for up in upstreams.values():
            if not up.forward_proxy:
                continue
            origin = (up.host, up.port, up.base_path)
            other = seen.get(origin)
            if other is not None:
                self.fail(
                    f"upstreams.{up.name}.url",
                    f"same host, port and path as upstreams.{other}, and both take part in forward-proxy "
                    f"matching, which could not tell them apart; set forward_proxy: false on upstreams.{up.name} "
                    f"or upstreams.{other} (route mode reaches both either way)",
                )
            seen[origin] = up.name


# Headers the sidecar sets or strips itself; a key injected there would be lost or unsafe.
_FORBIDDEN_INJECT_HEADERS = frozenset(
    {
        "host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade",
        "te", "trailer", "proxy-connection",
    }
)


def vault_path_problem(value: str) -> str | None:
    """Why ``value`` cannot be a Vault path (a mount, a secret id), or None.

    An empty segment, ``.`` or ``..`` would be read as another path (or resolved away
    by a URL library): the id asked for and the secret read could differ.
    """
    if not value or value.startswith("/"):
        return "must be a path like mcp/polygon/{client_id} (no leading /)"
    if any(segment in ("", ".", "..") for segment in value.split("/")):
        return "has an empty, . or .. segment"
    return None


def _check_passthrough(value: str) -> str | None:
    if "*" in value:
        return "wildcards are not allowed: name each host (the perimeter lists destinations exactly)"
    if parse_passthrough(value) is None:
        return "expected host or host:port"
    return None


def _check_client_id(value: str) -> str | None:
    if CLIENT_ID_PATTERN.fullmatch(value):
        return None
    return f"does not match {CLIENT_ID_PATTERN.pattern}"


def check_template(template: str, allowed: frozenset[str], required: str | None = None) -> str | None:
    """Return a problem with a str.format template, or None when it only uses ``allowed``."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"invalid template ({exc})"
    fields = [f for _, f, _, _ in parsed if f is not None]
    if any(spec or conv for _, f, spec, conv in parsed if f is not None):
        return "placeholders take no conversion or format spec (write {name} only)"
    for name in fields:
        if name not in allowed:
            return f"unknown placeholder {{{name}}}; expected {', '.join('{' + a + '}' for a in sorted(allowed))}"
    if required is not None and fields.count(required) != 1:
        return f"must contain {{{required}}} exactly once"
    return None


def _same_socket(a: str, b: str) -> bool:
    """Whether two listeners on one port would collide: the same host, or a wildcard of the other's family.

    An IPv6 listener is IPv6-only (asyncio and uvloop set IPV6_V6ONLY), so 0.0.0.0 and
    [::1] on one port can both bind, while 0.0.0.0 and 127.0.0.1 cannot.
    """
    if a == b:
        return True
    families = []
    for host in (a, b):
        try:
            families.append(ipaddress.ip_address(host).version)
        except ValueError:
            return False  # a name: what it resolves to is known only when binding
    wildcard = {4: "0.0.0.0", 6: "::"}
    return families[0] == families[1] and wildcard[families[0]] in (a, b)


def _empty_interpolation(value: Any) -> bool:
    """${X:-} or an empty X: a text or list key then takes its default, as if left out.

    (A number or boolean key refuses it instead; docs/configuration.md says to leave
    such a key out.)
    """
    return isinstance(value, _FromEnv) and value == ""


def _coerce(value: Any, kind: type[T]) -> T | None:
    if isinstance(value, bool):
        return None
    if kind is float and isinstance(value, int | float):
        return float(value)  # type: ignore[return-value]
    if kind is int and isinstance(value, int):
        return value  # type: ignore[return-value]
    if isinstance(value, _FromEnv):
        try:
            return kind(value.strip())  # type: ignore[call-arg]
        except ValueError:
            return None
    return None


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _closest(key: str, allowed: frozenset[str]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
    return matches[0] if matches else None
