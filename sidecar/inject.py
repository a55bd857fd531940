"""Injection as a behaviour: where one upstream puts a client's key, and how it is kept out of answers.

``Injection`` is the base of every style, a subclass each: ``QueryInjection`` (a
query parameter) and ``HeaderInjection`` (a header). ``build_injection`` makes one
from a rule, once per upstream; a request then calls ``target`` (place the key,
get the path and query to send) and ``scrubber`` (every spelling of the key to
remove from the answer). A new style is a subclass here and its reading in config.

A query rule removes every parameter the app sent under the injection name
(compared after percent-decoding and case-folding, so ``APIKEY`` or ``api%4Bey``
cannot smuggle a second key past the upstream) and appends the client's key. A
header rule sets the header, and names it in ``drop`` so that the app's own
header of that name is never forwarded.

Compiled (setup.py): ``Injection`` is a native base class, so ``target`` is a
vtable call; no test subclasses it (mypyc's native classes take no interpreted
subclasses).
"""

from __future__ import annotations

import string
from collections.abc import Callable
from urllib.parse import quote, quote_plus, unquote, unquote_plus

from multidict import CIMultiDict

from sidecar.config import InjectSettings
from sidecar.secrets.base import Secret

REDACTED = "[redacted]"


class Injection:
    """Where one upstream puts a key; built by ``build_injection``, one subclass per style."""

    #: the app's request headers never forwarded because of this rule (lower case)
    drop: frozenset[str]
    #: the rule's parameter or header name, as configured
    name: str

    def __init__(self, rule: InjectSettings) -> None:
        self.name = rule.name
        self._before, self._after = split_format(rule.format)
        self.drop = frozenset()
        # Secret.memo's key and function for the scrubber, made once: a request
        # allocates neither a key nor a bound method. The key is the rendering's text,
        # so equal rules (two upstreams alike, a reload) share one scrubber per key value.
        self._scrubber_key = repr(("scrubber", self._before, self._after))
        self._make_scrubber: Callable[[Secret], Scrubber] = self._derive_scrubber

    def render(self, secret: Secret) -> str:
        """The value as placed on the wire (the rule's format around the key)."""
        return self._before + secret.reveal() + self._after

    def target(self, path: str, query: str, headers: CIMultiDict[str], secret: Secret) -> str:
        """Place the key (in ``query`` or ``headers``); the raw path and query to send."""
        raise NotImplementedError

    def scrub_forms(self, secret: Secret) -> tuple[str, ...]:
        """Spellings of the key that must never be echoed back to the app."""
        value = secret.reveal()
        forms = {value, self.render(secret), quote(value, safe=""), quote(value, safe="/"), quote_plus(value)}
        return tuple(f for f in forms if f)

    def scrubber(self, secret: Secret) -> Scrubber:
        """How to remove this key from text the upstream sends back; built once per key value."""
        return secret.memo(self._scrubber_key, self._make_scrubber)  # type: ignore[no-any-return]

    def _derive_scrubber(self, secret: Secret) -> Scrubber:
        return Scrubber(self.scrub_forms(secret), secret.reveal())


class QueryInjection(Injection):
    """The key as a query parameter, replacing any the app sent under that name."""

    def __init__(self, rule: InjectSettings) -> None:
        super().__init__(rule)
        self._folded = rule.name.casefold()
        self._quoted_name = quote(rule.name, safe="")
        # The percent-encoded pair, memoised per key value like the scrubber (its own key).
        self._pair_key = repr(("query", rule.name, self._before, self._after))
        self._make_pair: Callable[[Secret], str] = self._encode_pair

    def _encode_pair(self, secret: Secret) -> str:
        return self._quoted_name + "=" + quote(self.render(secret), safe="")

    def query(self, query: str, secret: Secret) -> str:
        """The raw query (without '?') with the app's parameters of this name removed and the key appended."""
        pair: str = secret.memo(self._pair_key, self._make_pair)  # percent-encoded once per value
        if not query:
            return pair
        folded = self._folded
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

    def target(self, path: str, query: str, headers: CIMultiDict[str], secret: Secret) -> str:
        return path + "?" + self.query(query, secret)


class HeaderInjection(Injection):
    """The key in a header; the app's own header of that name is dropped (``drop``)."""

    def __init__(self, rule: InjectSettings) -> None:
        super().__init__(rule)
        self.drop = frozenset({rule.name.lower()})

    def target(self, path: str, query: str, headers: CIMultiDict[str], secret: Secret) -> str:
        headers[self.name] = self.render(secret)
        return path + "?" + query if query else path


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


def build_injection(rule: InjectSettings) -> Injection:
    """The injection a rule asks for, checked and pre-shaped once, at start."""
    if rule.kind == "query":
        return QueryInjection(rule)
    return HeaderInjection(rule)
