"""The leak check at the end of every run (tests/conftest.py, tests/support/leaks.py) fails a run that leaks.

Each case runs a mini-suite in its own pytest process with the suite's real
session hooks and its own output folder (SIDECAR_TEST_OUTPUT), so what it
registers and writes never reaches this run's own check.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]

CONFTEST = """
from tests.conftest import pytest_sessionfinish, pytest_sessionstart  # the suite's own hooks
"""

TESTS = """
import logging
from urllib.parse import quote

from tests.support.leaks import make_secret, output_file, register_secret


def test_clean():
    secret = make_secret("clean")
    output_file("clean.log").write_text("the key stayed where it belongs\\n")
    logging.getLogger("mini").warning("a key was used, and not shown")


def test_leak_to_a_file():
    path = output_file("sub/app.log")  # a folder inside the output folder is scanned too
    path.parent.mkdir()
    path.write_text("key=" + make_secret("file") + "\\n")


def test_leak_url_encoded():
    secret = register_secret("sk-with/slash+plus=")
    output_file("url.log").write_text("GET /q?key=" + quote(secret, safe="") + "\\n")


def test_leak_to_the_log():
    logging.getLogger("mini").warning("the key is %s", make_secret("log"))


def test_fails():
    assert False
"""


@pytest.fixture
def mini(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")  # not an ini of a folder above
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_mini=TESTS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("SIDECAR_TEST_OUTPUT", str(pytester.path / "output"))
    return pytester


def run(mini: pytest.Pytester, test: str) -> pytest.RunResult:
    return mini.runpytest_subprocess("-p", "no:cacheprovider", "-k", test)


def test_a_clean_run_passes(mini: pytest.Pytester) -> None:
    result = run(mini, "test_clean")
    result.assert_outcomes(passed=1, deselected=4)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.no_fnmatch_line("*secrets leaked*")


def test_a_leak_fails_the_run_whichever_tests_ran(mini: pytest.Pytester) -> None:
    result = run(mini, "test_leak_to_a_file")
    result.assert_outcomes(passed=1, deselected=4)  # the test itself passed: the session's check fails the run
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*secrets leaked into the test output*", "sub/app.log: contains a secret (sk-fil...)"])


def test_a_secret_is_found_url_encoded_and_in_the_log_of_in_process_tests(mini: pytest.Pytester) -> None:
    result = run(mini, "test_leak_url_encoded or test_leak_to_the_log")
    result.assert_outcomes(passed=2, deselected=3)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "*secrets leaked into the test output*",
            "in-process.log: contains a secret (sk-log...)",
            "url.log: contains a secret (sk-wit...)",
        ]
    )


def test_a_failed_run_with_a_leak_stays_failed_and_says_both(mini: pytest.Pytester) -> None:
    result = run(mini, "test_fails or test_leak_to_a_file")
    result.assert_outcomes(passed=1, failed=1, deselected=3)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*secrets leaked into the test output*", "sub/app.log: contains a secret*"])
