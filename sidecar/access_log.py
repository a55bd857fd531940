"""Logging: JSON (or text) lines on stdout, and the one access line per request.

The access line is built by hand: the stdlib logging chain (records, filters,
formatters) costs several times more per request. A request only appends its raw
fields to a list; at most every FLUSH_SECONDS the lines are shaped in one loop and
written with ``os.write`` on the stream's descriptor, in pieces of whole lines (no
larger than PIPE_BUF when the workers of ``workers: N`` share one stdout: a write
that size to a pipe is atomic, so they never interleave inside a line). A busy
sidecar makes one syscall per many requests instead of one per request (Python's
own stdout, line-buffered or PYTHONUNBUFFERED as in the image, would write every
line). A quiet sidecar still shows its lines within
FLUSH_SECONDS; other log records flush pending access lines first, so the order of
lines on stdout is the order they happened.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from typing import Any, TextIO

from sidecar import metrics
from sidecar.record import Record, RequestLine

FLUSH_SECONDS = 0.05
#: Largest single write when processes share stdout: atomic on a pipe (Linux PIPE_BUF).
WRITE_PIECE = 4096
_encode_str = json.encoder.encode_basestring_ascii
#: AccessLogs with lines not yet written.
_dirty: set[AccessLog] = set()


def flush_access_lines() -> None:
    """Write every pending access line now (before another log record, and at exit)."""
    for log in list(_dirty):
        log.flush()
#: Attributes every LogRecord has; anything else came in through ``extra=`` and is logged.
_STANDARD = frozenset(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime", "taskName"}


_second: list[Any] = [-1, ""]
#: One request's line, kept raw until the flush shapes it: ts, method, path, mode, upstream,
#: status, elapsed, client_id, identity, cache, error, reason, destination.
_Entry = tuple[
    float, str, str, str, str, int, float, "str | None", "str | None", "str | None", "str | None", "str | None",
    "str | None", "str | None",
]


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


class _OrderedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that lets pending access lines out first."""

    def emit(self, record: logging.LogRecord) -> None:
        if _dirty:
            flush_access_lines()
        super().emit(record)


def configure_logging(level: str, fmt: str, stream: TextIO | None = None) -> None:
    """Send every logger to stdout in the chosen format; quiet aiohttp's own access log."""
    handler = _OrderedHandler(stream or sys.stdout)
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

    def __init__(self, fmt: str = "json", stream: TextIO | None = None, shared: bool = False) -> None:
        self.fmt = fmt
        # Processes sharing stdout (workers) must write pieces a pipe keeps whole.
        self.piece = WRITE_PIECE if shared else 16 * WRITE_PIECE
        self.stream = stream or sys.stdout
        self._pending: list[_Entry] = []
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # looked up once: each lookup is a getpid()
        try:
            self._fd: int | None = self.stream.fileno()
        except (AttributeError, OSError, ValueError):
            self._fd = None  # a StringIO in tests: written through the stream

    def account(
        self, request: RequestLine, rec: Record, elapsed: float, *, timed: bool = True, inflight: bool = True
    ) -> None:
        """Count one finished request and write its line: the one place a request is accounted.

        ``elapsed``: seconds since it began (0.0 for a head aiohttp could not parse).
        ``timed``: also a duration sample; False for a CONNECT, whose tunnel's lifetime
        is no request latency, and for an unparsed head. ``inflight``: it was counted in
        the in-flight gauge when it began (an unparsed head never was).
        """
        if inflight:
            metrics.bump(metrics.INFLIGHT, -1)
        if timed:
            metrics.record_request(rec.upstream, rec.status, elapsed)
        else:
            metrics.count_request(rec.upstream, rec.status)
        path = rec.path
        if path is None:
            # Refused before its target was parsed: an origin-form path without its query,
            # and nothing of an absolute-form target (it could carry user information).
            raw = request.raw_path
            path = raw.split("?", 1)[0] if raw.startswith("/") else "-"
        self._add((
            time.time(), request.method, path, rec.mode, rec.upstream, rec.status, elapsed, rec.client_id,
            rec.identity, rec.cache, rec.error, rec.reason, rec.destination, rec.credential,
        ))

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
        self._add((
            time.time(), method, path, mode, upstream, status, elapsed, client_id, identity, cache, error, reason,
            destination, None,
        ))

    def _format(self, entry: _Entry) -> str:
        ts, method, path, mode, upstream, status, elapsed, client_id, identity, cache, error, reason, dest, cred = entry
        if self.fmt == "json":
            # Shaped by hand: every field but path and destination is a fixed word, a
            # validated client ID, a configured name or a number, none needing escapes;
            # json.dumps of a dict per request costs several times more.
            text = (
                f'{{"ts": "{_timestamp(ts)}", "event": "request", "mode": "{mode}", '
                f'"client_id": {_q(client_id)}, "identity": {_q(identity)}, "upstream": "{upstream}", '
                f'"method": {_encode_str(method)}, "path": {_encode_str(path[:512])}, "status": {status}, '
                f'"duration_ms": {round(elapsed * 1000, 3)}, "cache": {_q(cache)}'
            )
            if dest is not None:
                text += f', "destination": {_encode_str(dest[:300])}'
            if cred is not None:
                text += f', "credential": "{cred}"'
            if error is not None:
                text += f', "error": "{error}"'
            if reason is not None:
                text += f', "reason": {_encode_str(reason)}'
            return text + "}"
        fields: dict[str, Any] = {
            "ts": _timestamp(ts), "event": "request", "mode": mode, "client_id": client_id,
            "identity": identity, "upstream": upstream, "method": method, "path": path[:512],
            "status": status, "duration_ms": round(elapsed * 1000, 3), "cache": cache,
            "destination": dest, "credential": cred, "error": error, "reason": reason,
        }
        return " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)

    def _add(self, entry: _Entry) -> None:
        self._pending.append(entry)
        if self._timer is None:
            _dirty.add(self)
            loop = self._loop
            if loop is None or loop.is_closed():
                try:
                    loop = self._loop = asyncio.get_running_loop()
                except RuntimeError:
                    self.flush()
                    return
            self._timer = loop.call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        """Write the pending lines: whole lines, pieces of at most WRITE_PIECE bytes."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        _dirty.discard(self)
        entries, self._pending = self._pending, []
        if not entries:
            return
        # Formatted here, in one tight loop, not on the request path: measured in a
        # running sidecar, shaping each line as its request ended cost ~10 µs a request
        # (cold caches between requests), several times what the same code costs here.
        form = self._format
        data = ("\n".join([form(e) for e in entries]) + "\n").encode("utf-8", "surrogateescape")
        try:
            if self._fd is None:
                self.stream.write(data.decode("utf-8", "surrogateescape"))
                self.stream.flush()
                return
            self.stream.flush()  # anything Python buffered for this stream goes first
            # Offsets into one buffer: re-slicing the rest after each write would copy
            # it again every time (measured: ~12 µs per request at 10k requests/s).
            view = memoryview(data)
            start, total = 0, len(data)
            while start < total:
                cut = total
                if total - start > self.piece:
                    cut = data.rfind(b"\n", start, start + self.piece) + 1
                    if cut <= start:  # one line longer than a piece: alone
                        cut = data.find(b"\n", start) + 1 or total
                start += os.write(self._fd, view[start:cut])
        except (OSError, ValueError):
            pass  # stdout is gone; nothing else could report it
