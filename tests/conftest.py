"""Session hooks: the build check, output capture and the leak check at the end of every run.

The shared fixtures (echo and TLS upstreams, moto, the real CLI) are in tests/support/fixtures.py.
"""

from __future__ import annotations

import logging
import shutil

import pytest

from sidecar.buildinfo import build, compiled_modules, stale_sources
from tests.support.leaks import OUTPUT_DIR, scan

pytest_plugins = ["tests.support.fixtures", "tests.support.openbao", "tests.support.oauth_server"]


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
