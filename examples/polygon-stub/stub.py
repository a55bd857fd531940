"""A local stand-in for Polygon's aggregates endpoint, so the whole chain runs offline.

    python examples/polygon-stub/stub.py --port 9100 --keys-file stub-keys.yaml
    python examples/polygon-stub/stub.py --port 9443 --keys-file stub-keys.yaml --tls-cert leaf.pem --tls-key leaf.key

It serves ``GET /v2/aggs/ticker/{ticker}/range/{multiplier}/{timespan}/{from}/{to}``
with Polygon's field names and accepts only the API keys it was given. The keys
file is a YAML mapping ``label: key``; every answer names the *label* of the key
that paid for it (header ``X-Stub-Paid-By`` and body field ``paid_by``), never the
key, and the log never carries a key or a query string (the key travels in it).
It logs the ``Host`` each request named, to show what name a caller used.

With ``--tls-cert`` and ``--tls-key`` it serves https, so a client (or the
sidecar's ``connect_to``) can reach it as ``https://api.polygon.io`` with a
certificate for that name from a private CA.

Bars are pseudo-random but deterministic: one bar depends only on the ticker and
its timestamp, so the same question always gets the same answer, whatever range
it is part of.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import math
import ssl
import sys
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from itertools import islice
from pathlib import Path

import yaml
from aiohttp import web

PAID_BY_HEADER = "X-Stub-Paid-By"
TIMESPANS = ("minute", "hour", "day", "week", "month", "quarter", "year")
DEFAULT_LIMIT = 5000
MAX_LIMIT = 50000
# New York is taken as UTC-5 all year: realistic enough for a stand-in, no time-zone
# database needed. Intraday bars cover regular hours, 09:30-16:00 there; longer bars
# are stamped, like Polygon's, at midnight New York time.
NEW_YORK_MIDNIGHT_UTC = timedelta(hours=5)
SESSION_OPEN_UTC = timedelta(hours=14, minutes=30)
SESSION_CLOSE_UTC = timedelta(hours=21)

log = logging.getLogger("polygon-stub")
# aiohttp's access log would print the query string, and the key travels in it.
SERVER_OPTIONS = {"access_log": None}

KEYS = web.AppKey("keys", dict)


def load_keys(path: Path) -> dict[str, str]:
    """Read ``label: key`` pairs; labels are what the stub reports, keys stay inside."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(raw, Mapping) or not raw:
        raise SystemExit(f"{path}: expected a non-empty mapping of label: key")
    keys: dict[str, str] = {}
    for label, key in raw.items():
        if not isinstance(key, str) or not key:
            raise SystemExit(f"{path}: the key for label {label!r} must be a non-empty string")
        keys[str(label)] = key
    return keys


def identify_key(presented: str, keys: Mapping[str, str]) -> str | None:
    """The label of the presented key, or None; compared in constant time."""
    found = None
    for label, key in keys.items():
        if hmac.compare_digest(presented.encode(), key.encode()):
            found = label
    return found


class TwoKeys(ValueError):
    """The request carries more than one ``apiKey``: which one paid would be ambiguous."""


def presented_key(request: web.Request) -> str | None:
    """The key as Polygon takes it: ``apiKey`` query parameter or ``Authorization: Bearer``."""
    given = request.query.getall("apiKey", [])
    if len(given) > 1:
        # Refused rather than picking one, so a key the caller meant to replace
        # (a placeholder) can never be what silently pays, or fails, for a call.
        raise TwoKeys(f"apiKey given {len(given)} times")
    if given:
        return given[0]
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def polygon_error(status: int, message: str, request_id: str) -> web.Response:
    """An error body shaped like Polygon's."""
    body = {"status": "ERROR", "request_id": request_id, "error": message}
    return web.json_response(body, status=status)


def parse_when(value: str, *, end: bool) -> datetime:
    """A ``YYYY-MM-DD`` date (start or end of that day) or a millisecond timestamp."""
    if value.isdigit():
        return datetime.fromtimestamp(int(value) / 1000, tz=UTC)
    day = date.fromisoformat(value)
    moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return moment + timedelta(days=1) - timedelta(milliseconds=1) if end else moment


def _add_months(moment: datetime, months: int) -> datetime:
    index = moment.year * 12 + moment.month - 1 + months
    return moment.replace(year=index // 12, month=index % 12 + 1, day=1)


def _period_start(moment: datetime, timespan: str) -> datetime:
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if timespan == "week":  # Polygon's weeks start on Sunday
        return day - timedelta(days=(day.weekday() + 1) % 7)
    if timespan == "month":
        return day.replace(day=1)
    if timespan == "quarter":
        return day.replace(month=(day.month - 1) // 3 * 3 + 1, day=1)
    if timespan == "year":
        return day.replace(month=1, day=1)
    return day


def bar_starts(start: datetime, end: datetime, multiplier: int, timespan: str) -> Iterator[datetime]:
    """Start times of the bars between start and end, trading days only, oldest first."""
    if timespan in ("minute", "hour"):
        step = timedelta(minutes=multiplier) if timespan == "minute" else timedelta(hours=multiplier)
        day = start.replace(hour=0, minute=0, second=0, microsecond=0)
        while day <= end:
            if day.weekday() < 5:
                moment = day + SESSION_OPEN_UTC
                while moment < day + SESSION_CLOSE_UTC:
                    if start <= moment <= end:
                        yield moment
                    moment += step
            day += timedelta(days=1)
        return
    if timespan == "day":
        moment = start.replace(hour=0, minute=0, second=0, microsecond=0)
        while moment <= end:
            if moment.weekday() < 5:
                yield moment + NEW_YORK_MIDNIGHT_UTC
            moment += timedelta(days=multiplier)
        return
    moment = _period_start(start, timespan)
    months = {"month": 1, "quarter": 3, "year": 12}.get(timespan)
    while moment <= end:
        yield moment + NEW_YORK_MIDNIGHT_UTC  # a bar is stamped with the start of its period
        moment = moment + timedelta(weeks=multiplier) if months is None else _add_months(moment, months * multiplier)


def _unit(ticker: str, t_ms: int, salt: str) -> float:
    """A deterministic number in [0, 1) for this ticker, bar and purpose."""
    digest = hashlib.sha256(f"{ticker}|{t_ms}|{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def make_bar(ticker: str, moment: datetime, multiplier: int, timespan: str) -> dict[str, float | int]:
    """One OHLCV bar with Polygon's short field names."""
    t_ms = int(moment.timestamp() * 1000)
    base = 20 + _unit(ticker, 0, "base") * 480  # each ticker trades somewhere in 20..500
    days = t_ms / 86_400_000
    # A slow drift plus a yearly swing, so a chart of the bars looks like a market.
    level = base * (1 + 0.15 * math.sin(days / 58 + _unit(ticker, 0, "phase") * 6.28)) * (1 + days / 40_000)
    open_ = level * (1 + (_unit(ticker, t_ms, "o") - 0.5) * 0.02)
    close = level * (1 + (_unit(ticker, t_ms, "c") - 0.5) * 0.02)
    high = max(open_, close) * (1 + _unit(ticker, t_ms, "h") * 0.01)
    low = min(open_, close) * (1 - _unit(ticker, t_ms, "l") * 0.01)
    span_minutes = {"minute": 1, "hour": 60}.get(timespan, 390)
    volume = int((2e5 + _unit(ticker, t_ms, "v") * 8e5) * span_minutes / 39 * multiplier)
    return {
        "v": volume,
        "vw": round((open_ + close + high + low) / 4, 4),
        "o": round(open_, 4),
        "c": round(close, 4),
        "h": round(high, 4),
        "l": round(low, 4),
        "t": t_ms,
        "n": max(1, volume // 110),
    }


class BadQuery(ValueError):
    """The request names an impossible range; the message is Polygon-like and safe to return."""


@dataclass(frozen=True)
class AggsQuery:
    ticker: str
    multiplier: int
    timespan: str
    start: datetime
    end: datetime
    adjusted: bool
    descending: bool
    limit: int


def parse_query(request: web.Request) -> AggsQuery:
    """Path and query parameters, validated the way Polygon does."""
    m = request.match_info
    try:
        multiplier = int(m["multiplier"])
    except ValueError:
        multiplier = 0
    if multiplier < 1:
        raise BadQuery("Could not parse the multiplier: must be a positive integer.")
    if m["timespan"] not in TIMESPANS:
        raise BadQuery(f"Unknown timespan {m['timespan']!r}; use one of {', '.join(TIMESPANS)}.")
    try:
        start = parse_when(m["from"], end=False)
        end = parse_when(m["to"], end=True)
    except (ValueError, OverflowError, OSError):
        raise BadQuery("Could not parse the date range: use YYYY-MM-DD or a millisecond timestamp.") from None
    try:
        limit = int(request.query.get("limit", DEFAULT_LIMIT))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise BadQuery(f"limit must be an integer from 1 to {MAX_LIMIT}.")
    sort = request.query.get("sort", "asc")
    if sort not in ("asc", "desc"):
        raise BadQuery("sort must be asc or desc.")
    return AggsQuery(
        ticker=m["ticker"],
        multiplier=multiplier,
        timespan=m["timespan"],
        start=start,
        end=end,
        adjusted=request.query.get("adjusted", "true").lower() != "false",
        descending=sort == "desc",
        limit=limit,
    )


async def aggregates(request: web.Request) -> web.Response:
    """GET /v2/aggs/ticker/{ticker}/range/{multiplier}/{timespan}/{from}/{to}."""
    request_id = uuid.uuid4().hex
    try:
        key = presented_key(request)
    except TwoKeys as exc:
        response = polygon_error(400, str(exc), request_id)
        _log_request(request, response, None)
        return response
    if key is None:
        response = polygon_error(401, "API Key was not provided", request_id)
        _log_request(request, response, None)
        return response
    label = identify_key(key, request.app[KEYS])
    if label is None:
        response = polygon_error(401, "Unknown API Key", request_id)
        _log_request(request, response, None)
        return response

    try:
        query = parse_query(request)
    except BadQuery as exc:
        return _paid(polygon_error(400, str(exc), request_id), request, label)

    # Polygon caps a query at 50000 base aggregates; so does the stub, which also bounds its work.
    starts = list(islice(bar_starts(query.start, query.end, query.multiplier, query.timespan), MAX_LIMIT))
    if query.descending:
        starts.reverse()
    results = [make_bar(query.ticker, moment, query.multiplier, query.timespan) for moment in starts[: query.limit]]
    body: dict[str, object] = {
        "ticker": query.ticker,
        "queryCount": len(starts),
        "resultsCount": len(results),
        "adjusted": query.adjusted,
    }
    if results:  # Polygon leaves "results" out when there are none
        body["results"] = results
    body.update(status="OK", request_id=request_id, count=len(results), paid_by=label)
    return _paid(web.json_response(body), request, label)


def _paid(response: web.Response, request: web.Request, label: str) -> web.Response:
    response.headers[PAID_BY_HEADER] = label
    _log_request(request, response, label)
    return response


def _log_request(request: web.Request, response: web.Response, label: str | None) -> None:
    # request.path, never request.path_qs: the key is in the query.
    log.info(
        "%s %s -> %d paid_by=%s host=%s",
        request.method,
        request.path,
        response.status,
        label or "-",
        request.headers.get("Host", "-"),
    )


async def healthz(request: web.Request) -> web.Response:
    """Readiness for scripts: 200 once listening."""
    return web.Response(text="ok\n")


def make_app(keys: Mapping[str, str]) -> web.Application:
    """The stub as an aiohttp application that accepts exactly these keys."""
    app = web.Application()
    app[KEYS] = dict(keys)
    app.router.add_get("/v2/aggs/ticker/{ticker}/range/{multiplier}/{timespan}/{from}/{to}", aggregates)
    app.router.add_get("/healthz", healthz)
    return app


def server_tls(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A server context presenting cert_file (leaf first, then its CA) with key_file."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert_file), str(key_file))
    return context


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9100, help="port to listen on (default 9100)")
    parser.add_argument("--keys-file", type=Path, required=True, help="YAML mapping label: key of accepted keys")
    parser.add_argument("--tls-cert", type=Path, help="serve https with this PEM chain (leaf first); needs --tls-key")
    parser.add_argument("--tls-key", type=Path, help="the PEM private key of --tls-cert")
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    keys = load_keys(args.keys_file)
    tls = server_tls(args.tls_cert, args.tls_key) if args.tls_cert else None
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="polygon-stub %(levelname)s %(message)s")
    log.info(
        "listening on %s://%s:%d, accepting the keys labelled %s",
        "https" if tls else "http",
        args.host,
        args.port,
        ", ".join(sorted(keys)),
    )
    web.run_app(make_app(keys), host=args.host, port=args.port, ssl_context=tls, print=None, **SERVER_OPTIONS)


if __name__ == "__main__":
    main()
