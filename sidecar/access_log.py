"""Logging: JSON (or text) lines on stdout, and the one access line per request.

The access line is built by hand and written straight to stdout: the stdlib
logging chain (records, filters, formatters) costs several times more per
request. Writes are flushed at most every FLUSH_SECONDS so a busy sidecar does
not make one syscall per request, and a quiet one still shows its lines at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from sidecar.proxy import RequestLine, _Record

FLUSH_SECONDS = 0.05
#: Attributes every LogRecord has; anything else came in through ``extra=`` and is logged.
_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "taskName"}


_second: list[Any] = [-1, ""]


def _timestamp(now: float) -> str:
    """RFC 3339 UTC with milliseconds; the formatted second is reused within a second."""
    whole = int(now)
    if whole != _second[0]:
        _second[0] = whole
        _second[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{_second[1]}.{int((now - whole) * 1000):03d}Z"


def _q(value: str | None) -> str:
    """A JSON string or null for values known to need no escaping."""
    return "null" if value is None else f'"{value}"'


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, message and the ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD:
                line[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            # The type only: exception text from libraries can carry URLs with keys.
            line["exception"] = record.exc_info[0].__name__
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """Human-readable lines for local runs."""

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in _STANDARD)
        text = f"{_timestamp(record.created)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if record.exc_info and record.exc_info[0] is not None:
            text += f" exception={record.exc_info[0].__name__}"
        return f"{text} {extras}" if extras else text


def configure_logging(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Send every logger to stdout in the chosen format; quiet aiohttp's own access log."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # botocore logs request details at debug; never let it speak below warning.
    for noisy in ("botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class AccessLog:
    """Writes the canonical request line."""

    def __init__(self, fmt: str = "json", stream: TextIO | None = None) -> None:
        self.fmt = fmt
        self.stream = stream or sys.stdout
        self._flush_pending = False

    def request(self, request: RequestLine, rec: _Record, elapsed: float) -> None:
        """The line for an HTTP request the data plane handled."""
        path = rec.path
        if path is None:
            # Refused before its target was parsed: an origin-form path without its query,
            # and nothing of an absolute-form target (it could carry user information).
            raw = request.raw_path
            path = raw.split("?", 1)[0] if raw.startswith("/") else "-"
        self.line(
            method=request.method,
            path=path,
            mode=rec.mode,
            upstream=rec.upstream,
            status=rec.status,
            elapsed=elapsed,
            client_id=rec.client_id,
            identity=rec.identity,
            cache=rec.cache,
            error=rec.error,
            reason=rec.reason,
            destination=rec.destination,
        )

    def line(
        self,
        *,
        method: str,
        path: str,
        mode: str,
        upstream: str,
        status: int,
        elapsed: float,
        client_id: str | None = None,
        identity: str | None = None,
        cache: str | None = None,
        error: str | None = None,
        reason: str | None = None,
        destination: str | None = None,
    ) -> None:
        """Write one access line; every field is ours or validated, never a secret."""
        if self.fmt == "json":
            # Shaped by hand: every field but path and destination is a fixed word, a
            # validated client ID, a configured name or a number, none needing escapes;
            # json.dumps of a dict per request costs several times more.
            text = (
                f'{{"ts": "{_timestamp(time.time())}", "event": "request", "mode": "{mode}", '
                f'"client_id": {_q(client_id)}, "identity": {_q(identity)}, "upstream": "{upstream}", '
                f'"method": {json.dumps(method)}, "path": {json.dumps(path[:512])}, "status": {status}, '
                f'"duration_ms": {round(elapsed * 1000, 3)}, "cache": {_q(cache)}'
            )
            if destination is not None:
                text += f', "destination": {json.dumps(destination[:300])}'
            if error is not None:
                text += f', "error": "{error}"'
            if reason is not None:
                text += f', "reason": {json.dumps(reason)}'
            text += "}"
        else:
            fields: dict[str, Any] = {
                "ts": _timestamp(time.time()), "event": "request", "mode": mode, "client_id": client_id,
                "identity": identity, "upstream": upstream, "method": method, "path": path[:512],
                "status": status, "duration_ms": round(elapsed * 1000, 3), "cache": cache,
                "destination": destination, "error": error, "reason": reason,
            }
            text = " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        self.stream.write(text + "\n")
        if not self._flush_pending:
            self._flush_pending = True
            try:
                asyncio.get_running_loop().call_later(FLUSH_SECONDS, self._flush)
            except RuntimeError:
                self._flush()

    def _flush(self) -> None:
        self._flush_pending = False
        try:
            self.stream.flush()
        except (OSError, ValueError):
            pass
