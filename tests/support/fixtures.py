"""The suite's shared fixtures, in one place (tests/conftest.py loads this module as a plugin).

Real parts on 127.0.0.1, each started once per session where it can be shared:
the echo upstream (``echo``), the same behind TLS (``tls``, and ``untrusted_tls_upstream``
whose CA nobody is given), moto's Secrets Manager (``moto_endpoint``), and the real CLI
(``start_sidecar``; ``configured_sidecar`` also writes or seeds the store it reads).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from tests.support.aws import AWS_ENV
from tests.support.process import SidecarProcess
from tests.support.store_faults import put_secret, secrets_manager
from tests.support.tls import TlsEchoUpstream
from tests.support.upstream import EchoUpstream

#: A secret's value as a test stores it: text, or a mapping (stored as JSON, read with ``secret_field``).
SecretValue = str | dict[str, Any]


@pytest.fixture(scope="session")
def _echo_server() -> Iterator[EchoUpstream]:
    server = EchoUpstream()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def echo(_echo_server: EchoUpstream) -> EchoUpstream:
    """A real HTTP upstream on 127.0.0.1 that records what it received."""
    _echo_server.reset()
    return _echo_server


@pytest.fixture(scope="session")
def tls_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsEchoUpstream]:
    """The echo upstream over HTTPS (``localhost`` and 127.0.0.1); a sidecar trusts it only with its ``ca_file``.

    Session-wide, for module-scoped sidecars; a test takes ``tls``, which starts it empty.
    """
    server = TlsEchoUpstream(trustme.CA(), tmp_path_factory.mktemp("tls-upstream"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def tls(tls_upstream: TlsEchoUpstream) -> TlsEchoUpstream:
    """``tls_upstream`` with nothing received yet."""
    tls_upstream.reset()
    return tls_upstream


@pytest.fixture(scope="session")
def untrusted_tls_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsEchoUpstream]:
    """An HTTPS echo upstream whose CA no test hands to a sidecar: verification must fail."""
    server = TlsEchoUpstream(trustme.CA(), tmp_path_factory.mktemp("untrusted-tls-upstream"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's Secrets Manager in server mode on 127.0.0.1."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Fake AWS credentials for moto; returned so subprocesses get them too."""
    for k, v in AWS_ENV.items():
        monkeypatch.setenv(k, v)
    return dict(AWS_ENV)


@pytest.fixture
def start_sidecar(tmp_path: Path) -> Iterator[Callable[..., SidecarProcess]]:
    """Start the real CLI with a config dict; every process is stopped after the test."""
    started: list[SidecarProcess] = []

    def start(config: dict[str, Any], *, env: dict[str, str] | None = None, wait_ready: bool = True) -> SidecarProcess:
        proc = SidecarProcess(config, tmp_path, env=env)
        started.append(proc)
        return proc.start(wait_ready=wait_ready)

    yield start
    for proc in started:
        try:
            proc.stop(timeout=10)
        except Exception:
            proc.kill()


@pytest.fixture
def configured_sidecar(
    request: pytest.FixtureRequest, tmp_path: Path, start_sidecar: Callable[..., SidecarProcess]
) -> Callable[..., SidecarProcess]:
    """Start the real CLI on a store that holds ``secrets`` (secret id -> value), with ``upstreams``.

    ``backend="file"`` writes them to a keys file; ``backend="aws"`` puts them into the
    session's moto server (an existing secret gets the new value) and passes the fake
    AWS credentials. ``store`` adds to the ``secrets`` section (``cache``, ``aws`` options,
    ``prefetch``); other keyword arguments are top-level config sections.
    """

    def configure(
        upstreams: dict[str, Any],
        secrets: dict[str, SecretValue],
        *,
        backend: str = "file",
        store: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        wait_ready: bool = True,
        **config: Any,
    ) -> SidecarProcess:
        section: dict[str, Any]
        if backend == "file":
            keys = tmp_path / "keys.yaml"
            keys.write_text(yaml.safe_dump(secrets), encoding="utf-8")
            section = {"backend": "file", "file": {"path": str(keys)}}
        elif backend == "aws":
            endpoint: str = request.getfixturevalue("moto_endpoint")
            client = secrets_manager(endpoint)
            for name, value in secrets.items():
                put_secret(client, name, SecretString=value if isinstance(value, str) else json.dumps(value))
            section = {"backend": "aws", "aws": {"region": "us-east-1", "endpoint_url": endpoint}}
            env = {**AWS_ENV, **(env or {})}
        else:
            raise ValueError(f"no such test backend: {backend}")
        for key, value in (store or {}).items():
            section[key] = {**section[key], **value} if isinstance(section.get(key), dict) else value
        return start_sidecar({"secrets": section, "upstreams": upstreams, **config}, env=env, wait_ready=wait_ready)

    return configure
