"""Which upstream a request goes to, and whether a CONNECT is tunnelled, intercepted or refused.

Every routing rule is here; ``Routes.build`` makes the tables once per runtime (at
start and on each reload), and a request does dict look-ups:

    route mode     /name/rest ──▶ by_name[name] ──▶ base_path + /rest
    forward proxy  http://host[:port]/path ──▶ by_origin[(host, port)] ──▶ longest base path
    intercepted    (origin fixed by the CONNECT) ──▶ by_origin[origin], https upstreams only
    CONNECT        passthrough_hosts ─▶ tunnel │ https upstream + mitm ─▶ intercept │ else refused

Forward-proxy host matching (absolute-form and CONNECT) sees only the upstreams with
``forward_proxy: true``; the others are reached by route mode alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from sidecar.config import ForwardProxySettings
from sidecar.credentials.base import CredentialProvider
from sidecar.errors import BadRequest, DestinationNotAllowed, UnknownUpstream
from sidecar.net import normalize_host, parse_passthrough
from sidecar.record import Record
from sidecar.upstream import Upstream

#: Methods never forwarded: an upstream implementing them reflects the request,
#: injected key included, back to the app.
REFUSED_METHODS = frozenset({"TRACE", "TRACK"})

Origin = tuple[str, int]


class Route:
    """One upstream as requests reach it: what is sent where, what never goes along, and
    how the credential is got (its provider, built for this runtime)."""

    __slots__ = ("base_path", "credential", "drop", "https", "logged_type", "name", "upstream")

    def __init__(self, upstream: Upstream, drop: frozenset[str], credential: CredentialProvider) -> None:
        self.upstream = upstream
        self.name = upstream.name
        self.credential = credential
        #: the access line's ``credential``: the type, but None for a stored key (``api_key``)
        self.logged_type: str | None = None if credential.kind == "api_key" else credential.kind
        #: request headers never forwarded: hop-by-hop, local credentials, the injection
        #: point, and the headers that carried identity
        self.drop = drop
        self.base_path = upstream.settings.base_path
        self.https = upstream.settings.scheme == "https"


class Routes:
    """The routing tables of one runtime; a request keeps the ones it started with."""

    __slots__ = ("by_name", "by_origin", "forward_proxy", "mitm", "passthrough", "passthrough_allow_private")

    def __init__(
        self,
        by_name: dict[str, Route],
        by_origin: dict[Origin, tuple[Route, ...]],
        *,
        forward_proxy: bool = True,
        mitm: bool = False,
        passthrough: frozenset[Origin] = frozenset(),
        passthrough_allow_private: bool = False,
    ) -> None:
        self.by_name = by_name
        self.by_origin = by_origin  # longest base path first
        self.forward_proxy = forward_proxy
        self.mitm = mitm
        self.passthrough = passthrough
        self.passthrough_allow_private = passthrough_allow_private

    @staticmethod
    def build(
        upstreams: Mapping[str, Upstream],
        fp: ForwardProxySettings,
        strip_headers: frozenset[str],
        credentials: Mapping[str, CredentialProvider],
    ) -> Routes:
        """The tables for these upstreams. ``strip_headers``: what the identity resolver reads;
        ``credentials``: each upstream's provider, built for this runtime (credentials/factory.py)."""
        by_name = {
            name: Route(up, up.drop_request_headers | strip_headers, credentials[name])
            for name, up in upstreams.items()
        }
        by_origin: dict[Origin, list[Route]] = {}
        ordered = sorted(
            (r for r in by_name.values() if r.upstream.settings.forward_proxy),
            key=lambda r: len(r.base_path),
            reverse=True,
        )
        for route in ordered:
            s = route.upstream.settings
            by_origin.setdefault((s.host, s.port), []).append(route)
        for route in ordered:
            s = route.upstream.settings
            if route.https and s.port == 443 and not any(not r.https for r in by_origin.get((s.host, 80), [])):
                # HTTP_PROXY clients send http://host/ (port 80) for an https upstream:
                # the sidecar upgrades it to TLS.
                by_origin.setdefault((s.host, 80), []).append(route)
        passthrough = frozenset(hp for hp in map(parse_passthrough, fp.passthrough_hosts) if hp)
        return Routes(
            by_name,
            {origin: tuple(routes) for origin, routes in by_origin.items()},
            forward_proxy=fp.enabled,
            mitm=fp.mitm.enabled,
            passthrough=passthrough,
            passthrough_allow_private=fp.passthrough_allow_private,
        )

    def route(self, method: str, raw: str, origin: Origin | None, rec: Record) -> tuple[Route, str, str]:
        """The route of a request, with the path and raw query to send; refusals raise.

        ``raw`` is the request target as sent; ``origin`` the destination an intercepted
        CONNECT fixed (None outside a tunnel). Sets the record's mode, path and destination.
        """
        if method in REFUSED_METHODS:
            raise BadRequest(f"{method} is not forwarded: it would echo the injected key.", reason="method")
        if origin is not None:
            # Inside an intercepted CONNECT: the destination was fixed by the CONNECT,
            # whatever the Host header says.
            rec.mode = "mitm"
            if not self.mitm:
                raise DestinationNotAllowed("TLS interception was turned off.", reason="mitm_disabled")
            if not raw.startswith("/"):
                raise BadRequest("Requests inside a tunnel use origin-form targets.", reason="bad_target")
            path, _, query = raw.partition("?")
            rec.path = path
            return self._match_origin(origin, True, path, query)
        if raw.startswith("/"):
            path, _, query = raw.partition("?")
            rec.path = path
            name, slash, rest = path[1:].partition("/")
            route = self.by_name.get(name)
            if route is None:
                raise UnknownUpstream()
            target = route.base_path + ("/" + rest if slash else "")
            return route, target or "/", query
        rec.mode = "proxy"
        if method == "CONNECT":
            # The listener handles CONNECT as the first request of a connection (connect.py);
            # one that follows other requests on a kept-alive connection is refused.
            raise DestinationNotAllowed("CONNECT must be the first request on a connection.", reason="connect")
        if not self.forward_proxy:
            raise BadRequest("Forward-proxy requests are disabled.", reason="forward_proxy_disabled")
        return self._match_absolute(raw, rec)

    def connect(self, host: str, port: int, rec: Record, can_intercept: bool) -> Route | None:
        """What a CONNECT to ``host``:``port`` (normalised) gets: None for a passthrough tunnel,
        the route to intercept; refusals raise. ``can_intercept``: the listener holds a CA."""
        if not self.forward_proxy:
            raise DestinationNotAllowed("Forward-proxy mode is disabled.", reason="forward_proxy_disabled")
        if (host, port) in self.passthrough:
            return None
        route = next((r for r in self.by_origin.get((host, port), ()) if r.https), None)
        if route is None:
            raise DestinationNotAllowed(reason="not_an_upstream")
        rec.upstream = route.name
        if not self.mitm or not can_intercept:
            raise DestinationNotAllowed(
                "CONNECT to an upstream needs TLS interception (forward_proxy.mitm); "
                "use route mode or http:// with HTTP_PROXY.",
                reason="connect_not_intercepted",
            )
        return route

    def _match_absolute(self, raw: str, rec: Record) -> tuple[Route, str, str]:
        try:
            parts = urlsplit(raw)
            port = parts.port
        except ValueError:
            raise BadRequest("The request target is not a valid URL.", reason="bad_target") from None
        rec.path = parts.path or "/"
        rec.destination = parts.netloc.rpartition("@")[2]  # never userinfo in a log line
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise DestinationNotAllowed("Only http and https destinations exist here.", reason="scheme")
        if "@" in parts.netloc or parts.fragment:
            raise BadRequest("The request target carries user information or a fragment.", reason="bad_target")
        host = normalize_host(parts.hostname or "")
        if host is None:
            raise DestinationNotAllowed("The destination host is not valid.", reason="bad_host")
        https = scheme == "https"
        return self._match_origin((host, port or (443 if https else 80)), https, parts.path or "/", parts.query)

    def _match_origin(self, origin: Origin, https: bool, path: str, query: str) -> tuple[Route, str, str]:
        """The route on this host and port with the longest base path that prefixes ``path``."""
        for route in self.by_origin.get(origin, ()):
            if https and not route.https:
                continue  # never send what arrived over TLS on in the clear
            base = route.base_path
            if not base or path == base or path.startswith(base + "/"):
                return route, path, query
        raise DestinationNotAllowed(reason="not_an_upstream")
