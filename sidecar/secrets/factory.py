"""One backend factory: ``secrets.backend`` in, a started store out, its start-up failures as one error.

The app asks for a started store and knows no backend's own exception types. A new
store is its module, one line in ``BUILDERS`` and its name in ``config.BACKENDS``.
"""

from __future__ import annotations

from collections.abc import Callable

from sidecar.config import SecretsSettings
from sidecar.secrets.base import EmptyStore, SecretBackend, StoreError
from sidecar.secrets.file import FileBackend, FileLoadError


class BackendStartError(Exception):
    """The configured store cannot start. The message names the config section and holds no secret."""


def _file(settings: SecretsSettings) -> SecretBackend:
    if settings.file.path is None:  # config allows this only with no upstreams
        return EmptyStore()
    return FileBackend(settings.file.path)


def _aws(settings: SecretsSettings) -> SecretBackend:
    from sidecar.secrets.aws import AwsBackend  # botocore is imported only for the AWS backend

    return AwsBackend(settings.aws, settings.lookup_timeout_seconds)


def _vault(settings: SecretsSettings) -> SecretBackend:
    from sidecar.secrets.vault import VaultBackend  # plain aiohttp calls: no client library to import

    return VaultBackend(settings.vault, settings.lookup_timeout_seconds)


#: ``secrets.backend`` -> what builds it; the keys are ``config.BACKENDS`` (a test holds them equal).
BUILDERS: dict[str, Callable[[SecretsSettings], SecretBackend]] = {"file": _file, "aws": _aws, "vault": _vault}


def build_backend(settings: SecretsSettings) -> SecretBackend:
    """The configured store, not started."""
    return BUILDERS[settings.backend](settings)


async def start_backend(settings: SecretsSettings) -> SecretBackend:
    """The configured store, started; raises BackendStartError."""
    backend = build_backend(settings)
    try:
        await backend.start()
    except StoreError as exc:
        raise BackendStartError(f"secrets.{settings.backend}: {exc.detail or exc.kind}") from None
    except FileLoadError as exc:
        raise BackendStartError(f"secrets.{settings.backend}: {exc}") from None  # ours: no file content
    except Exception as exc:
        # A library's text may quote what it read (a key); its type is enough.
        raise BackendStartError(f"secrets.{settings.backend}: {type(exc).__name__}") from None
    return backend
