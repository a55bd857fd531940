"""Session-wide fixtures: output capture and the leak check at the end of every run, the echo upstream, moto."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.buildinfo import build, compiled_modules, stale_sources
from tests.support.aws import AWS_ENV
from tests.support.leaks import OUTPUT_DIR, scan
from tests.support.process import SidecarProcess
from tests.support.upstream import EchoUpstream


def pytest_configure(config: pytest.Config) -> None:
    if compiled_modules():
        # mypyc-compiled coroutines (scripts/compile.sh) on Python 3.12+ pass an exception into
        # the awaitable they wait on with throw()'s old three-argument form. Harmless, and only
        # theirs: the pure build keeps every warning an error.
        config.addinivalue_line(
            "filterwarnings", r"ignore:the \(type, exc, tb\) signature of throw\(\) is deprecated:DeprecationWarning"
        )


def pytest_report_header() -> str:
    compiled = compiled_modules()
    return f"sidecar build: {build()}" + (f" ({len(compiled)} modules compiled by mypyc)" if compiled else "")


def pytest_sessionstart(session: pytest.Session) -> None:
    # A compiled module shadows its .py: a source changed since would leave old code running.
    # In a checkout, a build without compile.sh's record cannot be trusted either.
    changed = stale_sources()
    if changed is None or changed:
        what = "there is no record of what they were compiled from" if changed is None else (
            "these sources changed since: " + ", ".join(changed)
        )
        raise pytest.UsageError(
            f"compiled modules are present but {what}. "
            "Run `bash scripts/compile.sh` again, or `bash scripts/compile.sh --clean` for pure Python."
        )
    shutil.rmtree(OUTPUT_DIR, ignore_errors=True)
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    # Every log record of in-process tests lands here too, so the leak check sees it.
    handler = logging.FileHandler(OUTPUT_DIR / "in-process.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s %(args)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    # As in the sidecar itself (access_log.configure_logging): botocore logs request
    # bodies at debug, which for the tests' own seeding calls hold the fixtures' secrets.
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """No secret any test registered appears in any output of this run, whichever tests ran (-k, a path, one test)."""
    leaks = scan()
    if not leaks:
        return
    terminal = session.config.pluginmanager.get_plugin("terminalreporter")
    if terminal is not None:
        terminal.write_line("")  # the progress line may still be open
        terminal.write_sep("=", f"secrets leaked into the test output ({OUTPUT_DIR})", red=True, bold=True)
        for line in leaks:
            terminal.write_line(line)
    if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
