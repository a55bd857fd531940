"""Fault injection around the secret store, all on 127.0.0.1.

- ``FakeSecretsManager`` speaks just enough of the Secrets Manager JSON protocol
  (``GetSecretValue``) to answer per secret id with a chosen fault: throttling,
  access denied, decryption failure, a non-JSON body, a slow answer. It resolves
  ids as AWS documents (a name exactly; an ARN as a complete ARN when it ends in
  ``-`` and the secret's six-character suffix, else as a partial ARN), and can be
  a hostile store: answer an id with another secret (``aliases``), or answer with a
  ``Name``, ``ARN`` or ``VersionStages`` other than the secret's (answer faults).
- ``FaultProxy`` is a TCP proxy in front of moto's server that can pass, delay,
  refuse (close at once) or black-hole (accept, never answer) connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import boto3
from aiohttp import web

from tests.support.raw_http import LOCAL, LoopThread, StreamServerMixin

ACCOUNT = "123456789012"
REGION = "us-east-1"
#: Every secret's random ARN suffix unless ``suffixes`` says otherwise.
SUFFIX = "AbCdEf"
#: Longest any fault holds a connection; tests give up earlier.
HOLD_SECONDS = 15.0


def secrets_manager(endpoint: str) -> Any:
    """A boto3 Secrets Manager client for seeding moto (or the fake) at ``endpoint``."""
    return boto3.client(
        "secretsmanager", region_name=REGION, endpoint_url=endpoint,
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )


def put_secret(client: Any, name: str, **value: Any) -> str:
    """Create the secret, or give an existing one this value (moto lives per session); its ARN."""
    try:
        return str(client.create_secret(Name=name, **value)["ARN"])
    except client.exceptions.ResourceExistsException:
        return str(client.put_secret_value(SecretId=name, **value)["ARN"])


def arn(name: str, suffix: str = SUFFIX, *, region: str = REGION, account: str = ACCOUNT) -> str:
    """A secret's ARN; ``suffix=""`` gives the partial ARN (no "-" and suffix)."""
    return f"arn:aws:secretsmanager:{region}:{account}:secret:{name}" + (f"-{suffix}" if suffix else "")


@dataclass
class FakeSecretsManager:
    """A Secrets Manager answering ``GetSecretValue`` on 127.0.0.1.

    ``values``: secret name -> value. ``suffixes``: name -> its ARN's random suffix
    (default SUFFIX). ``faults``: secret id asked -> space-separated fault words:
    throttle, denied, decrypt, internal, garbage, slow (errors and delays); and
    answer faults, which change what the answer says about itself: other-name (the
    name before the last "-"), echo-name (the name asked for, whatever was found),
    no-name, no-arn, other-region, other-account, stage (only AWSPREVIOUS).
    ``aliases``: secret id asked -> the name of the secret answered instead (a store
    that folds case, trims, or matches suffixes where AWS does not).
    """

    values: dict[str, str] = field(default_factory=dict)
    faults: dict[str, str] = field(default_factory=dict)
    suffixes: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
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

    def resolve(self, secret_id: str) -> str | None:
        """The name of the secret AWS answers ``secret_id`` with, or None (not found)."""
        if secret_id in self.aliases:
            return self.aliases[secret_id]
        prefix = arn("", "")
        if not secret_id.startswith("arn:"):
            return secret_id if secret_id in self.values else None
        if not secret_id.startswith(prefix):
            return None
        resource = secret_id[len(prefix):]
        # AWS reads a trailing "-" and six characters as the suffix of a complete ARN first.
        name, dash, suffix = resource[:-7], resource[-7:-6], resource[-6:]
        if dash == "-" and name in self.values and self.suffixes.get(name, SUFFIX) == suffix:
            return name
        return resource if resource in self.values else None

    def _describe(self, secret_id: str, name: str, faults: set[str]) -> dict[str, object]:
        """What the answer says about the secret it holds, after any answer faults."""
        if "other-name" in faults:
            name = secret_id.rsplit("-", 1)[0]  # the "partial ARN" match of a different secret
        said = {"Name": name, "ARN": arn(name, self.suffixes.get(name, SUFFIX)), "VersionStages": ["AWSCURRENT"]}
        if "echo-name" in faults:
            said["Name"] = secret_id.split(":secret:", 1)[-1]
        if "other-region" in faults:
            said["ARN"] = arn(name, self.suffixes.get(name, SUFFIX), region="eu-west-1")
        if "other-account" in faults:
            said["ARN"] = arn(name, self.suffixes.get(name, SUFFIX), account="210987654321")
        if "stage" in faults:
            said["VersionStages"] = ["AWSPREVIOUS"]
        for key, fault in (("Name", "no-name"), ("ARN", "no-arn")):
            if fault in faults:
                del said[key]
        return said

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read() or b"{}")
        secret_id = str(body.get("SecretId", ""))
        self.hits[secret_id] += 1
        faults = set(self.faults.get(secret_id, "").split())
        if "throttle" in faults:
            return self._error("ThrottlingException", "Rate exceeded")
        if "denied" in faults:
            # Real AWS messages name the caller's role and the resource: neither may reach the app.
            return self._error(
                "AccessDeniedException",
                f"User: arn:aws:sts::{ACCOUNT}:assumed-role/sidecar/i-0abc is not authorized to perform: "
                f"secretsmanager:GetSecretValue on resource: {arn(secret_id)}",
            )
        if "decrypt" in faults:
            return self._error("DecryptionFailure", f"KMS key for {arn(secret_id)} is disabled")
        if "internal" in faults:
            return self._error("InternalServiceError", "try again", status=500)
        if "garbage" in faults:
            return web.Response(text="<html>not json</html>", content_type="application/x-amz-json-1.1")
        if "slow" in faults:
            await asyncio.sleep(self.delay)
        name = self.resolve(secret_id)
        if name is None or name not in self.values:
            return self._error("ResourceNotFoundException", "Secrets Manager can't find the specified secret.")
        return web.json_response(
            {**self._describe(secret_id, name, faults), "SecretString": self.values[name], "VersionId": "v1",
             "CreatedDate": 1700000000.0},
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
