"""Secrets from AWS Secrets Manager through botocore, off the event loop.

botocore is imported only here, and this module only when ``secrets.backend: aws``,
so a file-backend sidecar never pays for its import (about 16 MB RSS).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from sidecar.config import AwsBackendSettings
from sidecar.secrets.base import RawSecret, SecretNotFound, StoreError

if TYPE_CHECKING:
    from mypy_boto3_secretsmanager import SecretsManagerClient

log = logging.getLogger("sidecar.secrets.aws")

#: Threads for blocking botocore calls. Single flight in the cache means one call
#: per secret at a time, so this bounds concurrent distinct cold lookups.
MAX_THREADS = 8

# Error codes Secrets Manager returns, sorted into what the cache must do.
_NOT_FOUND = frozenset({"ResourceNotFoundException", "InvalidRequestException", "InvalidParameterException"})
_DENIED = frozenset({"AccessDeniedException", "AccessDenied"})
_AUTH = frozenset(
    {"UnrecognizedClientException", "InvalidSignatureException", "ExpiredTokenException", "IncompleteSignature"}
)
_THROTTLED = frozenset({"ThrottlingException", "TooManyRequestsException", "RequestLimitExceeded"})


class AwsBackend:
    """One botocore client, created at start, called from a small thread pool."""

    name = "aws"

    def __init__(self, settings: AwsBackendSettings) -> None:
        self.settings = settings
        self.on_change: Callable[[], None] | None = None  # Secrets Manager has no push; TTL covers changes
        self._client: SecretsManagerClient | None = None
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
            connect_timeout=s.timeout_seconds,
            read_timeout=s.timeout_seconds,
            retries={"mode": "standard", "max_attempts": 3},
            max_pool_connections=MAX_THREADS,
            user_agent_extra="mcp-credential-sidecar",
        )
        session = botocore.session.get_session()
        # botocore reads AWS_DEFAULT_REGION and the profile; EKS and many tools set AWS_REGION.
        region = s.region or session.get_config_variable("region") or os.environ.get("AWS_REGION")
        if not region:
            raise StoreError("config", "no region: set secrets.aws.region or AWS_REGION")
        client: SecretsManagerClient = session.create_client(  # type: ignore[assignment]
            "secretsmanager", region_name=region, endpoint_url=s.endpoint_url, config=config
        )
        return client

    async def fetch(self, secret_id: str) -> RawSecret:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._get, secret_id)

    def _get(self, secret_id: str) -> RawSecret:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectTimeoutError,
            EndpointConnectionError,
            NoCredentialsError,
            ReadTimeoutError,
        )

        if self._client is None:
            raise StoreError("unavailable", "backend not started")
        try:
            answer: Any = self._client.get_secret_value(
                SecretId=secret_id, VersionStage=self.settings.version_stage
            )
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _NOT_FOUND:
                raise SecretNotFound(secret_id) from None
            if code in _DENIED:
                raise StoreError("access_denied", code) from None
            if code in _AUTH:
                raise StoreError("auth", code) from None
            if code in _THROTTLED:
                raise StoreError("throttled", code) from None
            raise StoreError("unavailable", code or "client error") from None
        except (ConnectTimeoutError, ReadTimeoutError):
            raise StoreError("timeout") from None
        except EndpointConnectionError:
            raise StoreError("unreachable") from None
        except NoCredentialsError:
            raise StoreError("auth", "no AWS credentials found") from None
        except BotoCoreError as exc:
            raise StoreError("unavailable", type(exc).__name__) from None
        # A name ending in "-" and six characters can be read as a partial ARN and
        # match another secret; only an exact name match counts.
        if not secret_id.startswith("arn:") and answer.get("Name") not in (None, secret_id):
            log.warning("secret name matched a different secret; refused", extra={"secret_id": secret_id})
            raise SecretNotFound(secret_id)
        if "SecretString" in answer and answer["SecretString"] is not None:
            return str(answer["SecretString"])
        binary = answer.get("SecretBinary")
        if isinstance(binary, bytes | bytearray):
            try:
                return bytes(binary).decode("utf-8")
            except UnicodeDecodeError:
                raise StoreError("invalid", "binary secret is not UTF-8") from None
        raise StoreError("invalid", "secret has no value")

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._client is not None:
            self._client.close()
