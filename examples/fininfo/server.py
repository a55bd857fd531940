"""fininfo: market-data MCP tools that call Polygon through the credential sidecar.

This is the fininfo reference server's pair of tools (``get_stock_aggregates``,
``print_stock_data``) with the key taken out. The server holds no Polygon key: it
passes the caller's identity on with each outbound call, and the sidecar beside it
looks up that caller's key and injects it. It refuses to start when
``POLYGON_API_KEY`` is set, so a stray key cannot end up used after all.

    SIDECAR_MODE=route python examples/fininfo/server.py --port 8000

Environment:

``SIDECAR_MODE``
    ``route`` (default): call the sidecar's route for the upstream,
    ``http://127.0.0.1:8080/polygon/v2/aggs/...``.
    ``proxy``: unchanged code calling ``http://api.polygon.io`` with ``HTTP_PROXY``
    pointing at the sidecar, which must then be set.
``POLYGON_BASE_URL``
    Overrides the base URL of either mode (defaults ``http://127.0.0.1:8080/polygon``
    and ``http://api.polygon.io``).
``IDENTITY_MODE``
    Which identity of the incoming MCP request is passed on to the sidecar.
    ``header``: the ``X-Client-Id`` header the gateway forwarded. ``jwt``: the
    ``Authorization: Bearer`` token. ``auto`` (default): whichever is present, the
    client-ID header first. Only one is ever passed on: a bearer token sent to a
    sidecar that reads identity from the header would be forwarded to Polygon.
``IDENTITY_HEADER``
    Name of the client-ID header, on both hops (default ``X-Client-Id``).
``MCP_SERVER_LISTEN_PORT``
    Default for ``--port`` (8000).

FastMCP is called ``MCPServer`` since version 2 of the ``mcp`` SDK; the tools are
the same.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import httpx
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

DEFAULT_PORT = 8000
DEFAULT_ROUTE_BASE_URL = "http://127.0.0.1:8080/polygon"
DEFAULT_PROXY_BASE_URL = "http://api.polygon.io"
DEFAULT_IDENTITY_HEADER = "X-Client-Id"
SIDECAR_ERROR_HEADER = "X-Sidecar-Error"
REQUEST_TIMEOUT_SECONDS = 30.0
DEFAULT_LIMIT = 5000

# Tickers and dates become path segments: only characters Polygon uses, so no value
# can reach another path of the upstream ("../", "?", "%2F").
TICKER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9.:_-]{0,31}$"
DATE_PATTERN = r"^(\d{4}-\d{2}-\d{2}|\d{10,13})$"

Timespan = Literal["minute", "hour", "day", "week", "month", "quarter", "year"]

log = logging.getLogger("fininfo")


@dataclass(frozen=True)
class Settings:
    """Where Polygon is reached and how the caller's identity travels."""

    mode: Literal["route", "proxy"]
    base_url: str
    identity_mode: Literal["auto", "header", "jwt"]
    identity_header: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """Read and check the environment; raises SystemExit with a sentence on a problem."""
        if env.get("POLYGON_API_KEY"):
            raise SystemExit("POLYGON_API_KEY is set, but this server holds no key: the sidecar injects it. Unset it.")
        mode = env.get("SIDECAR_MODE", "route")
        if mode not in ("route", "proxy"):
            raise SystemExit(f"SIDECAR_MODE must be route or proxy, not {mode!r}")
        if mode == "proxy" and not (env.get("HTTP_PROXY") or env.get("http_proxy")):
            # Without a proxy the call would go to Polygon directly, with no key and no perimeter.
            raise SystemExit("SIDECAR_MODE=proxy needs HTTP_PROXY pointing at the sidecar, e.g. http://127.0.0.1:8080")
        identity_mode = env.get("IDENTITY_MODE", "auto")
        if identity_mode not in ("auto", "header", "jwt"):
            raise SystemExit(f"IDENTITY_MODE must be auto, header or jwt, not {identity_mode!r}")
        default_base = DEFAULT_ROUTE_BASE_URL if mode == "route" else DEFAULT_PROXY_BASE_URL
        return cls(
            mode=mode,  # type: ignore[arg-type]
            base_url=env.get("POLYGON_BASE_URL", default_base).rstrip("/"),
            identity_mode=identity_mode,  # type: ignore[arg-type]
            identity_header=env.get("IDENTITY_HEADER", DEFAULT_IDENTITY_HEADER),
        )


@dataclass(frozen=True)
class Polygon:
    """What the tools share for the life of the server: settings and one pooled client."""

    settings: Settings
    http: httpx.AsyncClient


def identity_headers(incoming: Mapping[str, str] | None, settings: Settings) -> dict[str, str]:
    """The identity of the incoming MCP request, as headers for the sidecar (maybe none)."""
    if incoming is None:  # stdio: no HTTP request, no identity; the sidecar decides
        return {}
    if settings.identity_mode in ("auto", "header"):
        client_id = incoming.get(settings.identity_header)
        if client_id:
            return {settings.identity_header: client_id}
    if settings.identity_mode in ("auto", "jwt"):
        authorization = incoming.get("Authorization", "")
        if authorization[:7].lower() == "bearer " and authorization[7:].strip():
            return {"Authorization": authorization}
    return {}


@asynccontextmanager
async def polygon_client(server: MCPServer[Any]) -> AsyncIterator[Polygon]:
    """One pooled HTTP client for the server's life."""
    settings = Settings.from_env()
    # Route mode talks to the sidecar directly, so an HTTP_PROXY in the environment must
    # not divert it; proxy mode is exactly the case where HTTP_PROXY is honoured.
    async with httpx.AsyncClient(
        timeout=REQUEST_TIMEOUT_SECONDS, trust_env=settings.mode == "proxy", follow_redirects=False
    ) as http:
        log.info("calling Polygon at %s (%s mode)", settings.base_url, settings.mode)
        yield Polygon(settings, http)


mcp = MCPServer("fininfo", instructions="Stock market aggregates from Polygon.io", lifespan=polygon_client)


async def fetch_aggregates(
    ctx: Context[Polygon, Any],
    ticker: str,
    multiplier: int,
    timespan: str,
    from_date: str,
    to_date: str,
    adjusted: bool,
    sort: str | None,
    limit: int,
) -> dict[str, Any]:
    """Call the aggregates endpoint as the caller; raise ToolError with a clear sentence on failure."""
    polygon = ctx.request_context.lifespan_context
    url = f"{polygon.settings.base_url}/v2/aggs/ticker/{ticker}/range/{multiplier}/{timespan}/{from_date}/{to_date}"
    params: dict[str, str | int] = {"adjusted": str(adjusted).lower()}
    if sort:
        params["sort"] = sort
    if limit != DEFAULT_LIMIT:
        params["limit"] = limit
    headers = identity_headers(ctx.headers, polygon.settings)
    try:
        response = await polygon.http.get(url, params=params, headers=headers)
    except httpx.TimeoutException:
        raise ToolError("The market-data call timed out; try again or ask for a shorter range.") from None
    except httpx.TransportError as exc:
        raise ToolError(f"Cannot reach the credential sidecar ({type(exc).__name__}); is it running?") from None
    log.info("%s %s -> %d", ticker, timespan, response.status_code)

    try:
        body = response.json()
    except ValueError:
        body = None
    code = response.headers.get(SIDECAR_ERROR_HEADER)
    if code:
        message = body.get("message", "") if isinstance(body, dict) else ""
        raise ToolError(f"The credential sidecar refused the call: {code} ({response.status_code}). {message}".strip())
    if response.status_code != 200 or not isinstance(body, dict):
        detail = (body.get("error") or body.get("message")) if isinstance(body, dict) else None
        raise ToolError(f"Polygon answered {response.status_code}: {detail or response.reason_phrase}")
    return body


# The parameters both tools take, as in the fininfo reference server; the MCP SDK
# turns these annotations into the tools' input schema.
Ticker = Annotated[str, Field(description="Case-sensitive ticker symbol, e.g. AAPL", pattern=TICKER_PATTERN)]
Multiplier = Annotated[int, Field(description="Size of the timespan multiplier", ge=1)]
TimespanParam = Annotated[Timespan, Field(description="Size of the time window")]
FromDate = Annotated[str, Field(description="Start: YYYY-MM-DD or a millisecond timestamp", pattern=DATE_PATTERN)]
ToDate = Annotated[str, Field(description="End: YYYY-MM-DD or a millisecond timestamp", pattern=DATE_PATTERN)]
Adjusted = Annotated[bool, Field(description="Whether results are adjusted for splits")]
Sort = Annotated[Literal["asc", "desc"] | None, Field(description="Sort by timestamp")]
Limit = Annotated[int, Field(description="Maximum number of base aggregates", ge=1, le=50000)]


@mcp.tool()
async def get_stock_aggregates(
    ticker: Ticker,
    multiplier: Multiplier,
    timespan: TimespanParam,
    from_date: FromDate,
    to_date: ToDate,
    ctx: Context[Polygon, Any],
    adjusted: Adjusted = True,
    sort: Sort = None,
    limit: Limit = DEFAULT_LIMIT,
) -> dict[str, Any]:
    """Retrieve stock aggregate bars (OHLCV) for a ticker over a date range from Polygon.io."""
    return await fetch_aggregates(ctx, ticker, multiplier, timespan, from_date, to_date, adjusted, sort, limit)


@mcp.tool()
async def print_stock_data(
    ticker: Ticker,
    multiplier: Multiplier,
    timespan: TimespanParam,
    from_date: FromDate,
    to_date: ToDate,
    ctx: Context[Polygon, Any],
    adjusted: Adjusted = True,
    sort: Sort = None,
    limit: Limit = DEFAULT_LIMIT,
) -> str:
    """Retrieve stock aggregates from Polygon.io and format every field as a readable table."""
    data = await fetch_aggregates(ctx, ticker, multiplier, timespan, from_date, to_date, adjusted, sort, limit)
    return format_aggregates(data)


def format_aggregates(data: dict[str, Any]) -> str:
    """Polygon's aggregate response as text: metadata lines, then one row per bar."""
    lines = [
        "=== Stock Aggregate Data ===",
        f"Ticker: {data.get('ticker', 'N/A')}",
        f"Adjusted: {data.get('adjusted', 'N/A')}",
        f"Query Count: {data.get('queryCount', 'N/A')}",
        f"Request ID: {data.get('request_id', 'N/A')}",
        f"Results Count: {data.get('resultsCount', 'N/A')}",
        f"Status: {data.get('status', 'N/A')}",
    ]
    results = data.get("results") or []
    if not results:
        lines.append("No result data available")
        return "\n".join(lines)
    lines.append(f"Found {len(results)} data points (times in UTC):")
    header = ("Timestamp", "Open", "High", "Low", "Close", "Volume", "VWAP", "Transactions")
    lines.append("{:<17} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10} {:>12}".format(*header))
    lines.append("-" * 98)
    for bar in results:
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(bar.get("t", 0) / 1000))
        lines.append(
            f"{when:<17} {bar.get('o', 0):>10.2f} {bar.get('h', 0):>10.2f} {bar.get('l', 0):>10.2f} "
            f"{bar.get('c', 0):>10.2f} {bar.get('v', 0):>12.0f} {bar.get('vw', 0):>10.2f} {bar.get('n', 'N/A'):>12}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Check the environment, then serve MCP over streamable HTTP."""
    parser = argparse.ArgumentParser(description="fininfo MCP server (keys injected by the credential sidecar)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("MCP_SERVER_LISTEN_PORT", DEFAULT_PORT)),
        help="port to listen on (default $MCP_SERVER_LISTEN_PORT or 8000)",
    )
    args = parser.parse_args(argv)
    Settings.from_env()  # fail before binding the port, not at the first request
    logging.basicConfig(level=logging.INFO, format="fininfo %(levelname)s %(message)s")
    mcp.run("streamable-http", host=args.host, port=args.port)


if __name__ == "__main__":
    main()
