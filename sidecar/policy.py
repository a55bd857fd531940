"""Pure decisions: which addresses an upstream connection may reach, which clients may call.

Nothing here does I/O. The resolver in ``upstream.py`` asks ``is_forbidden_address``
about every address a name resolves to, and connects only to the addresses it
allowed, so a DNS answer cannot change between the check and the connection.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from fnmatch import translate


def ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def is_forbidden_address(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for addresses an upstream may not resolve to unless it sets allow_private."""
    if isinstance(addr, ipaddress.IPv6Address):
        mapped = addr.ipv4_mapped or addr.sixtofour
        if mapped is not None:
            return is_forbidden_address(mapped)
        if addr.teredo is not None:
            return True
        if addr in _NAT64 or addr in _SIIT:
            return is_forbidden_address(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    return not addr.is_global or addr.is_multicast or any(addr in net for net in _ALSO_FORBIDDEN)


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
#: IPv4-translated addresses (RFC 2765 SIIT): not ipv4_mapped, and Python calls them global.
_SIIT = ipaddress.IPv6Network("::ffff:0:0:0/96")
_ALSO_FORBIDDEN = (
    ipaddress.IPv4Network("100.64.0.0/10"),  # shared address space (CGNAT)
    ipaddress.IPv4Network("0.0.0.0/8"),
    ipaddress.IPv6Network("fd00:ec2::/32"),  # EC2 IMDS over IPv6 lives in ULA space
    ipaddress.IPv6Network("::/96"),  # IPv4-compatible (::127.0.0.1), deprecated but still routed by some stacks
    ipaddress.IPv6Network("64:ff9b:1::/48"),  # local-use NAT64 (RFC 8215)
    ipaddress.IPv6Network("fec0::/10"),  # site-local, deprecated
)


def allowed_addresses(candidates: Iterable[str], allow_private: bool) -> list[str]:
    """The resolved addresses an upstream may connect to, in resolver order, without repeats.

    ``allow_private`` (internal APIs) lets every address through; otherwise loopback,
    private, link-local, reserved and the rest of ``is_forbidden_address`` are dropped.
    An IPv6 zone (``fe80::1%eth0``) is ignored for the check.
    """
    allowed: list[str] = []
    for address in candidates:
        if address in allowed:
            continue
        if allow_private or not is_forbidden_address(ipaddress.ip_address(address.split("%", 1)[0])):
            allowed.append(address)
    return allowed


def compile_client_matcher(patterns: Iterable[str]) -> re.Pattern[str] | None:
    """Compile glob patterns into one regex; None means every client is allowed."""
    patterns = list(patterns)
    if "*" in patterns:
        return None
    if not patterns:
        return re.compile(r"(?!)")  # matches nothing
    return re.compile("|".join(f"(?:{translate(p)})" for p in patterns))


def client_allowed(matcher: re.Pattern[str] | None, client_id: str) -> bool:
    """Glob match of a client ID against an upstream's ``clients`` (case-sensitive)."""
    return matcher is None or matcher.match(client_id) is not None


def scopes_allowed(required: frozenset[str], held: frozenset[str]) -> bool:
    """An upstream with ``scopes`` needs the caller to hold at least one of them."""
    return not required or not required.isdisjoint(held)
