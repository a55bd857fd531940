"""Injection rules, compiled once per upstream into small functions.

A query rule removes every parameter the app sent under the injection name
(compared after percent-decoding and case-folding, so ``APIKEY`` or ``api%4Bey``
cannot smuggle a second key past the upstream) and appends the client's key.
A header rule is handled in ``Upstream`` by dropping the header from the copy of
the request headers and setting the formatted value.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote, quote_plus, unquote, unquote_plus

from sidecar.config import InjectSettings
from sidecar.secrets.base import Secret

REDACTED = "[redacted]"
#: (raw query string without '?', secret) -> new raw query string
QueryInjector = Callable[[str, Secret], str]


@dataclass(frozen=True, slots=True)
class CompiledInjection:
    """What one upstream does with a key: a query rewrite or a header value."""

    query: QueryInjector | None
    header: str | None  # header name when the key goes into a header
    render: Callable[[Secret], str]  # the value as placed on the wire

    def scrub_forms(self, secret: Secret) -> tuple[str, ...]:
        """Spellings of the key that must never be echoed back to the app."""
        value = secret.reveal()
        forms = {value, self.render(secret), quote(value, safe=""), quote(value, safe="/"), quote_plus(value)}
        return tuple(f for f in forms if f)

    def scrub_set(self, secret: Secret) -> Scrubber:
        """How to remove this key from text the upstream sends back; built once per key value."""
        return secret.memo(self, self._derive_scrubber)  # type: ignore[no-any-return]

    def _derive_scrubber(self, secret: Secret) -> Scrubber:
        return Scrubber(self.scrub_forms(secret), secret.reveal())


class Scrubber:
    """Every spelling of one key in text an upstream sends back, replaced with ``[redacted]``.

    The known spellings (raw, as injected, percent- and form-encoded) are matched
    case-insensitively, so ``%2f`` is caught like ``%2F``; a value that still holds
    the key once percent-decoded (some other mix of escapes) is replaced whole.
    Matching too much only ever redacts more. No regular expression: ``re`` keeps
    every compiled pattern, so the key, in a module-wide cache, after rotation.
    """

    __slots__ = ("_forms", "_raw", "shortest")

    def __init__(self, forms: tuple[str, ...], raw: str) -> None:
        # Lower-cased, longest first: where two spellings start at one place, the longer one goes.
        self._forms = sorted({f.lower() for f in forms}, key=len, reverse=True)
        self.shortest = min((len(f) for f in self._forms), default=0)  # a shorter value cannot hold the key
        self._raw = raw

    def __call__(self, value: str) -> str:
        lowered = value.lower()
        if any(form in lowered for form in self._forms):
            if len(lowered) != len(value):
                return REDACTED  # a character whose lower case is longer: positions no longer line up
            value = self._replace(value, lowered)
        raw = self._raw
        if raw and (("%" in value and raw in unquote(value)) or ("+" in value and raw in unquote_plus(value))):
            return REDACTED
        return value

    def _replace(self, value: str, lowered: str) -> str:
        """``value`` with each leftmost (then longest) spelling found in ``lowered`` replaced."""
        out = []
        start = 0
        while True:
            at, length = -1, 0
            for form in self._forms:
                i = lowered.find(form, start)
                if i >= 0 and (at < 0 or i < at):
                    at, length = i, len(form)
            if at < 0:
                break
            out.append(value[start:at])
            out.append(REDACTED)
            start = at + length
        out.append(value[start:])
        return "".join(out)


def split_format(fmt: str) -> tuple[str, str]:
    """The literal text before and after ``{secret}``, with ``{{``/``}}`` unescaped as str.format does."""
    before: list[str] = []
    after: list[str] = []
    seen = False
    for literal, field, _, _ in string.Formatter().parse(fmt):
        (after if seen else before).append(literal)
        if field is not None:
            seen = True
    return "".join(before), "".join(after)


def compile_injector(rule: InjectSettings) -> CompiledInjection:
    """Check and pre-shape a rule once, at start."""
    before, after = split_format(rule.format)

    def render(secret: Secret) -> str:
        return before + secret.reveal() + after

    if rule.kind != "query":
        return CompiledInjection(query=None, header=rule.name, render=render)

    folded = rule.name.casefold()
    quoted_name = quote(rule.name, safe="")

    def encode_pair(secret: Secret) -> str:
        return quoted_name + "=" + quote(render(secret), safe="")

    def inject_query(query: str, secret: Secret) -> str:
        pair: str = secret.memo(encode_pair, encode_pair)  # percent-encoded once per value
        if not query:
            return pair
        if "%" in query or "+" in query or folded in query.casefold():
            kept = [
                part
                for part in query.split("&")
                if unquote_plus(part.partition("=")[0]).casefold() != folded
            ]
            query = "&".join(kept)
            if not query:
                return pair
        return query + "&" + pair

    return CompiledInjection(query=inject_query, header=None, render=render)
