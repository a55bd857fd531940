"""Secrets from AWS Secrets Manager through botocore, off the event loop.

botocore is imported only here, and this module only when ``secrets.backend: aws``,
so a file-backend sidecar never pays for its import (about 16 MB RSS).

Writes (an OAuth grant rotated, ``oauth login``) are PutSecretValue of the JSON
value. Secrets Manager has no check-and-set, so the sidecar builds one from two
parts. First it reads the secret again (GetSecretValue at ``version_stage``, the
permission reads have already) and writes only when its VersionId is still the one
the writer read. Then the new version's id, the ClientRequestToken, is not random:
it is derived from the secret's ARN and the version it replaces. Secrets Manager
never changes a version once made, so of two sidecars that read the same version
and write different values, the second is refused (ResourceExistsException, which
is WriteConflict here); a retry of our own call with the same value is the no-op
Secrets Manager promises for a repeated token. What is left: a writer that is not a
sidecar (the console, a rotation Lambda) makes a random version id, so a sidecar
write can still land over such a write made between its check and its put, a window
of one round trip. Creating a secret that does not exist yet (``expected`` None) is
CreateSecret, which refuses a name that exists.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from sidecar.config import DEFAULT_LOOKUP_TIMEOUT_SECONDS, AwsBackendSettings
from sidecar.secrets.base import (
    RawSecret,
    SecretMismatch,
    SecretNotFound,
    SecretPendingDeletion,
    StoreError,
    StoreVersion,
    VersionedText,
    WriteConflict,
    WriteResult,
    Written,
)

if TYPE_CHECKING:
    from mypy_boto3_secretsmanager import SecretsManagerClient

log = logging.getLogger("sidecar.secrets.aws")

_T = TypeVar("_T")

#: Threads for blocking botocore calls. Single flight in the cache means one call
#: per secret at a time, so this bounds concurrent distinct lookups, and also how many
#: threads a store that never answers can hold: a thread is busy until the attempt it
#: runs times out, at most ``timeout_seconds`` (connect, then read) after the lookup's
#: deadline. A lookup that finds every thread busy waits in the pool's queue; when its
#: deadline passes first, the cache stops waiting and the queued call is dropped unmade.
MAX_THREADS = 8
#: Calls to Secrets Manager per lookup at most: the first and two retries (botocore's own
#: retries are off; these are ours, so that none starts after the lookup's deadline).
MAX_ATTEMPTS = 3
#: Before retry n (1, 2), a pause of random() * BACKOFF_SECONDS * 2**(n-1), as botocore's
#: standard mode does; a retry whose pause would end past the deadline is not made.
BACKOFF_SECONDS = 1.0

# Error codes Secrets Manager returns, sorted into what the cache must do.
_NOT_FOUND = frozenset({"ResourceNotFoundException", "InvalidRequestException", "InvalidParameterException"})
#: InvalidRequestException says this (AWS: "...because it was marked for deletion"; moto:
#: "...currently marked deleted") when the secret is scheduled for deletion.
_DELETION_WORD = "delet"
_DENIED = frozenset({"AccessDeniedException", "AccessDenied"})
_AUTH = frozenset(
    {"UnrecognizedClientException", "InvalidSignatureException", "ExpiredTokenException", "IncompleteSignature"}
)
_THROTTLED = frozenset({"ThrottlingException", "TooManyRequestsException", "RequestLimitExceeded"})
#: Worth a retry at once besides throttling (any 5xx answer too), as botocore's standard mode sees it.
_TRANSIENT = frozenset(
    {"InternalServiceError", "InternalFailure", "ServiceUnavailable", "RequestTimeout", "RequestTimeoutException",
     "PriorRequestNotComplete"}
)

#: Secrets Manager's answer when a version id (ClientRequestToken) or a name is taken already.
_EXISTS = "ResourceExistsException"
#: The namespace of the version ids sidecar writes derive (uuid5 of ARN and the version replaced).
_VERSION_NAMESPACE = uuid.UUID("5b0f1c2e-8d1a-4f4e-9a57-3c1d2e6f7a80")
#: The stage writes move unless ``version_stage`` names another.
_CURRENT = "AWSCURRENT"

#: Secrets Manager ends every secret's ARN in "-" and this many random characters.
SUFFIX_LENGTH = 6

#: Why an answer is not the secret asked for (the log's ``mismatch`` word), for the operator.
MISMATCHES = {
    "unnamed": "the answer does not say which secret it is (no Name or no ARN)",
    "name": "the answer names another secret",
    "suffix": (
        "the id ends in '-' and six characters, which Secrets Manager read as the random suffix of "
        "another secret's ARN; a secret template must be a name or an ARN without that suffix"
    ),
    "arn": "the answer's ARN is not the secret asked for (another name, partition, region or account)",
    "version_stage": "the answer is not at the configured version_stage",
}


class SecretArn(NamedTuple):
    """``arn:PARTITION:secretsmanager:REGION:ACCOUNT:secret:RESOURCE``, split."""

    partition: str
    region: str
    account: str
    resource: str


def parse_secret_arn(value: str) -> SecretArn | None:
    """The parts of a Secrets Manager secret ARN, or None when ``value`` is not one."""
    parts = value.split(":", 6)
    if len(parts) != 7 or parts[0] != "arn" or parts[2] != "secretsmanager" or parts[5] != "secret":
        return None
    arn = SecretArn(parts[1], parts[3], parts[4], parts[6])
    return arn if all(arn) else None


def _where(arn: SecretArn) -> tuple[str, str, str]:
    return (arn.partition, arn.region, arn.account)


def _suffixed(resource: str, name: str) -> bool:
    """Whether ``resource`` is ``name`` plus "-" and the six-character random suffix."""
    tail = resource[len(name):]
    return (
        resource.startswith(name)
        and len(tail) == SUFFIX_LENGTH + 1
        and tail[0] == "-"
        and "/" not in tail
        and ":" not in tail
    )


def answer_mismatch(secret_id: str, answer: Any, version_stage: str, region: str | None) -> str | None:
    """Why ``answer`` is not the secret ``secret_id`` asks for (a MISMATCHES word), or None.

    The answer must say which secret it is. For a name, ``Name`` is that name exactly
    and the ARN is that name plus the random suffix, in our region. For an ARN, it is
    read as a partial ARN (without the suffix): ``Name`` is its resource part exactly
    and the answer's ARN is the id plus the suffix, so partition, region and account
    are the ones asked for. An ARN that carries a suffix already is therefore refused:
    whether the template or a client ID wrote those seven characters cannot be told
    from the id, and a client ID ``alice-AbCdEf`` must not reach alice's secret.
    """
    name, arn = answer.get("Name"), answer.get("ARN")
    if not isinstance(name, str) or not isinstance(arn, str) or not name or not arn:
        return "unnamed"
    got = parse_secret_arn(arn)
    if secret_id.startswith("arn:"):
        asked = parse_secret_arn(secret_id)
        if asked is None:
            return "arn"
        if name != asked.resource:
            return "suffix" if _suffixed(asked.resource, name) else "name"
        if got is None or not _suffixed(got.resource, name) or _where(got) != _where(asked):
            return "arn"
    else:
        if name != secret_id:
            return "name"
        if got is None or not _suffixed(got.resource, name) or (region is not None and got.region != region):
            return "arn"
    stages = answer.get("VersionStages")
    if stages is not None and (not isinstance(stages, list) or version_stage not in stages):
        return "version_stage"
    return None


def next_version_id(arn: str, replaced: str | None) -> str:
    """The id of the version a sidecar writes after ``replaced``: the same for every sidecar, so only one lands."""
    return str(uuid.uuid5(_VERSION_NAMESPACE, f"{arn}\n{replaced or ''}"))


class _Exists(Exception):
    """ResourceExistsException: the version id or the name is taken (a write lost the race)."""


class AwsBackend:
    """One botocore client, created at start, called from a small thread pool.

    A lookup makes at most MAX_ATTEMPTS calls, each with ``timeout_seconds`` as connect
    and read timeout, and starts none after ``lookup_timeout`` from its start. The
    cache bounds the wait for a lookup by the same time whatever the backend does;
    this keeps the thread's own work inside that bound too, give or take the attempt
    that is running when it ends.
    """

    name = "aws"

    def __init__(self, settings: AwsBackendSettings, lookup_timeout: float = DEFAULT_LOOKUP_TIMEOUT_SECONDS) -> None:
        self.settings = settings
        self.lookup_timeout = lookup_timeout
        #: connect and read timeout of one attempt (config refuses one longer than the lookup)
        self.attempt_timeout = min(settings.timeout_seconds or lookup_timeout, lookup_timeout)
        self.backoff_seconds = BACKOFF_SECONDS
        self.on_change: Callable[[], None] | None = None  # Secrets Manager has no push; TTL covers changes
        self._client: SecretsManagerClient | None = None
        #: the region names resolve in (settled at start: settings, profile or AWS_REGION)
        self._region: str | None = settings.region
        self._executor = ThreadPoolExecutor(max_workers=MAX_THREADS, thread_name_prefix="secretsmanager")

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._client = await loop.run_in_executor(self._executor, self._make_client)

    def _make_client(self) -> SecretsManagerClient:
        # botocore directly, not boto3: the same client and credential chain (env,
        # profile, IRSA web identity, instance metadata) without boto3's resource
        # layer, about 2 MiB less resident memory.
        import botocore.session
        from botocore.config import Config

        s = self.settings
        config = Config(
            connect_timeout=self.attempt_timeout,
            read_timeout=self.attempt_timeout,
            # No retries inside botocore: _get makes them, and only while the lookup's deadline is ahead.
            retries={"mode": "standard", "total_max_attempts": 1},
            max_pool_connections=MAX_THREADS,
            user_agent_extra="mcp-credential-sidecar",
        )
        session = botocore.session.get_session()
        # botocore reads AWS_DEFAULT_REGION and the profile; EKS and many tools set AWS_REGION.
        region = s.region or session.get_config_variable("region") or os.environ.get("AWS_REGION")
        if not region:
            raise StoreError("config", "no region: set secrets.aws.region or AWS_REGION")
        self._region = region
        client: SecretsManagerClient = session.create_client(  # type: ignore[assignment]
            "secretsmanager", region_name=region, endpoint_url=s.endpoint_url, config=config
        )
        return client

    async def fetch(self, secret_id: str) -> RawSecret:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.lookup_timeout
        return await loop.run_in_executor(self._executor, self._get, secret_id, deadline)

    def _get(self, secret_id: str, deadline: float) -> RawSecret:
        """Up to MAX_ATTEMPTS calls, retrying transient failures, none started past ``deadline``."""
        return self._answer_value(secret_id, self._retrying(self._read_answer, secret_id, deadline))

    def _retrying(self, call: Callable[..., _T], secret_id: str, deadline: float, *args: Any) -> _T:
        """``call(secret_id, *args)``, again while it fails transiently: MAX_ATTEMPTS, none past ``deadline``."""
        attempt = 1
        while True:
            if time.monotonic() >= deadline:
                # Queued behind busy threads until the lookup was over: no call is made for nobody.
                raise StoreError("timeout", "no store thread was free within lookup_timeout_seconds")
            try:
                return call(secret_id, *args)
            except StoreError as failure:
                pause = random.random() * self.backoff_seconds * 2 ** (attempt - 1)  # noqa: S311 - jitter
                if not failure.transient or attempt >= MAX_ATTEMPTS or time.monotonic() + pause >= deadline:
                    raise
            time.sleep(pause)
            attempt += 1

    def _call(self, secret_id: str, operation: str, **params: Any) -> Any:
        """One Secrets Manager call; its failures sorted into the store's errors (none quoting AWS's message)."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            HTTPClientError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        if self._client is None:
            raise StoreError("unavailable", "backend not started")
        try:
            return getattr(self._client, operation)(**params)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "InvalidRequestException" and _DELETION_WORD in str(error.get("Message", "")).lower():
                raise SecretPendingDeletion(secret_id) from None
            if code == _EXISTS:
                raise _Exists() from None
            if code in _NOT_FOUND:
                raise SecretNotFound(secret_id) from None
            if code in _DENIED:
                raise StoreError("access_denied", code) from None
            if code in _AUTH:
                raise StoreError("auth", code) from None
            if code in _THROTTLED:
                raise StoreError("throttled", code, transient=True) from None
            transient = code in _TRANSIENT or (isinstance(status, int) and status >= 500)
            raise StoreError("unavailable", code or "client error", transient=transient) from None
        except (ConnectTimeoutError, ReadTimeoutError):
            raise StoreError("timeout", transient=True) from None
        except EndpointConnectionError:
            raise StoreError("unreachable", transient=True) from None
        except NoCredentialsError:
            raise StoreError("auth", "no AWS credentials found") from None
        except HTTPClientError as exc:  # the connection broke mid-call (closed, reset)
            raise StoreError("unavailable", type(exc).__name__, transient=True) from None
        except BotoCoreError as exc:
            raise StoreError("unavailable", type(exc).__name__) from None

    def _read_answer(self, secret_id: str) -> Any:
        """GetSecretValue at ``version_stage``, checked to be the secret asked for (else SecretMismatch)."""
        answer = self._call(
            secret_id, "get_secret_value", SecretId=secret_id, VersionStage=self.settings.version_stage
        )
        if answer.get("SecretString") is None and answer.get("SecretBinary") is None:
            # A body botocore could not parse comes back as an empty answer: a failing
            # store (503, retried), not an answer about some secret.
            raise StoreError("invalid", "secret has no value")
        # Checked before the value is touched: another secret's value is never even decoded.
        mismatch = answer_mismatch(secret_id, answer, self.settings.version_stage, self._region)
        if mismatch is not None:
            log.warning(
                "secret store answered with another secret than asked for; refused as no secret: %s",
                MISMATCHES[mismatch],
                extra={"secret_id": secret_id, "mismatch": mismatch},
            )
            raise SecretMismatch(secret_id)
        return answer

    @staticmethod
    def _answer_value(secret_id: str, answer: Any) -> RawSecret:
        """The value of a checked answer, carrying its VersionId (what a write names as ``expected``)."""
        string, binary = answer.get("SecretString"), answer.get("SecretBinary")
        version = answer.get("VersionId")
        version = version if isinstance(version, str) and version else None
        if string is not None:
            return VersionedText(str(string), version)
        if isinstance(binary, bytes | bytearray):
            try:
                text = bytes(binary).decode("utf-8")
            except UnicodeDecodeError:
                text = None  # raised below: the decoder's error holds the bytes
            if text is not None:
                return VersionedText(text, version)
            raise StoreError("invalid", "binary secret is not UTF-8")
        raise StoreError("invalid", "secret has no value")

    async def write(self, secret_id: str, value: Mapping[str, str], expected: StoreVersion | None) -> WriteResult:
        """PutSecretValue of ``value`` as JSON if the secret's version is still ``expected`` (see the module doc).

        ``expected`` None: CreateSecret, only when there is no such secret (by name: an
        ARN names a secret that exists). Failures are the reads' StoreErrors; a secret
        deleted or scheduled for deletion since the read is WriteConflict (a read then
        says so), one that answers as another secret is refused.
        """
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.lookup_timeout
        text = json.dumps(dict(value), separators=(",", ":"))
        return await loop.run_in_executor(self._executor, self._write, secret_id, text, expected, deadline)

    def _write(self, secret_id: str, text: str, expected: StoreVersion | None, deadline: float) -> WriteResult:
        try:
            answer = self._retrying(self._read_answer, secret_id, deadline)
        except SecretMismatch:
            raise StoreError("invalid", "the secret id answers as another secret; nothing written") from None
        except SecretPendingDeletion:
            if expected is None:
                raise StoreError("invalid", "the secret is scheduled for deletion; restore it first") from None
            return WriteConflict()
        except SecretNotFound:
            if expected is not None:
                return WriteConflict()  # deleted since it was read
            return self._create(secret_id, text, deadline)
        current = answer.get("VersionId")
        if expected is None or not isinstance(current, str) or current != str(expected):
            return WriteConflict()
        arn = str(answer["ARN"])  # answer_mismatch checked it is the secret asked for
        try:
            return self._retrying(self._put, secret_id, deadline, arn, text, next_version_id(arn, current))
        except _Exists:
            pass
        # The version after ours exists: another sidecar wrote it first, unless AWSCURRENT was
        # moved back to the version we read (a rollback), which leaves that id taken for good.
        answer = self._retrying(self._read_answer, secret_id, deadline)
        if answer.get("VersionId") != current:
            return WriteConflict()
        try:
            return self._retrying(self._put, secret_id, deadline, arn, text, str(uuid.uuid4()))
        except _Exists:
            return WriteConflict()

    def _put(self, secret_id: str, arn: str, text: str, token: str) -> WriteResult:
        params: dict[str, Any] = {"SecretId": arn, "SecretString": text, "ClientRequestToken": token}
        if self.settings.version_stage != _CURRENT:
            params["VersionStages"] = [self.settings.version_stage]
        answer = self._call(secret_id, "put_secret_value", **params)
        return Written(str(answer.get("VersionId") or token))

    def _create(self, secret_id: str, text: str, deadline: float) -> WriteResult:
        if secret_id.startswith("arn:"):
            raise StoreError("invalid", "no such secret; a secret is created by name, not by ARN")
        token = next_version_id(secret_id, None)

        def create(name: str) -> WriteResult:
            answer = self._call(name, "create_secret", Name=name, SecretString=text, ClientRequestToken=token)
            return Written(str(answer.get("VersionId") or token))

        try:
            return self._retrying(create, secret_id, deadline)
        except _Exists:
            return WriteConflict()  # another writer made it first

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._client is not None:
            self._client.close()
