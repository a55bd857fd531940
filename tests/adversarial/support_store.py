"""Fault injection around the secret store, all on 127.0.0.1.

- ``FakeSecretsManager`` speaks just enough of the Secrets Manager JSON protocol
  (``GetSecretValue``) to answer per secret id with a chosen fault: throttling,
  access denied, decryption failure, a non-JSON body, a slow answer, or a secret
  whose ``Name`` differs from the id asked for (what AWS does when a name ending in
  ``-`` and six characters is read as a partial ARN of another secret).
- ``FaultProxy`` is a TCP proxy in front of moto's server that can pass, delay,
  refuse (close at once) or black-hole (accept, never answer) connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web

from tests.adversarial.support_http import LOCAL, LoopThread, StreamServerMixin

ACCOUNT = "123456789012"
#: Longest any fault holds a connection; tests give up earlier.
HOLD_SECONDS = 15.0


def arn(name: str) -> str:
    return f"arn:aws:secretsmanager:us-east-1:{ACCOUNT}:secret:{name}-AbCdEf"


@dataclass
class FakeSecretsManager:
    """``values``: secret id -> value; ``faults``: secret id -> fault name (see ``_answer``)."""

    values: dict[str, str] = field(default_factory=dict)
    faults: dict[str, str] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    delay: float = 5.0
    port: int = 0
    _thread: LoopThread | None = None
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{LOCAL}:{self.port}"

    def start(self) -> FakeSecretsManager:
        self._thread = LoopThread("fake-secretsmanager")

        async def serve() -> int:
            app = web.Application()
            app.router.add_post("/", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, LOCAL, 0)
            await site.start()
            return int(self._runner.addresses[0][1])

        self.port = self._thread.run(serve())
        return self

    def stop(self) -> None:
        assert self._thread is not None and self._runner is not None
        with contextlib.suppress(Exception):
            self._thread.run(self._runner.cleanup())
        self._thread.stop()

    @staticmethod
    def _error(code: str, message: str, status: int = 400) -> web.Response:
        return web.json_response(
            {"__type": code, "message": message}, status=status, headers={"x-amzn-ErrorType": code}
        )

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read() or b"{}")
        secret_id = str(body.get("SecretId", ""))
        self.hits[secret_id] += 1
        fault = self.faults.get(secret_id)
        if fault == "throttle":
            return self._error("ThrottlingException", "Rate exceeded")
        if fault == "denied":
            # Real AWS messages name the caller's role and the resource: neither may reach the app.
            return self._error(
                "AccessDeniedException",
                f"User: arn:aws:sts::{ACCOUNT}:assumed-role/sidecar/i-0abc is not authorized to perform: "
                f"secretsmanager:GetSecretValue on resource: {arn(secret_id)}",
            )
        if fault == "decrypt":
            return self._error("DecryptionFailure", f"KMS key for {arn(secret_id)} is disabled")
        if fault == "internal":
            return self._error("InternalServiceError", "try again", status=500)
        if fault == "garbage":
            return web.Response(text="<html>not json</html>", content_type="application/x-amz-json-1.1")
        if fault == "slow":
            await asyncio.sleep(self.delay)
        value = self.values.get(secret_id)
        if value is None:
            return self._error("ResourceNotFoundException", "Secrets Manager can't find the specified secret.")
        name = secret_id
        if fault == "other-name":
            name = secret_id.rsplit("-", 1)[0]  # the "partial ARN" match of a different secret
        return web.json_response(
            {"ARN": arn(name), "Name": name, "SecretString": value, "VersionId": "v1",
             "VersionStages": ["AWSCURRENT"], "CreatedDate": 1700000000.0},
            content_type="application/x-amz-json-1.1",
        )


@dataclass
class FaultProxy(StreamServerMixin):
    """A TCP proxy to ``target``; ``mode`` is pass, delay, refuse or blackhole."""

    target: tuple[str, int]
    mode: str = "pass"
    delay: float = 3.0
    thread_name = "fault-proxy"
    port: int = 0
    connections: int = 0
    _thread: LoopThread | None = None
    _server: asyncio.Server | None = None


    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        mode = self.mode
        try:
            if mode == "refuse":
                return
            if mode == "blackhole":
                with contextlib.suppress(TimeoutError, ConnectionError):
                    await asyncio.wait_for(reader.read(), HOLD_SECONDS)
                return
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            try:
                await asyncio.gather(
                    self._pipe(reader, up_writer, self.delay if mode == "delay" else 0.0),
                    self._pipe(up_reader, writer, 0.0),
                )
            finally:
                up_writer.close()
        except (ConnectionError, OSError, TimeoutError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await asyncio.wait_for(reader.read(65536), HOLD_SECONDS * 4):
                if delay:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
            writer.write_eof()
