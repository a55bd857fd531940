"""Config validation: every mistake is caught at start, named by its field path, all at once."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from sidecar.client_id import CLIENT_ID_PATTERN
from sidecar.config import ListenAddress, load_settings, parse_settings
from sidecar.errors import ConfigError
from sidecar.net import loggable_url
from tests.support.leaks import make_secret
from tests.support.settings import config, parse, upstream

CLIENT_ID_RULE = f"does not match {CLIENT_ID_PATTERN.pattern}"


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.yaml"
    path.write_text(f"alice: {make_secret('config-alice')}\nbob: {make_secret('config-bob')}\n")
    return path


def problems(raw: Any, tmp_path: Path, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_settings(raw, base_dir=tmp_path, env=env or {})
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def one_problem(raw: Any, tmp_path: Path, env: dict[str, str] | None = None) -> str:
    found = problems(raw, tmp_path, env)
    assert len(found) == 1, found
    return found[0]


# ------------------------------------------------------------------ defaults


def test_defaults_equal_the_contract(tmp_path: Path, keys_file: Path) -> None:
    s = parse(config(keys_file), tmp_path)
    assert s.listen == ListenAddress("127.0.0.1", 8080)
    assert s.admin_listen == ListenAddress("127.0.0.1", 9901)
    assert s.shutdown_grace_seconds == 20
    assert s.workers == 1
    assert (s.log.level, s.log.format) == ("info", "json")
    assert s.identity.header == "X-Client-Id"
    assert s.identity.default_client_id is None
    assert s.identity.jwt == ()
    assert s.secrets.backend == "file"
    assert s.secrets.aws.endpoint_url is None
    assert s.secrets.aws.version_stage == "AWSCURRENT"
    assert s.secrets.lookup_timeout_seconds == 5
    assert s.secrets.aws.timeout_seconds is None  # one attempt may take the whole lookup_timeout_seconds
    c = s.secrets.cache
    assert (c.ttl_seconds, c.negative_ttl_seconds, c.stale_if_error_seconds, c.max_entries) == (300, 30, 3600, 10000)
    assert s.secrets.prefetch == ()
    up = s.upstreams["polygon"]
    assert (up.scheme, up.host, up.port, up.base_path) == ("https", "api.polygon.io", 443, "")
    assert up.secret_field is None
    assert (up.inject.kind, up.inject.name, up.inject.format) == ("query", "apiKey", "{secret}")
    assert up.clients == ("*",)
    assert up.scopes == ()
    assert up.timeout_seconds == 30
    assert up.allow_private is False
    assert up.ca_file is None
    fp = s.forward_proxy
    assert fp.enabled is True
    assert fp.passthrough_hosts == ()
    assert (fp.mitm.enabled, fp.mitm.ca_cert, fp.mitm.ca_key, fp.mitm.ca_cert_out) == (False, None, None, None)


def test_jwt_defaults_equal_the_contract(tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, identity={"jwt": {"jwks_url": "https://idp.example.com/jwks.json", "issuer": "https://idp.example.com"}})
    (jwt,) = parse(raw, tmp_path).identity.jwt
    assert jwt.header == "Authorization"
    assert jwt.audience == ()
    assert jwt.algorithms == ("RS256",)
    assert jwt.client_id_claims == ("client_id", "azp", "sub")
    assert jwt.leeway_seconds == 30
    assert (jwt.required_claims, jwt.ca_file, jwt.allow_http_jwks) == ((), None, False)


def test_empty_document_is_a_valid_config_with_no_upstreams(tmp_path: Path) -> None:
    s = parse(None, tmp_path)
    assert s.upstreams == {}
    assert s.listen == ListenAddress("127.0.0.1", 8080)


def test_the_contract_example_values_parse(tmp_path: Path, keys_file: Path) -> None:
    raw = config(
        keys_file,
        listen="127.0.0.1:8080",
        admin_listen="127.0.0.1:9901",
        shutdown_grace_seconds=20,
        workers=1,
        log={"level": "info", "format": "json"},
        identity={"header": "X-Client-Id", "default_client_id": None},
        forward_proxy={"enabled": True, "passthrough_hosts": [], "mitm": {"enabled": False}},
    )
    raw["secrets"].update(
        backend="file",
        aws={"region": "us-east-1", "endpoint_url": None, "version_stage": "AWSCURRENT"},
        cache={"ttl_seconds": 300, "negative_ttl_seconds": 30, "stale_if_error_seconds": 3600, "max_entries": 10000},
        prefetch=[],
    )
    raw["upstreams"]["polygon"].update(
        secret_field=None, clients=["*"], scopes=[], timeout_seconds=30, allow_private=False, ca_file=None
    )
    assert parse(raw, tmp_path).upstreams["polygon"].host == "api.polygon.io"


# ------------------------------------------------------------------ field paths, all at once


def test_inject_with_both_kinds_names_the_field(tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, upstreams={"polygon": upstream(inject={"query": "apiKey", "header": "X-Key"})})
    assert one_problem(raw, tmp_path) == "upstreams.polygon.inject: expected one of query, header"


def test_inject_with_neither_kind_names_the_field(tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, upstreams={"polygon": upstream(inject={"format": "{secret}"})})
    assert one_problem(raw, tmp_path) == "upstreams.polygon.inject: expected one of query, header"


def test_missing_inject_is_required(tmp_path: Path, keys_file: Path) -> None:
    up = upstream()
    del up["inject"]
    assert one_problem(config(keys_file, upstreams={"polygon": up}), tmp_path).startswith(
        "upstreams.polygon.inject: is required"
    )


@pytest.mark.parametrize("missing", ["url", "secret"])
def test_missing_upstream_fields_are_required(missing: str, tmp_path: Path, keys_file: Path) -> None:
    up = upstream()
    del up[missing]
    assert one_problem(config(keys_file, upstreams={"polygon": up}), tmp_path) == (
        f"upstreams.polygon.{missing}: is required"
    )


def test_every_problem_is_reported_at_once(tmp_path: Path, keys_file: Path) -> None:
    raw = config(
        keys_file,
        listen="nope",
        log={"level": "loud"},
        identity={"default_client_id": "../etc"},
        upstreams={
            "polygon": upstream(inject={"query": "apiKey", "header": "X-Key"}),
            "other": upstream(url="ftp://files.example.com", timeout_seconds=0),
        },
    )
    raw["secrets"]["cache"] = {"ttl_seconds": -1, "max_entries": 0}
    found = problems(raw, tmp_path)
    assert found == [
        "listen: expected host:port (for example 127.0.0.1:8080), got 'nope'",
        "log.level: expected one of debug, info, warning, error",
        f"identity.default_client_id: {CLIENT_ID_RULE}",
        "secrets.cache.ttl_seconds: must be at least 0",
        "secrets.cache.max_entries: must be between 1 and 10000000",
        "upstreams.polygon.inject: expected one of query, header",
        "upstreams.other.url: expected an http:// or https:// URL",
        "upstreams.other.timeout_seconds: must be greater than 0",
    ]


@pytest.mark.parametrize(
    ("section", "value", "expected"),
    [
        ("workers", 0, "workers: must be between 1 and 64"),
        ("workers", "two", "workers: expected an integer, got a string"),
        ("shutdown_grace_seconds", -5, "shutdown_grace_seconds: must be at least 0"),
        ("admin_listen", "127.0.0.1:8080", "admin_listen: must differ from listen"),
        ("forward_proxy", {"enabled": False, "mitm": {"enabled": True}},
         "forward_proxy.mitm.enabled: needs forward_proxy.enabled (interception serves CONNECT)"),
        ("forward_proxy", {"mitm": {"enabled": True}},
         "forward_proxy.mitm.ca_cert_out: is required when the CA is generated (no ca_cert/ca_key): without it "
         "no app can trust the interception CA; set it to a path the app reads (REQUESTS_CA_BUNDLE, "
         "SSL_CERT_FILE, CURL_CA_BUNDLE), or give your own ca_cert and ca_key"),
        ("forward_proxy", {"enabled": False, "passthrough_hosts": ["github.com"]},
         "forward_proxy.passthrough_hosts: needs forward_proxy.enabled (tunnels are CONNECTs)"),
        ("log", {"format": "xml"}, "log.format: expected one of json, text"),
        ("identity", {"header": "X Client"}, "identity.header: is not a valid HTTP header name"),
        ("upstreams", ["polygon"], "upstreams: expected a mapping of name to upstream, got a list"),
        ("forward_proxy", {"enabled": "yes"}, "forward_proxy.enabled: expected true or false, got a string"),
    ],
)
def test_type_and_range_problems_name_their_field(
    section: str, value: Any, expected: str, tmp_path: Path, keys_file: Path
) -> None:
    assert one_problem(config(keys_file, **{section: value}), tmp_path) == expected


def test_listen_accepts_ipv6_and_any_address(tmp_path: Path, keys_file: Path) -> None:
    s = parse(config(keys_file, listen="[::1]:18080", admin_listen="0.0.0.0:19901"), tmp_path)
    assert s.listen == ListenAddress("::1", 18080)
    assert str(s.listen) == "[::1]:18080"
    assert s.admin_listen == ListenAddress("0.0.0.0", 19901)


def test_upstream_name_must_be_a_path_segment(tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, upstreams={"poly/gon": upstream()})
    assert one_problem(raw, tmp_path).startswith("upstreams.poly/gon: upstream names are")


# ------------------------------------------------------------------ unknown keys


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r.update(listne="1.2.3.4:1"), "listne: unknown key (did you mean listen?)"),
        (
            lambda r: r["upstreams"]["polygon"].update(secert="x"),
            "upstreams.polygon.secert: unknown key (did you mean secret?)",
        ),
        (
            lambda r: r["upstreams"]["polygon"]["inject"].update(fromat="Bearer {secret}"),
            "upstreams.polygon.inject.fromat: unknown key (did you mean format?)",
        ),
        (
            lambda r: r["secrets"].update(cache={"ttl_second": 5}),
            "secrets.cache.ttl_second: unknown key (did you mean ttl_seconds?)",
        ),
        (
            lambda r: r.update(identity={"jwt": {"jwks_url": "https://i.example/jwks", "issuer": "https://i.example", "algorithm": ["RS256"]}}),
            "identity.jwt.algorithm: unknown key (did you mean algorithms?)",
        ),
        (lambda r: r.update(zzzz=1), "zzzz: unknown key"),
        (lambda r: r["secrets"]["file"].update({"1": "x"}), "secrets.file.1: unknown key"),
    ],
)
def test_unknown_keys_are_errors_with_a_suggestion(mutate: Any, expected: str, tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file)
    mutate(raw)
    assert one_problem(raw, tmp_path) == expected


def test_non_string_key_is_an_unknown_key(tmp_path: Path, keys_file: Path) -> None:
    raw: dict[Any, Any] = config(keys_file)
    raw[42] = "x"
    assert one_problem(raw, tmp_path) == "42: unknown key"


# ------------------------------------------------------------------ ${VAR} interpolation


def test_var_is_replaced_from_the_environment(tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, upstreams={"polygon": upstream(url="https://${POLY_HOST}/v1")})
    s = parse(raw, tmp_path, env={"POLY_HOST": "api.polygon.io"})
    assert s.upstreams["polygon"].host == "api.polygon.io"
    assert s.upstreams["polygon"].base_path == "/v1"


@pytest.mark.parametrize(
    ("env", "expected"),
    [({}, "info"), ({"LEVEL": ""}, "info"), ({"LEVEL": "debug"}, "debug")],
)
def test_default_applies_when_unset_or_empty(
    env: dict[str, str], expected: str, tmp_path: Path, keys_file: Path
) -> None:
    raw = config(keys_file, log={"level": "${LEVEL:-info}"})
    assert parse(raw, tmp_path, env=env).log.level == expected


def test_default_may_hold_colons_and_slashes(tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, upstreams={"polygon": upstream(url="${POLY_URL:-https://api.polygon.io:8443/v2}")})
    up = parse(raw, tmp_path).upstreams["polygon"]
    assert (up.host, up.port, up.base_path) == ("api.polygon.io", 8443, "/v2")


def test_set_but_empty_var_without_default_is_empty(tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, upstreams={"polygon": upstream(secret_field="${FIELD}")})
    assert parse(raw, tmp_path, env={"FIELD": ""}).upstreams["polygon"].secret_field is None


def test_missing_var_is_an_error_with_its_path(tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, upstreams={"polygon": upstream(url="https://${POLY_HOST}")})
    found = problems(raw, tmp_path)
    assert "upstreams.polygon.url: environment variable POLY_HOST is not set" in found


def test_missing_var_in_a_list_names_the_item(tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, upstreams={"polygon": upstream(clients=["alice", "${TEAM}"])})
    assert one_problem(raw, tmp_path) == "upstreams.polygon.clients[1]: environment variable TEAM is not set"


def test_every_missing_var_is_reported(tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, log={"level": "${A}", "format": "${B}"})
    found = problems(raw, tmp_path)
    assert "log.level: environment variable A is not set" in found
    assert "log.format: environment variable B is not set" in found


def test_double_dollar_is_a_literal_dollar(tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file)
    raw["secrets"]["aws"] = {"version_stage": "v$$1-$${NOT_A_VAR}"}
    s = parse(raw, tmp_path)  # NOT_A_VAR is not set, and must not be looked up
    assert s.secrets.aws.version_stage == "v$1-${NOT_A_VAR}"


def test_dollar_without_braces_is_kept(tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file)
    raw["secrets"]["aws"] = {"version_stage": "$HOME-cost$"}
    assert parse(raw, tmp_path, env={"HOME": "/root"}).secrets.aws.version_stage == "$HOME-cost$"


def test_interpolation_reads_os_environ_by_default(
    tmp_path: Path, keys_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SIDECAR_TEST_LEVEL", "warning")
    raw = config(keys_file, log={"level": "${SIDECAR_TEST_LEVEL}"})
    assert parse_settings(raw, base_dir=tmp_path).log.level == "warning"


def test_load_settings_interpolates_the_file(tmp_path: Path, keys_file: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(
        "listen: ${HOST:-127.0.0.1}:${PORT}\n"
        f"secrets:\n  file:\n    path: {keys_file.name}\n"
        "upstreams:\n  polygon:\n    url: https://api.polygon.io\n"
        "    secret: '{client_id}'\n    inject: {query: apiKey}\n"
        "    timeout_seconds: ${TIMEOUT}\n"
    )
    s = load_settings(path, env={"PORT": "18080", "TIMEOUT": "7.5"})
    assert s.listen == ListenAddress("127.0.0.1", 18080)
    assert s.upstreams["polygon"].timeout_seconds == 7.5
    assert s.source == path


# ------------------------------------------------------------------ numbers and booleans from env


def test_numbers_and_booleans_may_come_from_env(tmp_path: Path, keys_file: Path) -> None:
    raw = config(
        keys_file,
        workers="${WORKERS}",
        shutdown_grace_seconds="${GRACE}",
        forward_proxy={"enabled": "${FP:-false}"},
        upstreams={
            "polygon": upstream(
                url="http://10.0.0.5", timeout_seconds="${TIMEOUT}", allow_private="${PRIVATE}"
            )
        },
    )
    raw["secrets"]["cache"] = {"ttl_seconds": "${TTL}", "max_entries": "${MAX}"}
    env = {"WORKERS": "4", "GRACE": " 2.5 ", "TIMEOUT": "12", "PRIVATE": "True", "TTL": "60", "MAX": "50"}
    s = parse(raw, tmp_path, env=env)
    assert s.workers == 4
    assert s.shutdown_grace_seconds == 2.5
    assert s.forward_proxy.enabled is False
    assert s.upstreams["polygon"].timeout_seconds == 12.0
    assert s.upstreams["polygon"].allow_private is True
    assert s.secrets.cache.ttl_seconds == 60.0
    assert s.secrets.cache.max_entries == 50


@pytest.mark.parametrize(("value", "expected"), [("true", True), ("1", True), ("false", False), ("0", False)])
def test_boolean_spellings_from_env(value: str, expected: bool, tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, forward_proxy={"enabled": "${FP}"})
    assert parse(raw, tmp_path, env={"FP": value}).forward_proxy.enabled is expected


@pytest.mark.parametrize(
    ("section", "value", "env", "expected"),
    [
        ("workers", "${W}", {"W": "four"}, "workers: expected an integer, got a string"),
        ("workers", "${W}", {"W": "2.5"}, "workers: expected an integer, got a string"),
        ("workers", "${W}", {"W": "99"}, "workers: must be between 1 and 64"),
        ("shutdown_grace_seconds", "${G}", {"G": "soon"}, "shutdown_grace_seconds: expected a number, got a string"),
        (
            "forward_proxy",
            {"enabled": "${FP}"},
            {"FP": "yes"},
            "forward_proxy.enabled: expected true or false, got a string",
        ),
        # A quoted number written in the file is a typo, not a number: only env values are converted.
        ("shutdown_grace_seconds", "20", {}, "shutdown_grace_seconds: expected a number, got a string"),
        ("forward_proxy", {"enabled": "true"}, {}, "forward_proxy.enabled: expected true or false, got a string"),
    ],
)
def test_bad_numbers_and_booleans(
    section: str, value: Any, env: dict[str, str], expected: str, tmp_path: Path, keys_file: Path
) -> None:
    assert one_problem(config(keys_file, **{section: value}), tmp_path, env=env) == expected


# ------------------------------------------------------------------ upstream URLs


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ftp://api.example.com", "expected an http:// or https:// URL"),
        ("api.example.com", "expected an http:// or https:// URL"),
        ("wss://api.example.com", "expected an http:// or https:// URL"),
        ("https://user:pw@api.example.com", "must not contain user information (user@host)"),
        ("https://user@api.example.com", "must not contain user information (user@host)"),
        ("https://:pw@api.example.com", "must not contain user information (user@host)"),
        ("https://api.example.com/?apiKey=x", "must not contain a query or fragment"),
        ("https://api.example.com/v1?", "expected-no-problem"),
        ("https://api.example.com/#top", "must not contain a query or fragment"),
        ("https://", "has no host"),
        ("https:///path", "has no host"),
        ("https://exa mple.com", "invalid host 'exa mple.com'"),
        ("https://-bad-.example.com", "invalid host '-bad-.example.com'"),
        ("https://a..b.example.com", "invalid host 'a..b.example.com'"),
        ("https://api.example.com:99999", "invalid URL"),
        ("https://api.example.com:http", "invalid URL"),
    ],
)
def test_bad_upstream_urls(url: str, expected: str, tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, upstreams={"polygon": upstream(url=url)})
    if expected == "expected-no-problem":
        # An empty query ("?") carries nothing; the URL is accepted.
        assert parse(raw, tmp_path).upstreams["polygon"].base_path == "/v1"
        return
    problem = one_problem(raw, tmp_path)
    assert problem.startswith("upstreams.polygon.url: ")
    assert expected in problem


@pytest.mark.parametrize(
    ("url", "scheme", "host", "port", "base_path"),
    [
        ("https://api.polygon.io", "https", "api.polygon.io", 443, ""),
        ("http://api.polygon.io", "http", "api.polygon.io", 80, ""),
        ("https://API.Polygon.IO", "https", "api.polygon.io", 443, ""),
        ("https://api.polygon.io.", "https", "api.polygon.io", 443, ""),
        ("https://API.polygon.io.:8443/", "https", "api.polygon.io", 8443, ""),
        ("https://bücher.example/v1/", "https", "xn--bcher-kva.example", 443, "/v1"),
        ("https://BÜCHER.example", "https", "xn--bcher-kva.example", 443, ""),
        ("https://xn--bcher-kva.example", "https", "xn--bcher-kva.example", 443, ""),
        ("http://Example.COM:8080/base/path", "http", "example.com", 8080, "/base/path"),
        ("https://api.example.com/a%2Fb/c%20d/", "https", "api.example.com", 443, "/a%2Fb/c%20d"),
        ("https://[2606:4700:0::1111]:8443", "https", "2606:4700::1111", 8443, ""),
        ("https://8.8.8.8", "https", "8.8.8.8", 443, ""),
    ],
)
def test_upstream_url_normalisation(
    url: str, scheme: str, host: str, port: int, base_path: str, tmp_path: Path, keys_file: Path
) -> None:
    up = parse(config(keys_file, upstreams={"polygon": upstream(url=url)}), tmp_path).upstreams["polygon"]
    assert (up.scheme, up.host, up.port, up.base_path) == (scheme, host, port, base_path)


PRIVATE_LITERALS = [
    "http://127.0.0.1:9000",
    "http://10.0.0.5",
    "https://172.16.3.4",
    "http://192.168.1.10:8080/api",
    "http://169.254.169.254",
    "http://[::1]:8080",
    "http://[fd00:ec2::254]",
    "http://[::ffff:10.0.0.1]",
    "http://[::ffff:169.254.169.254]",
    "http://100.64.0.1",
    "http://0.0.0.0:8080",
    "http://[fe80::1]",
]


@pytest.mark.parametrize("url", PRIVATE_LITERALS)
def test_literal_private_address_is_refused(url: str, tmp_path: Path, keys_file: Path) -> None:
    problem = one_problem(config(keys_file, upstreams={"polygon": upstream(url=url)}), tmp_path)
    assert problem.startswith("upstreams.polygon.url: ")
    assert "allow_private: true" in problem


@pytest.mark.parametrize("url", PRIVATE_LITERALS)
def test_literal_private_address_is_accepted_with_allow_private(url: str, tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, upstreams={"polygon": upstream(url=url, allow_private=True)})
    assert parse(raw, tmp_path).upstreams["polygon"].allow_private is True


@pytest.mark.parametrize("url", ["http://127.1:9000", "http://2130706433", "http://0x7f000001", "http://10.1"])
def test_short_and_numeric_ipv4_forms_are_refused_too(url: str, tmp_path: Path, keys_file: Path) -> None:
    problems(config(keys_file, upstreams={"polygon": upstream(url=url)}), tmp_path)


SAME_ORIGIN = {
    "a": upstream(url="https://api.polygon.io/v1"),
    "b": upstream(url="https://API.polygon.io./v1/"),
    "c": upstream(url="http://api.polygon.io:443/v1"),
    "d": upstream(url="https://api.polygon.io:8443/v1"),
    "e": upstream(url="https://api.polygon.io/v2"),
    "f": upstream(url="http://api.polygon.io/v1"),
}


def same_origin_refusal(name: str, other: str) -> str:
    return (
        f"upstreams.{name}.url: same host, port and path as upstreams.{other}, and both take part in "
        "forward-proxy matching, which could not tell them apart; set forward_proxy: false on "
        f"upstreams.{name} or upstreams.{other} (route mode reaches both either way)"
    )


def test_two_forward_proxy_upstreams_on_one_origin_and_base_path_are_refused(
    tmp_path: Path, keys_file: Path
) -> None:
    # Forward-proxy mode picks the upstream by host, port and base path: equal ones are ambiguous.
    assert problems(config(keys_file, upstreams=SAME_ORIGIN), tmp_path) == [
        same_origin_refusal("b", "a"),
        same_origin_refusal("c", "b"),
    ]


def test_upstreams_on_one_origin_are_fine_in_route_mode(tmp_path: Path, keys_file: Path) -> None:
    # Two key sets for one API (per-user keys and a shared team key): route mode names the upstream.
    raw = config(keys_file, upstreams=SAME_ORIGIN, forward_proxy={"enabled": False})
    assert set(parse(raw, tmp_path).upstreams) == set(SAME_ORIGIN)


def test_one_upstream_per_origin_may_take_part_in_forward_proxy_matching(tmp_path: Path, keys_file: Path) -> None:
    raw = config(
        keys_file,
        upstreams={
            "personal": upstream(),
            "team": upstream(secret="mcp/polygon/team", forward_proxy=False),
            "other_style": upstream(inject={"header": "Authorization"}, forward_proxy="${FP}"),
        },
    )
    s = parse(raw, tmp_path, env={"FP": "false"})
    assert [u.forward_proxy for u in s.upstreams.values()] == [True, False, False]
    # Every one of them opted out: fine too (none is matched by host then).
    raw["upstreams"]["personal"]["forward_proxy"] = False
    assert parse(raw, tmp_path, env={"FP": "false"}).upstreams["personal"].forward_proxy is False


def test_forward_proxy_of_an_upstream_is_a_boolean(tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, upstreams={"polygon": upstream(forward_proxy="no")})
    assert one_problem(raw, tmp_path) == "upstreams.polygon.forward_proxy: expected true or false, got a string"


# ------------------------------------------------------------------ connect_to


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10.0.4.7:443", ("10.0.4.7", 443)),
        ("vpce-0abc.execute-api.us-east-1.vpce.amazonaws.com:443",
         ("vpce-0abc.execute-api.us-east-1.vpce.amazonaws.com", 443)),
        ("Staging.Example.COM.:8443", ("staging.example.com", 8443)),
        ("[fd00::5]:1", ("fd00::5", 1)),
        ("[FD00:0::5]:65535", ("fd00::5", 65535)),
    ],
)
def test_connect_to_is_host_and_port(
    value: str, expected: tuple[str, int], tmp_path: Path, keys_file: Path
) -> None:
    raw = config(keys_file, upstreams={"polygon": upstream(connect_to=value, allow_private=True)})
    up = parse(raw, tmp_path).upstreams["polygon"]
    assert up.connect_to == expected
    # url's host stays what TLS and Host name.
    assert (up.host, up.port) == ("api.polygon.io", 443)


def test_connect_to_defaults_to_none(tmp_path: Path, keys_file: Path) -> None:
    up = parse(config(keys_file), tmp_path).upstreams["polygon"]
    assert (up.connect_to, up.forward_proxy) == (None, True)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("api.internal", "expected host:port (IPv6 as [::1]:443), got 'api.internal'"),
        ("::1:443", "expected host:port (IPv6 as [::1]:443), got '::1:443'"),
        ("[::1]", "expected host:port (IPv6 as [::1]:443), got '[::1]'"),
        ("[10.0.0.1]:443", "expected host:port (IPv6 as [::1]:443), got '[10.0.0.1]:443'"),
        (":443", "expected host:port (IPv6 as [::1]:443), got ':443'"),
        ("api.internal:https", "expected host:port (IPv6 as [::1]:443), got 'api.internal:https'"),
        ("api.internal:\u00b2", "expected host:port (IPv6 as [::1]:443), got 'api.internal:\u00b2'"),
        ("api.internal:0", "port 0 is out of range (1-65535)"),
        ("api.internal:65536", "port 65536 is out of range (1-65535)"),
        ("bad host:443", "invalid host 'bad host'"),
        ("127.1:443", "invalid host '127.1'"),
        ("[fe80::1%eth0]:443", "an IPv6 zone (%eth0) is not supported: name the address without it"),
    ],
)
def test_connect_to_problems_are_named(value: str, problem: str, tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, upstreams={"polygon": upstream(connect_to=value, allow_private=True)})
    assert one_problem(raw, tmp_path) == f"upstreams.polygon.connect_to: {problem}"


def test_connect_to_must_be_text(tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, upstreams={"polygon": upstream(connect_to=8443)})
    assert one_problem(raw, tmp_path).startswith("upstreams.polygon.connect_to: expected a string, got a number")


@pytest.mark.parametrize("value", ["127.0.0.1:8443", "[::1]:443", "10.0.0.5:443", "169.254.169.254:80"])
def test_connect_to_a_private_literal_needs_allow_private(value: str, tmp_path: Path, keys_file: Path) -> None:
    # The guard looks at the address dialled, not at url's host.
    problem = one_problem(config(keys_file, upstreams={"polygon": upstream(connect_to=value)}), tmp_path)
    assert problem.startswith("upstreams.polygon.connect_to: ")
    assert problem.endswith("is a loopback, private or reserved address; set allow_private: true for an internal API")
    raw = config(keys_file, upstreams={"polygon": upstream(connect_to=value, allow_private=True)})
    assert parse(raw, tmp_path).upstreams["polygon"].connect_to is not None


def test_connect_to_a_public_address_frees_a_private_url_literal(tmp_path: Path, keys_file: Path) -> None:
    # url's host is only the name TLS and Host carry then; nothing connects to it.
    raw = config(keys_file, upstreams={"polygon": upstream(url="https://10.0.0.5", connect_to="93.184.216.34:443")})
    assert parse(raw, tmp_path).upstreams["polygon"].connect_to == ("93.184.216.34", 443)


def test_upstreams_on_different_ports_or_paths_of_one_host_are_fine(tmp_path: Path, keys_file: Path) -> None:
    raw = config(
        keys_file,
        upstreams={
            "a": upstream(url="https://api.example.com"),
            "b": upstream(url="https://api.example.com:8443"),
            "c": upstream(url="https://api.example.com/v2"),
        },
    )
    assert set(parse(raw, tmp_path).upstreams) == {"a", "b", "c"}


# ------------------------------------------------------------------ templates


@pytest.mark.parametrize(
    "template", ["mcp/polygon/{client_id}", "{client_id}", "{upstream}/{client_id}", "shared-key", "a/{upstream}"]
)
def test_secret_templates_accepted(template: str, tmp_path: Path, keys_file: Path) -> None:
    s = parse(config(keys_file, upstreams={"polygon": upstream(secret=template)}), tmp_path)
    assert s.upstreams["polygon"].secret == template


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("mcp/{client}/x", "unknown placeholder {client}; expected {client_id}, {upstream}"),
        ("mcp/{secret}", "unknown placeholder {secret}; expected {client_id}, {upstream}"),
        ("mcp/{0}", "unknown placeholder {0}"),
        ("mcp/{}", "unknown placeholder {}"),
        ("mcp/{client_id.__class__}", "unknown placeholder {client_id.__class__}"),
        ("mcp/{client_id[0]}", "unknown placeholder {client_id[0]}"),
        ("mcp/{client_id", "invalid template"),
        ("mcp/client_id}", "invalid template"),
    ],
)
def test_secret_template_placeholders(template: str, expected: str, tmp_path: Path, keys_file: Path) -> None:
    problem = one_problem(config(keys_file, upstreams={"polygon": upstream(secret=template)}), tmp_path)
    assert problem.startswith("upstreams.polygon.secret: ")
    assert expected in problem


@pytest.mark.parametrize("fmt", ["{secret}", "Bearer {secret}", "Token token={secret}; v=1"])
def test_inject_formats_accepted(fmt: str, tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, upstreams={"polygon": upstream(inject={"header": "Authorization", "format": fmt})})
    inject = parse(raw, tmp_path).upstreams["polygon"].inject
    assert (inject.kind, inject.name, inject.format) == ("header", "Authorization", fmt)


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("Bearer", "must contain {secret} exactly once"),
        ("{secret}:{secret}", "must contain {secret} exactly once"),
        ("Bearer {token}", "unknown placeholder {token}; expected {secret}"),
        ("{client_id}:{secret}", "unknown placeholder {client_id}"),
        ("Bearer {secret", "invalid template"),
    ],
)
def test_inject_format_must_hold_secret_once(fmt: str, expected: str, tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, upstreams={"polygon": upstream(inject={"header": "Authorization", "format": fmt})})
    problem = one_problem(raw, tmp_path)
    assert problem.startswith("upstreams.polygon.inject.format: ")
    assert expected in problem


@pytest.mark.parametrize(
    ("inject", "expected"),
    [
        ({"header": "Host"}, "upstreams.polygon.inject.header: Host is managed by the sidecar and cannot carry a key"),
        ({"header": "Transfer-Encoding"}, "upstreams.polygon.inject.header: Transfer-Encoding is managed"),
        ({"header": "X API Key"}, "upstreams.polygon.inject.header: is not a valid HTTP header name"),
        ({"header": "X-Key\r\nEvil: 1"}, "upstreams.polygon.inject.header: is not a valid HTTP header name"),
        ({"query": ""}, "upstreams.polygon.inject.query: is required"),
        ("apiKey", "upstreams.polygon.inject: expected a mapping, got a string"),
    ],
)
def test_inject_rule_problems(inject: Any, expected: str, tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, upstreams={"polygon": upstream(inject=inject)})
    assert any(p.startswith(expected) for p in problems(raw, tmp_path))


# ------------------------------------------------------------------ JWT algorithms


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "HS256", "HS384", "HS512", "hs256"])
def test_none_and_hmac_algorithms_are_refused(alg: str, tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, identity={"jwt": {"jwks_url": "https://idp.example/jwks", "issuer": "https://idp.example", "algorithms": ["RS256", alg]}})
    assert one_problem(raw, tmp_path) == (
        f"identity.jwt.algorithms[1]: {alg} is refused: only asymmetric algorithms are allowed"
    )


def test_unknown_algorithm_is_refused(tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, identity={"jwt": {"jwks_url": "https://idp.example/jwks", "issuer": "https://idp.example", "algorithms": ["RS999"]}})
    assert problems(raw, tmp_path)[0].startswith("identity.jwt.algorithms[0]: expected one of ES256, ")


def test_empty_algorithm_list_is_refused(tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, identity={"jwt": {"jwks_url": "https://idp.example/jwks", "issuer": "https://idp.example", "algorithms": []}})
    assert one_problem(raw, tmp_path) == "identity.jwt.algorithms: needs at least one algorithm"


def test_asymmetric_algorithms_are_accepted(tmp_path: Path, keys_file: Path) -> None:
    algs = ["RS256", "RS512", "PS256", "ES256", "ES384", "EdDSA"]
    raw = config(keys_file, identity={"jwt": {"issuer": "https://idp.example", "algorithms": algs}})
    (jwt,) = parse(raw, tmp_path).identity.jwt
    assert jwt.algorithms == tuple(algs)


def test_default_client_id_is_refused_in_jwt_mode(tmp_path: Path, keys_file: Path) -> None:
    raw = config(
        keys_file, identity={"default_client_id": "dev", "jwt": {"issuer": "https://idp.example"}}
    )
    assert one_problem(raw, tmp_path) == (
        "identity.default_client_id: has no effect with identity.jwt (every caller needs a token)"
    )


def test_jwt_needs_a_key_source(tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, identity={"jwt": {"audience": "api"}})
    assert one_problem(raw, tmp_path) == "identity.jwt.issuer: is required (the token's iss claim is always checked)"


# ------------------------------------------------------------------ client IDs


@pytest.mark.parametrize("client_id", ["svc", "a", "A1._@+=-x", "user@example.com", "x" * 128])
def test_valid_client_ids(client_id: str, tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, identity={"default_client_id": client_id})
    raw["secrets"]["prefetch"] = [client_id]
    s = parse(raw, tmp_path)
    assert s.identity.default_client_id == client_id
    assert s.secrets.prefetch == (client_id,)


@pytest.mark.parametrize("client_id", ["../etc", "a/b", "-lead", ".hidden", "a b", "x" * 129, "é", "a\nb", "a%2Fb"])
def test_invalid_client_ids(client_id: str, tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, identity={"default_client_id": client_id})
    raw["secrets"]["prefetch"] = ["alice", client_id]
    assert problems(raw, tmp_path) == [
        f"identity.default_client_id: {CLIENT_ID_RULE}",
        f"secrets.prefetch[1]: {CLIENT_ID_RULE}",
    ]


def test_prefetch_item_must_be_a_string(tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file)
    raw["secrets"]["prefetch"] = ["alice", 7]
    assert one_problem(raw, tmp_path) == "secrets.prefetch[1]: expected a string, got a number"


# ------------------------------------------------------------------ files and paths


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "conf"
    (conf / "certs").mkdir(parents=True)
    (conf / "keys.yaml").write_text(f"alice: {make_secret('config-rel')}\n")
    trustme.CA().cert_pem.write_to_path(str(conf / "certs" / "ca.pem"))
    (conf / "sidecar.yaml").write_text(
        "secrets:\n  file:\n    path: keys.yaml\n"
        "upstreams:\n  internal:\n    url: https://internal.example\n"
        "    secret: '{client_id}'\n    inject: {header: X-API-Key}\n    ca_file: certs/ca.pem\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keys.yaml").write_text("decoy: x\n")
    monkeypatch.chdir(elsewhere)
    s = load_settings(conf / "sidecar.yaml", env={})
    assert s.secrets.file.path is not None
    assert s.secrets.file.path.resolve() == (conf / "keys.yaml").resolve()
    ca = s.upstreams["internal"].ca_file
    assert ca is not None
    assert ca.resolve() == (conf / "certs" / "ca.pem").resolve()


def test_relative_config_path_itself_is_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "keys.yaml").write_text("alice: x\n")
    (conf / "sidecar.yaml").write_text("secrets:\n  file:\n    path: ./keys.yaml\n")
    monkeypatch.chdir(tmp_path)
    s = load_settings("conf/sidecar.yaml", env={})
    assert s.secrets.file.path is not None
    assert s.secrets.file.path.resolve() == (conf / "keys.yaml").resolve()


def test_missing_files_are_named_with_their_field(tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, upstreams={"polygon": upstream(ca_file="nope/ca.pem")})
    raw["secrets"]["file"]["path"] = "missing-keys.yaml"
    assert problems(raw, tmp_path) == [
        "secrets.file.path: file missing-keys.yaml does not exist",
        "upstreams.polygon.ca_file: file nope/ca.pem does not exist",
    ]


def test_file_backend_needs_a_path_when_upstreams_exist(tmp_path: Path) -> None:
    raw = {"upstreams": {"polygon": upstream()}}
    assert one_problem(raw, tmp_path) == "secrets.file.path: is required with backend file"


def test_aws_backend_does_not_need_a_keys_file(tmp_path: Path) -> None:
    raw = {
        "secrets": {"backend": "aws", "aws": {"region": "eu-west-1", "endpoint_url": "http://127.0.0.1:5000"}},
        "upstreams": {"polygon": upstream()},
    }
    s = parse(raw, tmp_path)
    assert (s.secrets.backend, s.secrets.aws.region, s.secrets.aws.endpoint_url) == (
        "aws", "eu-west-1", "http://127.0.0.1:5000"
    )


@pytest.mark.parametrize(
    ("template", "refused"),
    [
        ("arn:aws:secretsmanager:eu-west-1:123456789012:secret:team/polygon-AbCdEf", True),
        ("arn:aws:secretsmanager:eu-west-1:123456789012:secret:mcp/{upstream}/shared-a1B2c3", True),
        ("arn:aws:secretsmanager:eu-west-1:123456789012:secret:mcp/polygon/{client_id}", False),
        ("arn:aws:secretsmanager:eu-west-1:123456789012:secret:team/polygon", False),
        ("mcp/polygon/shared-AbCdEf", False),  # a name: AWS answers it only if that is its name
    ],
)
def test_aws_complete_arn_template_is_refused_at_load(tmp_path: Path, template: str, refused: bool) -> None:
    """secrets/aws.py reads every ARN as a partial one (a client ID ending in "-" and six
    characters must not select another secret), so a complete ARN would refuse every
    client at run time: say so when the config loads."""
    raw = {
        "secrets": {"backend": "aws", "aws": {"region": "eu-west-1"}},
        "upstreams": {"polygon": upstream(secret=template)},
    }
    if refused:
        assert one_problem(raw, tmp_path).startswith("upstreams.polygon.secret: is a complete secret ARN")
    else:
        assert parse(raw, tmp_path).upstreams["polygon"].secret == template


def test_lookup_timeout_and_the_aws_attempt_timeout_that_fits_it(tmp_path: Path) -> None:
    raw: dict[str, Any] = {
        "secrets": {"backend": "aws", "lookup_timeout_seconds": 8, "aws": {"region": "eu-west-1", "timeout_seconds": 2}},
        "upstreams": {"polygon": upstream()},
    }
    s = parse(raw, tmp_path)
    assert (s.secrets.lookup_timeout_seconds, s.secrets.aws.timeout_seconds) == (8, 2)
    raw["secrets"]["aws"]["timeout_seconds"] = 8
    assert parse(raw, tmp_path).secrets.aws.timeout_seconds == 8  # one attempt, all of the lookup
    raw["secrets"]["aws"]["timeout_seconds"] = 10
    assert one_problem(raw, tmp_path) == (
        "secrets.aws.timeout_seconds: 10 is longer than secrets.lookup_timeout_seconds (8), which bounds the "
        "whole lookup with every retry; lower it or raise lookup_timeout_seconds"
    )
    del raw["secrets"]["lookup_timeout_seconds"]  # the default, 5
    assert one_problem(raw, tmp_path).startswith("secrets.aws.timeout_seconds: 10 is longer than")
    raw["secrets"]["lookup_timeout_seconds"] = 0
    raw["secrets"]["aws"]["timeout_seconds"] = 1
    assert one_problem(raw, tmp_path) == "secrets.lookup_timeout_seconds: must be greater than 0"


def test_unknown_backend_is_refused(tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file)
    raw["secrets"]["backend"] = "hashicorp"
    assert one_problem(raw, tmp_path) == "secrets.backend: expected one of file, aws, vault"


def test_bad_yaml_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text("listen: 127.0.0.1:8080\nupstreams:\n  polygon: [unclosed\nworkers: 1\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    [message] = info.value.problems
    assert message.startswith(f"{path}: ")
    match = re.search(r" at line (\d+), column (\d+)$", message)
    assert match, message
    assert int(match.group(1)) in (3, 4)


def test_bad_indentation_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text("log:\n  level: info\n    format: json\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    [message] = info.value.problems
    assert message.endswith("at line 3, column 11")


def test_unreadable_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(tmp_path / "absent.yaml", env={})
    [message] = info.value.problems
    assert message.startswith(f"{tmp_path / 'absent.yaml'}: cannot read the config file")


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text("- listen\n- workers\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert info.value.problems == ["(top level): expected a mapping, got a list"]


@pytest.mark.parametrize(
    "where",
    [("identity", "jwt", "jwks_url"), ("identity", "jwt", "issuer"), ("secrets", "aws", "endpoint_url")],
)
def test_service_urls_with_credentials_are_refused_and_never_printed(tmp_path: Path, where: tuple[str, str, str]) -> None:
    """URLs the sidecar calls are logged and summarised: a password in one is refused at load."""
    raw: dict[str, Any] = {
        "identity": {"jwt": {"issuer": "https://idp.example/realm", "jwks_url": "https://idp.example/keys"}},
        "secrets": {"backend": "aws", "aws": {"region": "eu-west-1"}},
        "upstreams": {"p": {"url": "https://api.example", "secret": "{client_id}", "inject": {"query": "k"}}},
    }
    section, sub, key = where
    raw[section][sub][key] = "https://svc:hunter2-secret@idp.example/x"
    with pytest.raises(ConfigError) as info:
        parse_settings(raw, base_dir=tmp_path)
    assert f"{section}.{sub}.{key}: must not contain user information" in str(info.value)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("https://idp.example:99999/keys", "invalid URL (Port out of range 0-65535)"),
        ("https://idp.example:https/keys", "invalid URL (Port could not be cast to integer value as 'https')"),
        ("https:///keys", "has no host"),
        ("https://svc:{password}\u2100@idp.example/keys", "invalid URL"),  # urllib's NFKC message quotes the netloc
        ("ftp://idp.example/keys", "expected an http:// or https:// URL"),
    ],
)
def test_service_urls_are_checked_like_upstream_urls(tmp_path: Path, keys_file: Path, url: str, problem: str) -> None:
    """A URL the sidecar calls that could never be reached fails ``check``, not the first request."""
    password = make_secret("jwks-password")  # registered: the session's leak check looks for it too
    jwt = {"issuer": "https://idp.example/realm", "jwks_url": url.format(password=password)}
    found = one_problem(config(keys_file, identity={"jwt": jwt}), tmp_path)
    assert found == f"identity.jwt.jwks_url: {problem}"
    assert password not in found


def test_summary_prints_service_urls_without_their_query() -> None:
    assert loggable_url("https://u:pw@idp.example:8443/keys?token=abc#x") == "https://idp.example:8443/keys"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "${T}"])
def test_numbers_must_be_finite(tmp_path: Path, keys_file: Path, value: Any) -> None:
    # uvloop's call_later refuses NaN (every upstream request would fail), a NaN TTL never caches.
    raw = config(keys_file, upstreams={"polygon": upstream(timeout_seconds=value)})
    assert one_problem(raw, tmp_path, env={"T": "nan"}) == "upstreams.polygon.timeout_seconds: must be a finite number"
    raw = config(keys_file, secrets={"file": {"path": str(keys_file)}, "cache": {"ttl_seconds": value}})
    assert one_problem(raw, tmp_path, env={"T": "inf"}) == "secrets.cache.ttl_seconds: must be a finite number"


def test_ports_are_ascii_digits(tmp_path: Path, keys_file: Path) -> None:
    # '²'.isdigit() is True and int('²') raises: that was a traceback, not a config error.
    assert one_problem(config(keys_file, listen="127.0.0.1:\u00b2"), tmp_path).startswith("listen: ")
    raw = config(keys_file, forward_proxy={"enabled": True, "passthrough_hosts": ["example.com:\u00b2"]})
    assert one_problem(raw, tmp_path).startswith("forward_proxy.passthrough_hosts")


def test_ca_file_must_hold_a_certificate(tmp_path: Path, keys_file: Path) -> None:
    # Before, check passed and run stopped with an ssl.SSLError traceback (a reload raised it).
    bad = tmp_path / "ca.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    raw = config(keys_file, upstreams={"polygon": upstream(ca_file=str(bad))})
    assert one_problem(raw, tmp_path) == f"upstreams.polygon.ca_file: no PEM certificate could be loaded from {bad}"
    trustme.CA().cert_pem.write_to_path(str(bad))
    assert parse(raw, tmp_path).upstreams["polygon"].ca_file == bad


async def test_a_ca_file_broken_after_check_fails_the_build_not_the_process(tmp_path: Path, keys_file: Path) -> None:
    from sidecar.app import Sidecar
    from sidecar.lifecycle import StartupError

    ca = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(ca))
    good = parse(config(keys_file), tmp_path)
    other_keys = tmp_path / "other-keys.yaml"
    other_keys.write_text(f"alice: {make_secret('config-other')}\n")
    raw = config(keys_file, upstreams={"polygon": upstream(ca_file=str(ca))})
    raw["secrets"]["file"]["path"] = str(other_keys)
    changed = parse(raw, tmp_path)
    ca.write_text("changed since check\n")
    sidecar = Sidecar(good)
    running = await sidecar._build(good, None)
    try:
        with pytest.raises(StartupError, match=r"^upstreams\.polygon\.ca_file: no PEM certificate could be loaded$"):
            await sidecar._build(changed, running)  # what a SIGHUP does
        # The failed build closed what it built for itself, and nothing the running config uses.
        aio = running.upstreams["polygon"].aio
        assert aio is not None and aio.session is not None and not aio.session.closed
        watcher = running.backend._watcher  # type: ignore[attr-defined]  # the file backend's change watcher
        assert watcher is not None and not watcher.done()
        still_served = (await running.backend.fetch("alice")) == keys_file.read_text().split(": ", 1)[1].split("\n")[0]
        assert still_served, "the running backend no longer serves alice's key"  # (a bare == would print the key)
    finally:
        for up in running.upstreams.values():
            await up.close()
        await running.identity.close()
        await running.backend.close()


def test_a_yaml_number_is_not_taken_for_text(tmp_path: Path, keys_file: Path) -> None:
    # 'secret_field: 0123' is the YAML integer 83: read as text it would be a silently wrong field.
    raw = yaml.safe_load("secret_field: 0123\nversion_stage: 1.10\n")
    assert raw == {"secret_field": 83, "version_stage": 1.1}
    up = upstream(secret_field=raw["secret_field"])
    got = problems(config(keys_file, upstreams={"polygon": up},
                          secrets={"file": {"path": str(keys_file)}, "aws": {"version_stage": raw["version_stage"]}}),
                   tmp_path)
    assert got == [
        "secrets.aws.version_stage: expected a string, got a number (quote it to mean the text)",
        "upstreams.polygon.secret_field: expected a string, got a number (quote it to mean the text)",
    ]
    # Quoted, or from the environment, it is the text as written.
    assert parse(config(keys_file, upstreams={"polygon": upstream(secret_field="0123")}), tmp_path).upstreams[
        "polygon"].secret_field == "0123"
    env_up = upstream(secret_field="${F}")
    assert parse(config(keys_file, upstreams={"polygon": env_up}), tmp_path, env={"F": "0123"}).upstreams[
        "polygon"].secret_field == "0123"


def test_an_empty_interpolation_leaves_a_text_key_at_its_default(tmp_path: Path, keys_file: Path) -> None:
    raw = config(
        keys_file,
        log={"level": "${E:-}"},
        identity={"default_client_id": "${E}", "header": "${E:-}"},
        secrets={"backend": "${E:-}", "file": {"path": str(keys_file)}, "aws": {"endpoint_url": "${E:-}"}},
    )
    s = parse(raw, tmp_path, env={"E": ""})
    assert s.log.level == "info"
    assert s.identity.default_client_id is None and s.identity.header == "X-Client-Id"
    assert s.secrets.backend == "file" and s.secrets.aws.endpoint_url is None
    # An unset variable is still one problem, with no follow-on complaint about the empty value.
    assert one_problem(config(keys_file, log={"level": "${LVL}"}), tmp_path) == (
        "log.level: environment variable LVL is not set"
    )


def test_upstream_names_that_yaml_reads_as_numbers_say_so(tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, upstreams=yaml.safe_load("123: {url: 'https://a.example', secret: x}\non: {}\n"))
    assert problems(raw, tmp_path) == [
        "upstreams.123: an upstream name must be text, got a number (quote it)",
        "upstreams.True: an upstream name must be text, got a boolean (quote it)",
    ]


@pytest.mark.parametrize(
    ("listen", "admin", "collide"),
    [
        ("127.0.0.1:9000", "127.0.0.1:9000", True),
        ("0.0.0.0:9000", "127.0.0.1:9000", True),
        ("127.0.0.1:9000", "0.0.0.0:9000", True),
        ("[::]:9000", "[::1]:9000", True),
        ("0.0.0.0:9000", "[::1]:9000", False),  # IPv6 listeners are IPv6-only: both bind
        ("[::]:9000", "127.0.0.1:9000", False),
        ("127.0.0.1:9000", "127.0.0.2:9000", False),
        ("0.0.0.0:9000", "0.0.0.0:9001", False),
    ],
)
def test_admin_listen_collides_only_where_binding_would(
    tmp_path: Path, keys_file: Path, listen: str, admin: str, collide: bool
) -> None:
    raw = config(keys_file, listen=listen, admin_listen=admin)
    if collide:
        assert one_problem(raw, tmp_path) == "admin_listen: must differ from listen"
    else:
        parse(raw, tmp_path)


def test_an_empty_interpolation_leaves_a_list_key_at_its_default(tmp_path: Path, keys_file: Path) -> None:
    # 'audience: ${AUD:-}' was the list [""], so every token failed the audience check.
    up = upstream(clients="${C:-}")
    jwt = {"issuer": "https://idp.example/realms/a", "jwks_url": "https://idp.example/certs", "audience": "${AUD:-}"}
    s = parse(config(keys_file, upstreams={"polygon": up}, identity={"jwt": jwt}), tmp_path, env={"AUD": "", "C": ""})
    assert [entry.audience for entry in s.identity.jwt] == [()]
    assert s.upstreams["polygon"].clients == ("*",)


# ------------------------------------------------------------------ identity round 2 (issue 18)


def issuer_entry(name: str, **rules: Any) -> dict[str, Any]:
    return {"issuer": f"https://cognito-idp.us-east-1.amazonaws.com/{name}", **rules}


def test_jwt_may_be_a_list_of_issuers(tmp_path: Path, keys_file: Path) -> None:
    agents = issuer_entry("pool-agents", client_id_claims=["client_id"], require_token_use="access")
    people = issuer_entry("pool-people", client_id_claims=["sub"], required_claims={"custom:tenant": "acme"})
    entries = parse(config(keys_file, identity={"jwt": [agents, people]}), tmp_path).identity.jwt
    assert [e.issuer for e in entries] == [agents["issuer"], people["issuer"]]
    assert [e.config_path for e in entries] == ["identity.jwt[0]", "identity.jwt[1]"]
    assert entries[1].required_claims == (("custom:tenant", "acme"),)


@pytest.mark.parametrize(
    ("jwt", "expected"),
    [
        ([], "identity.jwt: an empty list: give at least one issuer, or leave identity.jwt out for header mode"),
        (
            [issuer_entry("a"), issuer_entry("a", client_id_claims=["sub"])],
            "identity.jwt[1].issuer: the same issuer as identity.jwt[0]: a token's iss picks exactly one entry,"
            " so merge the two",
        ),
        (
            [issuer_entry("a"), issuer_entry("b", header="X-Agent-Token")],
            "identity.jwt: every issuer entry must read the token from the same header (found Authorization,"
            " X-Agent-Token): the token is read before its issuer is known",
        ),
        ([issuer_entry("a"), {"jwks_url": "https://idp.example/keys"}],
         "identity.jwt[1].issuer: is required (the token's iss claim is always checked)"),
        ([issuer_entry("a"), "https://idp.example"], "identity.jwt[1]: expected a mapping, got a string"),
    ],
)
def test_issuer_lists_are_checked(tmp_path: Path, keys_file: Path, jwt: Any, expected: str) -> None:
    assert one_problem(config(keys_file, identity={"jwt": jwt}), tmp_path) == expected


@pytest.mark.parametrize(
    ("required", "expected"),
    [
        ({"tenant": 1.5}, "identity.jwt.required_claims.tenant: expected a string, true/false or an integer, got a number"),
        ({"tenant": ["acme"]}, "identity.jwt.required_claims.tenant: expected a string, true/false or an integer, got a list"),
        ({"iss": "https://other"}, "identity.jwt.required_claims.iss: is checked by the sidecar itself; it cannot be pinned here"),
        (["tenant"], "identity.jwt.required_claims: expected a mapping of claim name to value, got a list"),
    ],
)
def test_required_claims_are_checked(tmp_path: Path, keys_file: Path, required: Any, expected: str) -> None:
    raw = config(keys_file, identity={"jwt": issuer_entry("a", required_claims=required)})
    assert one_problem(raw, tmp_path) == expected


def test_required_claims_keep_their_yaml_types(tmp_path: Path, keys_file: Path) -> None:
    raw = config(keys_file, identity={"jwt": issuer_entry("a", required_claims={"t": "acme", "mfa": True, "tier": 3, "e": "${E}"})})
    (jwt,) = parse(raw, tmp_path, env={"E": "true"}).identity.jwt
    assert jwt.required_claims == (("t", "acme"), ("mfa", True), ("tier", 3), ("e", "true"))
    assert [type(v) for _, v in jwt.required_claims] == [str, bool, int, str]


def test_http_jwks_for_an_https_issuer_needs_allow_http_jwks(tmp_path: Path, keys_file: Path) -> None:
    jwt = {"issuer": "https://idp.example/realms/a", "jwks_url": "http://idp.example/realms/a/certs"}
    assert one_problem(config(keys_file, identity={"jwt": jwt}), tmp_path) == (
        "identity.jwt.jwks_url: is plain http for an https issuer: keys fetched in the clear could be anyone's;"
        " use the https URL, or set allow_http_jwks: true for a local emulator"
    )
    s = parse(config(keys_file, identity={"jwt": {**jwt, "allow_http_jwks": True, "client_id_claims": ["sub"]}}), tmp_path)
    assert s.identity.jwt[0].allow_http_jwks
    assert s.warnings == (
        "identity.jwt.allow_http_jwks: signing keys of an https issuer are fetched over plain http: anyone on"
        " that path could mint identities (meant for a local emulator only)",
    )


def test_allow_http_jwks_with_discovery_warns_too(tmp_path: Path, keys_file: Path) -> None:
    """With discovery the flag lets the document name an http jwks_uri: never silent."""
    jwt = {"issuer": "https://idp.example/realms/a", "allow_http_jwks": True, "client_id_claims": ["sub"]}
    assert parse(config(keys_file, identity={"jwt": jwt}), tmp_path).warnings == (
        "identity.jwt.allow_http_jwks: signing keys of an https issuer may be fetched (discovery, redirects) over"
        " plain http: anyone on that path could mint identities (meant for a local emulator only)",
    )


def test_an_http_issuer_with_http_keys_is_a_local_setup(tmp_path: Path, keys_file: Path) -> None:
    jwt = {"issuer": "http://127.0.0.1:9000/realms/a", "jwks_url": "http://127.0.0.1:9000/certs", "client_id_claims": ["sub"]}
    s = parse(config(keys_file, identity={"jwt": jwt}), tmp_path)
    assert s.warnings == ()


def test_jwt_ca_file_must_hold_a_certificate(tmp_path: Path, keys_file: Path) -> None:
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    raw = config(keys_file, identity={"jwt": issuer_entry("a", ca_file="ca.pem", client_id_claims=["sub"])})
    assert one_problem(raw, tmp_path) == "identity.jwt.ca_file: no PEM certificate could be loaded from ca.pem"
    raw["identity"]["jwt"]["ca_file"] = "missing.pem"
    assert one_problem(raw, tmp_path) == "identity.jwt.ca_file: file missing.pem does not exist"


@pytest.mark.parametrize(
    ("claims", "token_use", "warned"),
    [
        (None, None, True),  # the default [client_id, azp, sub] mixes both kinds
        (["client_id", "sub"], None, True),
        (["azp", "email"], None, True),
        (["client_id", "sub"], "access", False),
        (["client_id"], None, False),
        (["sub", "email"], None, False),
    ],
)
def test_mixed_agent_and_person_claims_warn(
    tmp_path: Path, keys_file: Path, claims: list[str] | None, token_use: str | None, warned: bool
) -> None:
    jwt = issuer_entry("a", require_token_use=token_use)
    if claims is not None:
        jwt["client_id_claims"] = claims
    s = parse(config(keys_file, identity={"jwt": jwt}), tmp_path)
    mixed = [w for w in s.warnings if "mixes agent claims" in w]
    assert bool(mixed) == warned, s.warnings
    if warned:
        assert mixed[0].startswith("identity.jwt.client_id_claims: mixes agent claims (")
        assert "the same person has two identities; list only one kind" in mixed[0]
        assert "(Cognito only) set require_token_use" in mixed[0]


def test_owner_editable_claims_warn(tmp_path: Path, keys_file: Path) -> None:
    s = parse(config(keys_file, identity={"jwt": [issuer_entry("a", client_id_claims=["sub"]),
                                                  issuer_entry("b", client_id_claims=["preferred_username"])]}), tmp_path)
    assert s.warnings == (
        "identity.jwt[1].client_id_claims: preferred_username can be changed by the person it describes in many"
        " identity providers, who would then get another person's credential; use sub (or oid in Entra ID)",
    )
