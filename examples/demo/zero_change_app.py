"""An app that knows nothing of the credential sidecar: it calls Polygon with ``requests``.

    POLYGON_API_KEY=... python examples/demo/zero_change_app.py

This is how the upstream fininfo server calls Polygon (``servers/fininfo/server.py``
of mcp-gateway-registry, see docs/unmodified-server.md): the key from
``POLYGON_API_KEY`` in the ``apiKey`` query parameter of
``https://api.polygon.io/v2/aggs/...``, through ``requests.get``, and a refusal
to start without a key. Nothing here names the sidecar. The demo runs it with:

- ``POLYGON_API_KEY`` set to a placeholder, which the sidecar strips;
- ``HTTPS_PROXY`` naming the sidecar, which intercepts the ``CONNECT``;
- ``REQUESTS_CA_BUNDLE`` naming the CA the sidecar wrote (``ca_cert_out``).

Prints Polygon's JSON answer on one line; exits 1, with the error on stderr,
when the call fails.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import requests

API_KEY = os.environ.get("POLYGON_API_KEY")
if not API_KEY:
    raise ValueError("POLYGON_API_KEY environment variable is not set.")

BASE_URL = "https://api.polygon.io"
TIMEOUT_SECONDS = 10


def get_stock_aggregates(
    stock_ticker: str, multiplier: int, timespan: str, from_date: str, to_date: str, limit: int = 5000
) -> dict[str, Any]:
    """Aggregate bars for a ticker, as the upstream server asks Polygon for them."""
    url = f"{BASE_URL}/v2/aggs/ticker/{stock_ticker}/range/{multiplier}/{timespan}/{from_date}/{to_date}"
    query_params = {"adjusted": "true", "sort": "asc", "limit": limit, "apiKey": API_KEY}
    response = requests.get(url, params=query_params, timeout=TIMEOUT_SECONDS)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def main() -> int:
    """Fetch AAPL's daily bars for 2024-01-02..2024-01-12 and print the answer."""
    try:
        data = get_stock_aggregates("AAPL", 1, "day", "2024-01-02", "2024-01-12")
    except requests.RequestException as exc:
        # The message may hold the URL with its query: this process only ever has
        # the key it was given, which beside the sidecar is the placeholder.
        print(f"zero_change_app: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
