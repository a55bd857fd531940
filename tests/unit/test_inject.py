"""Injection rules: the key lands exactly once, the app's own attempt never reaches the upstream."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qsl, quote, quote_plus, unquote_plus

import pytest
from multidict import CIMultiDict

from sidecar.config import InjectSettings, parse_settings
from sidecar.inject import HeaderInjection, QueryInjection, build_injection
from sidecar.secrets.base import Secret
from tests.support.leaks import make_secret


def query_rule(name: str = "apiKey", fmt: str = "{secret}") -> QueryInjection:
    injection = build_injection(InjectSettings("query", name, fmt))
    assert isinstance(injection, QueryInjection)
    assert injection.drop == frozenset()  # the app's headers are not the query rule's business
    return injection


def header_rule(name: str, fmt: str = "{secret}") -> HeaderInjection:
    injection = build_injection(InjectSettings("header", name, fmt))
    assert isinstance(injection, HeaderInjection)
    return injection


def inject(query: str, secret: Secret, name: str = "apiKey") -> str:
    return query_rule(name).query(query, secret)


@pytest.fixture
def key() -> str:
    return make_secret("inject")


def test_empty_query_gets_only_the_key(key: str) -> None:
    assert inject("", Secret(key)) == f"apiKey={key}"


def test_key_is_appended_after_the_apps_parameters(key: str) -> None:
    assert inject("adjusted=true&sort=asc", Secret(key)) == f"adjusted=true&sort=asc&apiKey={key}"


def test_special_characters_in_the_key_are_percent_encoded(key: str) -> None:
    value = key + "/+&=?# %é"
    result = inject("a=1", Secret(value))
    encoded = result.removeprefix("a=1&apiKey=")
    assert encoded == quote(value, safe="")
    # No character of the value can end the parameter or start a new one.
    assert not set(encoded) & set("/+&=?# ")
    # And the upstream decodes it back to exactly the stored value.
    assert dict(parse_qsl(result)) == {"a": "1", "apiKey": value}


@pytest.mark.parametrize(
    "smuggled",
    [
        "apiKey=evil",
        "APIKEY=evil",
        "apikey=evil",
        "ApIkEy=evil",
        "api%4Bey=evil",
        "api%4bey=evil",
        "%61%70%69%4B%65%79=evil",
        "apiKey",
        "apiKey=",
        "apiKey=evil+value%20x",
    ],
)
def test_client_supplied_key_is_removed_in_every_spelling(smuggled: str, key: str) -> None:
    result = inject(f"a=1&{smuggled}&b=2", Secret(key))
    assert result == f"a=1&b=2&apiKey={key}"


def test_multiple_client_supplied_keys_are_all_removed(key: str) -> None:
    result = inject("apiKey=one&x=1&APIKEY=two&api%4Bey=three&apiKey&y=2&apikey=four", Secret(key))
    assert result == f"x=1&y=2&apiKey={key}"


def test_query_made_only_of_client_keys_becomes_just_the_injected_key(key: str) -> None:
    assert inject("apiKey=evil&APIKEY=evil2", Secret(key)) == f"apiKey={key}"


def test_plus_encoded_name_is_removed_when_the_rule_name_has_a_space(key: str) -> None:
    result = inject("api+key=evil&x=1&api%20key=evil2&API+Key", Secret(key), name="api key")
    assert result == f"x=1&api%20key={key}"


def test_other_parameters_are_kept_byte_for_byte_in_order(key: str) -> None:
    original = "z=1&path=%2Fa%2fb&q=a+b&empty=&flag&&ticker=BRK%2EB&utf=%C3%A9&note=apiKey%3Dx"
    noisy = "z=1&apiKey=evil&path=%2Fa%2fb&q=a+b&APIKEY=x&empty=&flag&&ticker=BRK%2EB&utf=%C3%A9&note=apiKey%3Dx"
    assert inject(original, Secret(key)) == f"{original}&apiKey={key}"
    assert inject(noisy, Secret(key)) == f"{original}&apiKey={key}"


@pytest.mark.parametrize(
    "similar",
    ["apiKeys=1", "xapiKey=1", "api_key=1", "apiKey[]=1", "q=apiKey", "apiKey%3D=1"],
)
def test_parameters_that_only_look_like_the_key_are_kept(similar: str, key: str) -> None:
    assert inject(f"{similar}&b=2", Secret(key)) == f"{similar}&b=2&apiKey={key}"


def test_rule_name_is_percent_encoded(key: str) -> None:
    assert inject("", Secret(key), name="api key") == f"api%20key={key}"


def test_query_rule_with_a_format(key: str) -> None:
    injection = query_rule("token", "Bearer {secret}")
    assert injection.query("a=1", Secret(key)) == f"a=1&token=Bearer%20{key}"
    assert injection.render(Secret(key)) == f"Bearer {key}"


def test_header_rule_with_bearer_format(key: str) -> None:
    injection = header_rule("Authorization", "Bearer {secret}")
    assert injection.name == "Authorization"
    assert injection.drop == frozenset({"authorization"})  # the app's own is never forwarded
    assert injection.render(Secret(key)) == f"Bearer {key}"


def test_a_query_rule_targets_the_query_and_leaves_the_headers(key: str) -> None:
    headers = CIMultiDict({"X-Other": "1"})
    assert query_rule().target("/v1/x", "a=1&apiKey=evil", headers, Secret(key)) == f"/v1/x?a=1&apiKey={key}"
    assert query_rule().target("/v1/x", "", headers, Secret(key)) == f"/v1/x?apiKey={key}"
    assert list(headers.items()) == [("X-Other", "1")]


def test_a_header_rule_sets_its_header_and_keeps_the_query(key: str) -> None:
    rule = header_rule("Authorization", "Bearer {secret}")
    headers = CIMultiDict({"authorization": "Bearer the-apps-own"})
    assert rule.target("/v1/x", "", headers, Secret(key)) == "/v1/x"
    assert rule.target("/v1/x", "a=1&b", headers, Secret(key)) == "/v1/x?a=1&b"
    assert headers.getall("Authorization") == [f"Bearer {key}"]


def test_renderings_are_made_once_per_key_value_and_shared_by_equal_rules(key: str) -> None:
    """Two upstreams with one rule (or one upstream after a reload) share the key's scrubber."""
    secret = Secret(key)
    first = query_rule()
    assert first.scrubber(secret) is first.scrubber(secret)
    assert query_rule().scrubber(secret) is first.scrubber(secret)
    other = query_rule(fmt="Bearer {secret}").scrubber(secret)
    assert other is not first.scrubber(secret)
    assert other("Bearer " + key) == "[redacted]"


def test_header_rule_default_format_is_the_bare_key(key: str) -> None:
    injection = header_rule("X-API-Key")
    assert injection.name == "X-API-Key"
    assert injection.render(Secret(key)) == key


def test_format_with_text_after_the_secret(key: str) -> None:
    injection = header_rule("Authorization", "Token token={secret}; v=1")
    assert injection.render(Secret(key)) == f"Token token={key}; v=1"


def test_scrub_forms_cover_raw_formatted_and_percent_encoded(key: str) -> None:
    value = key + "/+= x"
    injection = header_rule("Authorization", "Bearer {secret}")
    forms = set(injection.scrub_forms(Secret(value)))
    assert value in forms
    assert f"Bearer {value}" in forms
    assert quote(value, safe="") in forms
    assert quote(value, safe="/") in forms
    assert "" not in forms


def test_scrub_forms_cover_what_a_query_rule_puts_on_the_wire(key: str) -> None:
    value = key + "/&x"
    injection = query_rule()
    on_the_wire = injection.query("", Secret(value)).removeprefix("apiKey=")
    assert any(form in on_the_wire for form in injection.scrub_forms(Secret(value)))
    assert on_the_wire in injection.scrub_forms(Secret(value))


@pytest.mark.parametrize("fmt", ["Bearer {secret!s}", "{secret:>8}", "{secret!r}"])
def test_format_specs_and_conversions_are_refused_at_load(fmt: str) -> None:
    from sidecar.config import parse_settings
    from sidecar.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_settings(
            {
                "secrets": {"backend": "aws"},
                "upstreams": {"api": {"url": "https://a.example", "secret": "{client_id}",
                                      "inject": {"header": "Authorization", "format": fmt}}},
            }
        )
    assert "upstreams.api.inject.format: placeholders take no conversion or format spec" in str(err.value)


@pytest.mark.parametrize("fmt", ["Token {{{secret}}}", "{{x}} {secret} {{y}}", "Bearer {secret}"])
def test_every_format_config_accepts_renders_as_str_format(fmt: str, tmp_path: Path, key: str) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text("{}\n")
    settings = parse_settings(
        {
            "secrets": {"file": {"path": str(keys)}},
            "upstreams": {
                "api": {
                    "url": "https://api.example.com",
                    "secret": "{client_id}",
                    "inject": {"header": "Authorization", "format": fmt},
                }
            },
        },
        base_dir=tmp_path,
        env={},
    )
    injection = build_injection(settings.upstreams["api"].inject)
    assert injection.render(Secret(key)) == fmt.format(secret=key)


ECHOED = "https://elsewhere.example/next?apiKey=[redacted]&page=2"


@pytest.mark.parametrize(
    ("echo", "expected"),
    [
        ("{v}", ECHOED),  # raw
        ("{pct}", ECHOED),  # as injected
        ("{pct_lower}", ECHOED),  # lower-case escapes: matched as a spelling, not by the fallback
        ("{plus}", ECHOED),  # form-encoding
        ("{mixed}", "[redacted]"),  # some characters escaped, some not: the whole value goes
    ],
)
def test_scrubber_catches_every_spelling_of_the_key_in_an_echo(key: str, echo: str, expected: str) -> None:
    value = key + "/+=é x"
    pct = quote(value, safe="")
    spelled = echo.format(
        v=value, pct=pct, pct_lower=re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), pct),
        mixed=quote(value, safe="/+"), plus=quote_plus(value),
    )
    scrub = query_rule().scrubber(Secret(value))
    out = scrub(f"https://elsewhere.example/next?apiKey={spelled}&page=2")
    leaked = key in out or key in unquote_plus(out)
    assert not leaked  # checked first, as a bool: a failure must not print the key
    assert out == expected
    assert scrub("https://elsewhere.example/next?page=2") == "https://elsewhere.example/next?page=2"


def test_scrubber_redacts_whole_text_whose_lower_case_changes_length(key: str) -> None:
    # "İ".lower() is two characters: offsets in the lower-cased copy no longer fit the text.
    scrub = query_rule().scrubber(Secret(key))
    assert scrub(f"İstanbul {key.upper()} x") == "[redacted]"
    assert scrub("İstanbul, no key here") == "İstanbul, no key here"
    assert scrub(f"a {key} b {key.lower()} c") == "a [redacted] b [redacted] c"
