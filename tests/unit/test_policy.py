"""Pure policy decisions: which addresses an upstream may reach, which clients may call it."""

from __future__ import annotations

import ipaddress

import pytest

from sidecar.policy import client_allowed, compile_client_matcher, is_forbidden_address, scopes_allowed

FORBIDDEN = [
    # loopback
    "127.0.0.1",
    "127.255.255.254",
    "::1",
    # RFC 1918
    "10.0.0.1",
    "10.255.255.255",
    "172.16.0.1",
    "172.31.255.255",
    "192.168.0.1",
    "192.168.255.255",
    # link-local, including the cloud metadata endpoints
    "169.254.0.1",
    "169.254.169.254",
    "fe80::1",
    "fd00:ec2::254",
    # unique local
    "fc00::1",
    # shared address space (CGNAT)
    "100.64.0.1",
    "100.127.255.255",
    # multicast
    "224.0.0.1",
    "239.255.255.250",
    "ff02::1",
    "ff0e::1",
    # reserved, broadcast, documentation, benchmarking
    "240.0.0.1",
    "255.255.255.255",
    "192.0.2.1",
    "198.18.0.1",
    "2001:db8::1",
    "100::1",
    # unspecified and "this network"
    "0.0.0.0",
    "0.1.2.3",
    "::",
    # IPv4-mapped IPv6 of each IPv4 kind above
    "::ffff:127.0.0.1",
    "::ffff:10.0.0.1",
    "::ffff:172.16.0.1",
    "::ffff:192.168.1.1",
    "::ffff:169.254.169.254",
    "::ffff:100.64.0.1",
    "::ffff:224.0.0.1",
    "::ffff:240.0.0.1",
    "::ffff:0.0.0.0",
    # 6to4 embedding a private or loopback IPv4 address
    "2002:7f00:1::",
    "2002:a00:1::1",
    "2002:a9fe:a9fe::",
    # NAT64 (64:ff9b::/96) embedding a private, loopback or metadata address
    "64:ff9b::7f00:1",
    "64:ff9b::a00:1",
    "64:ff9b::a9fe:a9fe",
    # Teredo tunnels are refused outright (the embedded server/client can be anything)
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",
    "2001::1",
    # IPv4-translated (SIIT, ::ffff:0:0:0/96): Python counts these as global
    "::ffff:0:a9fe:a9fe",
    "::ffff:0:a00:1",
    "::ffff:0:7f00:1",
]

ALLOWED = [
    "8.8.8.8",
    "1.1.1.1",
    "172.32.0.1",  # just outside 172.16/12
    "100.128.0.1",  # just outside 100.64/10
    "2606:4700::1111",
    "2a00:1450:4001:80b::200e",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",  # NAT64 of a public address
    "::ffff:0:808:808",  # SIIT of a public address
    "2002:808:808::",  # 6to4 of a public address
]


@pytest.mark.parametrize("address", FORBIDDEN)
def test_forbidden_addresses(address: str) -> None:
    assert is_forbidden_address(ipaddress.ip_address(address)) is True


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_allowed(address: str) -> None:
    assert is_forbidden_address(ipaddress.ip_address(address)) is False


# ------------------------------------------------------------------ client globs


@pytest.mark.parametrize(
    ("patterns", "client", "allowed"),
    [
        (["alice"], "alice", True),
        (["alice"], "alice2", False),
        (["alice"], "xalice", False),
        (["team-*"], "team-a", True),
        (["team-*"], "team-", True),
        (["team-*"], "team", False),
        (["team-*"], "other-team-a", False),
        (["user?"], "user1", True),
        (["user?"], "user12", False),
        (["user?"], "user", False),
        (["alice", "bob*"], "bob.smith", True),
        (["alice", "bob*"], "alice", True),
        (["alice", "bob*"], "carol", False),
        (["*"], "anyone@example.com", True),
        (["alice", "*"], "mallory", True),
        ([], "alice", False),
        ([], "", False),
        (["Alice"], "alice", False),
        (["alice"], "ALICE", False),
        (["team-*"], "TEAM-a", False),
        (["a.b"], "aXb", False),  # a dot in a pattern is a literal dot, not a regex wildcard
        (["a+b"], "a+b", True),
        (["a+b"], "aab", False),
    ],
)
def test_client_globs(patterns: list[str], client: str, allowed: bool) -> None:
    assert client_allowed(compile_client_matcher(patterns), client) is allowed


def test_star_compiles_to_allow_all() -> None:
    assert compile_client_matcher(["*"]) is None
    assert client_allowed(None, "whoever") is True


def test_matcher_accepts_any_iterable_once() -> None:
    matcher = compile_client_matcher(p for p in ["a*", "b"])
    assert client_allowed(matcher, "abc")
    assert client_allowed(matcher, "b")
    assert not client_allowed(matcher, "c")


# ------------------------------------------------------------------ scopes


@pytest.mark.parametrize(
    ("required", "held", "allowed"),
    [
        (set(), set(), True),
        (set(), {"read"}, True),
        ({"polygon"}, {"polygon"}, True),
        ({"polygon", "admin"}, {"admin"}, True),
        ({"polygon"}, {"other", "polygon", "x"}, True),
        ({"polygon"}, set(), False),
        ({"polygon"}, {"Polygon"}, False),
        ({"polygon", "admin"}, {"read"}, False),
    ],
)
def test_scopes_allowed(required: set[str], held: set[str], allowed: bool) -> None:
    assert scopes_allowed(frozenset(required), frozenset(held)) is allowed


def test_allowed_addresses_filters_dedupes_and_ignores_zones() -> None:
    from sidecar.policy import allowed_addresses

    answers = ["10.0.0.1", "93.184.216.34", "fe80::1%eth0", "93.184.216.34", "2606:4700:4700::1111"]
    assert allowed_addresses(answers, allow_private=False) == ["93.184.216.34", "2606:4700:4700::1111"]
    assert allowed_addresses(answers, allow_private=True) == [
        "10.0.0.1", "93.184.216.34", "fe80::1%eth0", "2606:4700:4700::1111"
    ]
    assert allowed_addresses(["127.0.0.1", "169.254.169.254"], allow_private=False) == []
