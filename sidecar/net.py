"""Host names, ports, URLs, TLS trust and the guarded name lookup: the network vocabulary.

Settings (config.py) read their addresses and URLs with these, and the request path
uses the same ones (the CONNECT authority, an absolute-form target, an answer's
Content-Length, the address guard), so the configuration and the data plane agree
on what a host is. Nothing here keeps state; only ``lookup`` touches the network.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, urlsplit

from sidecar.errors import DestinationNotAllowed, UpstreamUnreachable
from sidecar.policy import allowed_addresses, ip_literal


def host_port(host: str, port: int) -> str:
    """``host:port``, an IPv6 host in brackets (``[::1]:443``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class HostPort:
    """A host and a port: a listen address, a passthrough entry, connect_to."""

    host: str
    port: int

    def __str__(self) -> str:
        return host_port(self.host, self.port)


def ascii_digits(text: str) -> bool:
    """ASCII digits only (a port, a length): ``str.isdigit`` also takes '²', which ``int`` refuses."""
    return text.isascii() and text.isdigit()


_LEGACY_IPV4 = re.compile(r"[0-9a-fA-FxX.]+")


def normalize_host(host: str) -> str | None:
    """Lower-case, strip one trailing dot and IDNA-encode a host name; None if invalid."""
    if host.endswith(".") and not host.endswith(".."):
        host = host[:-1]  # the root label: "api.example.com." is "api.example.com"
    if not host:
        return None
    literal = ip_literal(host)
    if literal is not None:
        return literal.compressed
    if _LEGACY_IPV4.fullmatch(host):
        try:
            socket.inet_aton(host)
        except OSError:
            pass
        else:
            # 127.1, 2130706433, 0x7f000001: an address in disguise, never a name.
            return None
    try:
        encoded = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return None
    if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*", encoded):
        return None
    return encoded


def parse_host_port(
    value: str,
    *,
    default_port: int | None = None,
    port_zero: bool = False,
    normalize: bool = True,
    ipv6_brackets_only: bool = True,
    last_colon: bool = False,
) -> HostPort | str:
    """The one reader of ``host:port`` and ``[v6]:port``: a HostPort, or the problem.

    With no options it reads ``connect_to``: a port from 1 to 65535 is required, brackets
    hold an IPv6 address (no zone) and nothing else, and the host is normalised
    (normalize_host). The options are where the other readers differ; tests/unit/test_net.py
    pins what each makes of the same inputs.

    - ``default_port``: the port when none is written (a passthrough entry: 443).
    - ``port_zero``: port 0 is allowed (a listen address: the system picks one).
    - ``normalize=False``: the host as written, brackets removed, not judged (a listen
      address is bound, never compared).
    - ``ipv6_brackets_only=False``: brackets may hold any host, an IPv6 zone included.
    - ``last_colon``: the port is what follows the last colon, so a bare IPv6 address
      with a port (``::1:8080``) reads as ``::1`` and 8080, and brackets are removed only
      when they enclose the whole host (listen, a CONNECT authority). Without it, a
      bare host with two colons or more is an IPv6 address with no port.

    URLs are split by urllib instead (split_http_url, and the forward proxy's absolute-form
    targets): there an empty port or port 0 means the scheme's default, and a bracket
    must hold an IP address. tests/unit/test_net.py pins those rules beside these.
    """
    expected = f"expected host:port (IPv6 as [::1]:443), got {value!r}"
    raw_port: str | None = None
    if last_colon:
        host, sep, after = value.rpartition(":")
        if sep:
            raw_port = after
        else:
            host = value
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
    elif value.startswith("["):
        host, bracket, tail = value[1:].partition("]")
        if tail:
            if not tail.startswith(":"):
                return expected
            raw_port = tail[1:]
        if ipv6_brackets_only:
            if (
                not bracket
                or (raw_port is None and default_port is None)
                or ip_literal(host) is None
                or ":" not in host
            ):
                return expected
            if "%" in host:
                return "an IPv6 zone (%eth0) is not supported: name the address without it"
    else:
        host = value
        if value.count(":") == 1:
            host, _, raw_port = value.partition(":")
        if not host:
            return expected
    if raw_port is None:
        if default_port is None:
            return expected
        port = default_port
    else:
        if not ascii_digits(raw_port):
            return expected
        port = int(raw_port)
        lowest = 0 if port_zero else 1
        if not lowest <= port < 65536:
            return f"port {port} is out of range ({lowest}-65535)"
    if not normalize:
        return HostPort(host, port)
    normal = normalize_host(host)
    if normal is None:
        return f"invalid host {host!r}"
    return HostPort(normal, port)


def parse_listen(value: str) -> HostPort | None:
    """``listen``/``admin_listen``: ``host:port`` or ``[v6]:port``, port 0 allowed, the host as written."""
    parsed = parse_host_port(value, last_colon=True, port_zero=True, normalize=False)
    return None if isinstance(parsed, str) or not parsed.host else parsed


def parse_passthrough(entry: str) -> tuple[str, int] | None:
    """``host`` (port 443) or ``host:port`` of a passthrough entry, normalised; None if invalid."""
    parsed = parse_host_port(entry, default_port=443, ipv6_brackets_only=False)
    return None if isinstance(parsed, str) else (parsed.host, parsed.port)


def url_scheme(url: str) -> str:
    """The URL's scheme, lower-case; "" when urllib cannot split it (check_service_url says why)."""
    try:
        return urlsplit(url).scheme.lower()
    except ValueError:
        return ""


def loggable_url(url: str) -> str:
    """``scheme://host[:port]/path`` of a URL: never its user information or query, which may hold credentials."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
    except ValueError:
        return "(an invalid URL)"
    return f"{parts.scheme}://{netloc}{parts.path}"


def split_http_url(url: str) -> SplitResult | str:
    """An http(s) URL with a host, a valid port and no user information, or the problem."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port out of range or not a number)
    except ValueError as exc:
        # Only the port's messages are repeated: urllib's others (an IPv6 or NFKC problem)
        # can quote the whole netloc, and with it a password in user information.
        problem = str(exc)
        return f"invalid URL ({problem})" if problem.startswith("Port") else "invalid URL"
    if parts.scheme not in ("http", "https"):
        return "expected an http:// or https:// URL"
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        return "must not contain user information (user@host)"
    if not parts.hostname:
        return "has no host"
    return parts


def parse_upstream_url(url: str) -> tuple[str, str, int, str] | str:
    """Split an upstream URL into (scheme, host, port, base_path) or return the problem."""
    parts = split_http_url(url)
    if isinstance(parts, str):
        return parts
    if parts.query or parts.fragment:
        return "must not contain a query or fragment"
    port = parts.port
    raw_host = parts.hostname or ""
    host = normalize_host(raw_host)
    if host is None:
        return f"invalid host {raw_host!r}"
    default_port = 443 if parts.scheme == "https" else 80
    return parts.scheme, host, port or default_port, parts.path.rstrip("/")


def url_host(host: str) -> str:
    """A host as it appears in a URL or a Host header: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def trust_context(ca_file: Path | None) -> ssl.SSLContext:
    """What an https upstream is verified against: the system's CAs, plus ``ca_file``'s if set.

    ``check`` builds it once to refuse a file with no certificate; the upstream builds
    it again at start. Raises ssl.SSLError or OSError for an unusable file.
    """
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


async def lookup(host: str, port: int) -> list[str]:
    """The addresses a name resolves to, in resolver order. Raises OSError when it does not resolve."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


#: How names are resolved: ``lookup``'s shape. Both upstream clients and CONNECT tunnels
#: take one, so a test can answer a name with any address it likes (a rebinding name)
#: and see the guard below refuse it, whichever client would have connected.
Lookup = Callable[[str, int], Awaitable[list[str]]]


def forbidden_destination() -> DestinationNotAllowed:
    """The guard's refusal when the caller has no better one (see resolve_allowed's ``refusal``)."""
    return DestinationNotAllowed(
        "The destination resolves only to private, loopback, link-local or reserved addresses, "
        "which the sidecar does not reach.",
        reason="forbidden_address",
    )


async def resolve_allowed(
    host: str,
    port: int,
    allow_private: bool,
    refusal: Callable[[], DestinationNotAllowed] = forbidden_destination,
    *,
    lookup: Lookup = lookup,
) -> list[str]:
    """Resolve once; the addresses the guard allows. Callers connect only to these.

    The one address guard: the lean client and CONNECT tunnels call it (each under its
    own deadline), and aiohttp's client through ``transport.aio.GuardedResolver``.
    ``refusal`` is the caller's own forbidden_address refusal, naming the setting that
    would allow the host (``allow_private`` of an upstream, ``passthrough_allow_private``).
    ``lookup`` resolves a name (an IP address is never looked up).
    """
    try:
        candidates = [ipaddress.ip_address(host).compressed]
    except ValueError:
        try:
            candidates = await lookup(host, port)
        except OSError:
            raise UpstreamUnreachable("The destination name does not resolve.", reason="dns") from None
    allowed = allowed_addresses(candidates, allow_private)
    if not allowed:
        raise refusal()
    return allowed
