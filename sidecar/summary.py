"""``check``'s one-screen description of a config: what a reader needs to confirm it means what they meant.

It holds no secret by construction: the settings carry secret ids and templates, never values.
"""

from __future__ import annotations

from sidecar.config import CredentialSettings, Settings, TracingSettings, VaultBackendSettings
from sidecar.net import host_port, loggable_url


def describe(settings: Settings) -> str:
    """The summary ``credential-sidecar check`` prints."""
    lines = [
        f"config:        {settings.source or '(inline)'}",
        f"listen:        {settings.listen}",
        f"admin_listen:  {settings.admin_listen}",
        f"workers:       {settings.workers}",
    ]
    if settings.tracing.otlp_endpoint is not None:
        lines.append(f"tracing:       {_tracing(settings.tracing)}")
    issuers = settings.identity.jwt
    if not issuers:
        lines.append(f"identity:      header {settings.identity.header}")
    else:
        lines.append(
            f"identity:      verified JWT in {issuers[0].header}; "
            + (f"{len(issuers)} issuers" if len(issuers) > 1 else "1 issuer")
        )
    for jwt in issuers:
        if jwt.jwks_url:
            source = loggable_url(jwt.jwks_url)
        else:
            source = "OIDC discovery"
        lines.append(
            f"  {loggable_url(jwt.issuer or '')}  keys from {source}"
            + (f" (ca_file {jwt.ca_file})" if jwt.ca_file else "")
            + f"; client ID from {', '.join(jwt.client_id_claims)}"
            + (f"; token_use={jwt.require_token_use}" if jwt.require_token_use else "")
            + (f"; requires {', '.join(name for name, _ in jwt.required_claims)}" if jwt.required_claims else "")
        )
    if settings.identity.default_client_id:
        lines.append(f"               default client ID {settings.identity.default_client_id}")
    s = settings.secrets
    if s.backend == "file":
        where = str(s.file.path)
    elif s.backend == "aws":
        where = (
            f"AWS Secrets Manager region={s.aws.region or '(default chain)'}"
            + (f" endpoint={loggable_url(s.aws.endpoint_url)}" if s.aws.endpoint_url else "")
            + f" stage={s.aws.version_stage}"
        )
    else:
        where = _vault(s.vault)
    lines.append(f"secrets:       {s.backend}: {where} lookup_timeout={s.lookup_timeout_seconds:g}s")
    if s.backend == "vault":
        lines.append(
            "               an entry read without secret_field gives its one field; "
            "an entry of several fields needs the upstream's secret_field"
        )
    lines.append(
        f"cache:         ttl={s.cache.ttl_seconds:g}s negative={s.cache.negative_ttl_seconds:g}s "
        f"stale_if_error={s.cache.stale_if_error_seconds:g}s max={s.cache.max_entries}"
        + (f" prefetch={len(s.prefetch)} clients" if s.prefetch else "")
    )
    fp = settings.forward_proxy
    lines.append(
        "forward_proxy: "
        + ("on" if fp.enabled else "off")
        + (f", passthrough {', '.join(fp.passthrough_hosts)}" if fp.passthrough_hosts else "")
        + (", mitm on" if fp.mitm.enabled else "")
    )
    lines.append(f"upstreams:     {len(settings.upstreams)}")
    for up in settings.upstreams.values():
        where_key = (
            f"query {up.inject.name}"
            if up.inject.kind == "query"
            else f"header {up.inject.name}"
        )
        lines.append(
            f"  {up.name:<12} {up.url}"
            + (f"  connect_to={host_port(*up.connect_to)}" if up.connect_to else "")
            + (f"  secret={up.secret}" if up.secret else "")
            + (f"[{up.secret_field}]" if up.secret_field else "")
            + (f"  credential={_credential(up.credential)}" if up.credential.oauth else "")
            + f"  inject={where_key}  clients={','.join(up.clients)}"
            + (f"  scopes={','.join(up.scopes)}" if up.scopes else "")
            + (" allow_private" if up.allow_private else "")
            + (" route_only" if not up.forward_proxy else "")
        )
    return "\n".join(lines)


def _vault(v: VaultBackendSettings) -> str:
    """Where Vault is and how the sidecar logs in: names and paths, never a token."""
    a = v.auth
    how = {
        "token": f"token from {a.token_file}" if a.token_file else "token from VAULT_TOKEN",
        "approle": f"approle role_id={a.role_id} secret_id from {a.secret_id_file}",
        "kubernetes": f"kubernetes role={a.role} jwt from {a.jwt_file}",
        "jwt": f"jwt role={a.role} jwt from {a.jwt_file}",
    }[a.method]
    return (
        f"Vault KV v2 at {loggable_url(v.address)} mount={v.mount}"
        + (f" namespace={v.namespace}" if v.namespace else "")
        + (f" ca_file={v.ca_file}" if v.ca_file else "")
        + f" auth={how}"
        + (f" (at auth/{a.mount})" if a.mount != a.method else "")
    )


def _credential(c: CredentialSettings) -> str:
    """The credential type and where its tokens come from: URLs, ids and file names, never a secret."""
    parts = [c.type, f"token_url={loggable_url(c.token_url or '')}", c.auth_method]
    if c.client_id:
        parts.append(f"client_id={c.client_id}")
    if c.client_secret_file:
        parts.append(f"client_secret from {c.client_secret_file}")
    elif c.client_secret:
        parts.append("client_secret set")
    if c.scopes:
        parts.append(f"scopes={','.join(c.scopes)}")
    if c.audience:
        parts.append(f"audience={c.audience}")
    if c.authorize_url:
        parts.append(f"authorize_url={loggable_url(c.authorize_url)}")
    return "(" + " ".join(parts) + ")"


def _tracing(t: TracingSettings) -> str:
    """Where spans go: the collector's URL (no user information or query), never a header."""
    assert t.otlp_endpoint is not None
    return (
        f"OTLP/HTTP {loggable_url(t.otlp_endpoint)} service={t.service_name} timeout={t.timeout_seconds:g}s"
        + (" client_id=on" if t.client_id else "")
    )
