"""The host:port parsers, pinned: what each one makes of the same inputs today.

Five readers of host and port exist: ``listen``/``admin_listen`` (net.parse_listen),
``forward_proxy.passthrough_hosts`` (net.parse_passthrough), a CONNECT's authority
(connect.parse_authority), ``connect_to`` (net.parse_host_port) and URLs (an upstream's
``url``: net.parse_upstream_url; an absolute-form request target: routing's
Routes.route). They do not agree on every input (a bare ``::1:8080``, a bracketed
name, port 0, an IPv6 zone). These tables hold each one's answer so that a change
to any of them is a decision, never a side effect of sharing code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar import net
from sidecar.config import CacheSettings, InjectSettings, UpstreamSettings
from sidecar.credentials.static import StaticKey
from sidecar.errors import BadRequest, SidecarError
from sidecar.listen.connect import parse_authority
from sidecar.record import Record
from sidecar.routing import Route, Routes
from sidecar.secrets.cache import SecretCache
from sidecar.secrets.file import FileBackend
from sidecar.upstream import Upstream

# Each table: input -> (host, port), or how it is refused. LISTEN and PASSTHROUGH refuse
# with None; CONNECT_AUTHORITY with one of its two messages ("needs": "CONNECT needs
# host:port.", "invalid": "CONNECT names an invalid host."); CONNECT_TO with its problem
# ("expected": "expected host:port (IPv6 as [::1]:443), got '<input>'"); UPSTREAM_URL
# (https://<input>/v1) with its problem; ABSOLUTE_TARGET (http://<input>/v1) with the
# refusal's reason.

LISTEN: dict[str, Any] = {
    "example.com:443": ("example.com", 443),
    "Example.COM:8443": ("Example.COM", 8443),
    "example.com": None,
    "example.com:": None,
    ":443": None,
    "example.com:0": ("example.com", 0),
    "example.com:65535": ("example.com", 65535),
    "example.com:65536": None,
    "example.com:0443": ("example.com", 443),
    "example.com:+443": None,
    "example.com: 443": None,
    "example.com:²": None,
    "example.com:443:1": ("example.com:443", 1),
    "example.com.:443": ("example.com.", 443),
    "example.com..:443": ("example.com..", 443),
    "bücher.example:443": ("bücher.example", 443),
    "xn--bcher-kva.example:443": ("xn--bcher-kva.example", 443),
    "ex_ample.com:443": ("ex_ample.com", 443),
    "a/b:443": ("a/b", 443),
    "user@example.com:443": ("user@example.com", 443),
    "*.example.com:443": ("*.example.com", 443),
    "127.0.0.1:443": ("127.0.0.1", 443),
    "127.1:443": ("127.1", 443),
    "2130706433:443": ("2130706433", 443),
    "0x7f000001:443": ("0x7f000001", 443),
    "0.0.0.0:0": ("0.0.0.0", 0),
    "localhost:8080": ("localhost", 8080),
    "[::1]:443": ("::1", 443),
    "[::1]": None,
    "[::1]:": None,
    "[::1]:0": ("::1", 0),
    "::1:8080": ("::1", 8080),
    "::1": (":", 1),
    "[::1]x:443": ("[::1]x", 443),
    "[example.com]:443": ("example.com", 443),
    "[fe80::1%eth0]:443": ("fe80::1%eth0", 443),
    "fe80::1%eth0": None,
    "[::FFFF:127.0.0.1]:443": ("::FFFF:127.0.0.1", 443),
    "[0:0::1]:443": ("0:0::1", 443),
    "[127.0.0.1]:443": ("127.0.0.1", 443),
    "[::1": ("[:", 1),
    "[]:443": None,
}

PASSTHROUGH: dict[str, Any] = {
    "example.com:443": ("example.com", 443),
    "Example.COM:8443": ("example.com", 8443),
    "example.com": ("example.com", 443),
    "example.com:": None,
    ":443": None,
    "example.com:0": None,
    "example.com:65535": ("example.com", 65535),
    "example.com:65536": None,
    "example.com:0443": ("example.com", 443),
    "example.com:+443": None,
    "example.com: 443": None,
    "example.com:²": None,
    "example.com:443:1": None,
    "example.com.:443": ("example.com", 443),
    "example.com..:443": None,
    "bücher.example:443": ("xn--bcher-kva.example", 443),
    "xn--bcher-kva.example:443": ("xn--bcher-kva.example", 443),
    "ex_ample.com:443": None,
    "a/b:443": None,
    "user@example.com:443": None,
    "*.example.com:443": None,
    "127.0.0.1:443": ("127.0.0.1", 443),
    "127.1:443": None,
    "2130706433:443": None,
    "0x7f000001:443": None,
    "0.0.0.0:0": None,
    "localhost:8080": ("localhost", 8080),
    "[::1]:443": ("::1", 443),
    "[::1]": ("::1", 443),
    "[::1]:": None,
    "[::1]:0": None,
    "::1:8080": ("::1:8080", 443),
    "::1": ("::1", 443),
    "[::1]x:443": None,
    "[example.com]:443": ("example.com", 443),
    "[fe80::1%eth0]:443": ("fe80::1%eth0", 443),
    "fe80::1%eth0": ("fe80::1%eth0", 443),
    "[::FFFF:127.0.0.1]:443": ("::ffff:7f00:1", 443),
    "[0:0::1]:443": ("::1", 443),
    "[127.0.0.1]:443": ("127.0.0.1", 443),
    "[::1": ("::1", 443),
    "[]:443": None,
}

CONNECT_AUTHORITY: dict[str, Any] = {
    "example.com:443": ("example.com", 443),
    "Example.COM:8443": ("example.com", 8443),
    "example.com": "needs",
    "example.com:": "needs",
    ":443": "invalid",
    "example.com:0": "needs",
    "example.com:65535": ("example.com", 65535),
    "example.com:65536": "needs",
    "example.com:0443": ("example.com", 443),
    "example.com:+443": "needs",
    "example.com: 443": "needs",
    "example.com:²": "needs",
    "example.com:443:1": "invalid",
    "example.com.:443": ("example.com", 443),
    "example.com..:443": "invalid",
    "bücher.example:443": ("xn--bcher-kva.example", 443),
    "xn--bcher-kva.example:443": ("xn--bcher-kva.example", 443),
    "ex_ample.com:443": "invalid",
    "a/b:443": "needs",
    "user@example.com:443": "needs",
    "*.example.com:443": "invalid",
    "127.0.0.1:443": ("127.0.0.1", 443),
    "127.1:443": "invalid",
    "2130706433:443": "invalid",
    "0x7f000001:443": "invalid",
    "0.0.0.0:0": "needs",
    "localhost:8080": ("localhost", 8080),
    "[::1]:443": ("::1", 443),
    "[::1]": "needs",
    "[::1]:": "needs",
    "[::1]:0": "needs",
    "::1:8080": ("::1", 8080),
    "::1": "invalid",
    "[::1]x:443": "invalid",
    "[example.com]:443": ("example.com", 443),
    "[fe80::1%eth0]:443": ("fe80::1%eth0", 443),
    "fe80::1%eth0": "needs",
    "[::FFFF:127.0.0.1]:443": ("::ffff:7f00:1", 443),
    "[0:0::1]:443": ("::1", 443),
    "[127.0.0.1]:443": ("127.0.0.1", 443),
    "[::1": "invalid",
    "[]:443": "invalid",
}

CONNECT_TO: dict[str, Any] = {
    "example.com:443": ("example.com", 443),
    "Example.COM:8443": ("example.com", 8443),
    "example.com": "expected",
    "example.com:": "expected",
    ":443": "expected",
    "example.com:0": "port 0 is out of range (1-65535)",
    "example.com:65535": ("example.com", 65535),
    "example.com:65536": "port 65536 is out of range (1-65535)",
    "example.com:0443": ("example.com", 443),
    "example.com:+443": "expected",
    "example.com: 443": "expected",
    "example.com:²": "expected",
    "example.com:443:1": "expected",
    "example.com.:443": ("example.com", 443),
    "example.com..:443": "invalid host 'example.com..'",
    "bücher.example:443": ("xn--bcher-kva.example", 443),
    "xn--bcher-kva.example:443": ("xn--bcher-kva.example", 443),
    "ex_ample.com:443": "invalid host 'ex_ample.com'",
    "a/b:443": "invalid host 'a/b'",
    "user@example.com:443": "invalid host 'user@example.com'",
    "*.example.com:443": "invalid host '*.example.com'",
    "127.0.0.1:443": ("127.0.0.1", 443),
    "127.1:443": "invalid host '127.1'",
    "2130706433:443": "invalid host '2130706433'",
    "0x7f000001:443": "invalid host '0x7f000001'",
    "0.0.0.0:0": "port 0 is out of range (1-65535)",
    "localhost:8080": ("localhost", 8080),
    "[::1]:443": ("::1", 443),
    "[::1]": "expected",
    "[::1]:": "expected",
    "[::1]:0": "port 0 is out of range (1-65535)",
    "::1:8080": "expected",
    "::1": "expected",
    "[::1]x:443": "expected",
    "[example.com]:443": "expected",
    "[fe80::1%eth0]:443": "an IPv6 zone (%eth0) is not supported: name the address without it",
    "fe80::1%eth0": "expected",
    "[::FFFF:127.0.0.1]:443": ("::ffff:7f00:1", 443),
    "[0:0::1]:443": ("::1", 443),
    "[127.0.0.1]:443": "expected",
    "[::1": "expected",
    "[]:443": "expected",
}

UPSTREAM_URL: dict[str, Any] = {
    "example.com:443": ("example.com", 443),
    "Example.COM:8443": ("example.com", 8443),
    "example.com": ("example.com", 443),
    "example.com:": ("example.com", 443),
    ":443": "has no host",
    "example.com:0": ("example.com", 443),
    "example.com:65535": ("example.com", 65535),
    "example.com:65536": "invalid URL (Port out of range 0-65535)",
    "example.com:0443": ("example.com", 443),
    "example.com:+443": "invalid URL (Port could not be cast to integer value as '+443')",
    "example.com: 443": "invalid URL (Port could not be cast to integer value as ' 443')",
    "example.com:²": "invalid URL (Port could not be cast to integer value as '²')",
    "example.com:443:1": "invalid URL (Port could not be cast to integer value as '443:1')",
    "example.com.:443": ("example.com", 443),
    "example.com..:443": "invalid host 'example.com..'",
    "bücher.example:443": ("xn--bcher-kva.example", 443),
    "xn--bcher-kva.example:443": ("xn--bcher-kva.example", 443),
    "ex_ample.com:443": "invalid host 'ex_ample.com'",
    "a/b:443": ("a", 443),
    "user@example.com:443": "must not contain user information (user@host)",
    "*.example.com:443": "invalid host '*.example.com'",
    "127.0.0.1:443": ("127.0.0.1", 443),
    "127.1:443": "invalid host '127.1'",
    "2130706433:443": "invalid host '2130706433'",
    "0x7f000001:443": "invalid host '0x7f000001'",
    "0.0.0.0:0": ("0.0.0.0", 443),
    "localhost:8080": ("localhost", 8080),
    "[::1]:443": ("::1", 443),
    "[::1]": ("::1", 443),
    "[::1]:": ("::1", 443),
    "[::1]:0": ("::1", 443),
    "::1:8080": "invalid URL (Port could not be cast to integer value as ':1:8080')",
    "::1": "invalid URL (Port could not be cast to integer value as ':1')",
    "[::1]x:443": ("::1", 443),
    "[example.com]:443": "invalid URL",
    "[fe80::1%eth0]:443": ("fe80::1%eth0", 443),
    "fe80::1%eth0": "invalid URL (Port could not be cast to integer value as ':1%eth0')",
    "[::FFFF:127.0.0.1]:443": ("::ffff:7f00:1", 443),
    "[0:0::1]:443": ("::1", 443),
    "[127.0.0.1]:443": "invalid URL",
    "[::1": "invalid URL",
    "[]:443": "invalid URL",
}

ABSOLUTE_TARGET: dict[str, Any] = {
    "example.com:443": ("example.com", 443),
    "Example.COM:8443": ("example.com", 8443),
    "example.com": ("example.com", 80),
    "example.com:": ("example.com", 80),
    ":443": "bad_host",
    "example.com:0": ("example.com", 80),
    "example.com:65535": ("example.com", 65535),
    "example.com:65536": "bad_target",
    "example.com:0443": ("example.com", 443),
    "example.com:+443": "bad_target",
    "example.com: 443": "bad_target",
    "example.com:²": "bad_target",
    "example.com:443:1": "bad_target",
    "example.com.:443": ("example.com", 443),
    "example.com..:443": "bad_host",
    "bücher.example:443": ("xn--bcher-kva.example", 443),
    "xn--bcher-kva.example:443": ("xn--bcher-kva.example", 443),
    "ex_ample.com:443": "bad_host",
    "a/b:443": ("a", 80),
    "user@example.com:443": "bad_target",
    "*.example.com:443": "bad_host",
    "127.0.0.1:443": ("127.0.0.1", 443),
    "127.1:443": "bad_host",
    "2130706433:443": "bad_host",
    "0x7f000001:443": "bad_host",
    "0.0.0.0:0": ("0.0.0.0", 80),
    "localhost:8080": ("localhost", 8080),
    "[::1]:443": ("::1", 443),
    "[::1]": ("::1", 80),
    "[::1]:": ("::1", 80),
    "[::1]:0": ("::1", 80),
    "::1:8080": "bad_target",
    "::1": "bad_target",
    "[::1]x:443": ("::1", 443),
    "[example.com]:443": "bad_target",
    "[fe80::1%eth0]:443": ("fe80::1%eth0", 443),
    "fe80::1%eth0": "bad_target",
    "[::FFFF:127.0.0.1]:443": ("::ffff:7f00:1", 443),
    "[0:0::1]:443": ("::1", 443),
    "[127.0.0.1]:443": "bad_target",
    "[::1": "bad_target",
    "[]:443": "bad_target",
}

AUTHORITY_MESSAGES = {"needs": "CONNECT needs host:port.", "invalid": "CONNECT names an invalid host."}


def test_every_table_reads_the_same_inputs() -> None:
    tables = (PASSTHROUGH, CONNECT_AUTHORITY, CONNECT_TO, UPSTREAM_URL, ABSOLUTE_TARGET)
    assert all(list(table) == list(LISTEN) for table in tables)


@pytest.mark.parametrize(("value", "expected"), LISTEN.items())
def test_listen(value: str, expected: tuple[str, int] | None) -> None:
    parsed = net.parse_listen(value)
    assert (None if parsed is None else (parsed.host, parsed.port)) == expected


@pytest.mark.parametrize(("value", "expected"), PASSTHROUGH.items())
def test_passthrough(value: str, expected: tuple[str, int] | None) -> None:
    assert net.parse_passthrough(value) == expected


@pytest.mark.parametrize(("value", "expected"), CONNECT_AUTHORITY.items())
def test_connect_authority(value: str, expected: tuple[str, int] | str) -> None:
    if isinstance(expected, tuple):
        assert parse_authority(value) == expected
        return
    with pytest.raises(BadRequest) as refused:
        parse_authority(value)
    assert (str(refused.value), refused.value.reason) == (AUTHORITY_MESSAGES[expected], "bad_authority")


@pytest.mark.parametrize(("value", "expected"), CONNECT_TO.items())
def test_connect_to(value: str, expected: tuple[str, int] | str) -> None:
    if expected == "expected":
        expected = f"expected host:port (IPv6 as [::1]:443), got {value!r}"
    parsed = net.parse_host_port(value)
    assert (parsed if isinstance(parsed, str) else (parsed.host, parsed.port)) == expected


@pytest.mark.parametrize(("value", "expected"), UPSTREAM_URL.items())
def test_upstream_url(value: str, expected: tuple[str, int] | str) -> None:
    parsed = net.parse_upstream_url(f"https://{value}/v1")
    assert (parsed if isinstance(parsed, str) else parsed[1:3]) == expected


def _origin_of(target: str, origin: tuple[str, int]) -> bool:
    """Whether the forward proxy routes the absolute-form ``target`` to ``origin``."""
    up = Upstream(
        UpstreamSettings(
            name="pinned", url="https://pinned.example", scheme="https", host="pinned.example", port=443,
            base_path="", secret="k/{client_id}", inject=InjectSettings("query", "apiKey"),
        )
    )
    cache = SecretCache(FileBackend(Path("/nonexistent/keys.json")), CacheSettings())
    route = Route(up, frozenset(), StaticKey(up.settings, cache))
    try:
        return Routes({}, {origin: (route,)}).route("GET", target, None, Record())[0] is route
    except SidecarError:
        return False


def _refusal_of(target: str) -> str | None:
    try:
        Routes({}, {}).route("GET", target, None, Record())
    except SidecarError as err:
        return err.reason
    return None


@pytest.mark.parametrize(("value", "expected"), ABSOLUTE_TARGET.items())
def test_absolute_target(value: str, expected: tuple[str, int] | str) -> None:
    target = f"http://{value}/v1"
    if isinstance(expected, tuple):
        assert _origin_of(target, expected)
    else:
        assert _refusal_of(target) == expected


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("HTTP://Example.COM:80/x", ("example.com", 80)),
        ("https://Example.COM/x", ("example.com", 443)),
        ("http://example.com./x", ("example.com", 80)),
        ("http://user@example.com:443/x", "bad_target"),
        ("http://example.com/x#frag", "bad_target"),
        ("ftp://example.com/x", "scheme"),
        ("http:///x", "bad_host"),
    ],
)
def test_absolute_target_url_forms(target: str, expected: tuple[str, int] | str) -> None:
    if isinstance(expected, tuple):
        assert _origin_of(target, expected)
    else:
        assert _refusal_of(target) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("HTTP://Example.COM:80/v1/", ("http", "example.com", 80, "/v1")),
        ("https://example.com", ("https", "example.com", 443, "")),
        ("https://user@example.com", "must not contain user information (user@host)"),
        ("https://example.com/v1?x=1", "must not contain a query or fragment"),
        ("ftp://example.com", "expected an http:// or https:// URL"),
    ],
)
def test_upstream_url_forms(url: str, expected: tuple[str, str, int, str] | str) -> None:
    assert net.parse_upstream_url(url) == expected


def test_loggable_url_drops_user_information_and_query() -> None:
    assert net.loggable_url("https://u:pw@idp.example:8443/keys?token=abc#x") == "https://idp.example:8443/keys"


@pytest.mark.parametrize(("text", "expected"), [("0", True), ("443", True), ("²", False), ("", False), ("-1", False)])
def test_ascii_digits(text: str, expected: bool) -> None:
    assert net.ascii_digits(text) is expected


@pytest.mark.parametrize(
    ("host", "port", "expected"), [("example.com", 443, "example.com:443"), ("::1", 8080, "[::1]:8080")]
)
def test_host_port(host: str, port: int, expected: str) -> None:
    assert net.host_port(host, port) == expected == str(net.HostPort(host, port))
