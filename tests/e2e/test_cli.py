"""``credential-sidecar check`` and ``run`` as a user calls them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import Any

import pytest
import yaml

import sidecar
from sidecar import buildinfo
from sidecar.listen import fast as lean_server
from tests.support.leaks import make_secret
from tests.support.process import SidecarProcess
from tests.support.upstream import closed_port


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def write(path: Path, data: object) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


def good_settings(tmp_path: Path) -> dict[str, Any]:
    """A valid config (its keys file written beside it) as the dict start_sidecar takes."""
    write(tmp_path / "keys.yaml", {"alice": make_secret("cli")})
    return {
        "secrets": {"backend": "file", "file": {"path": "keys.yaml"}},
        "upstreams": {
            "polygon": {
                "url": "https://api.polygon.io",
                "secret": "{client_id}",
                "inject": {"query": "apiKey"},
            }
        },
    }


def good_config(tmp_path: Path) -> Path:
    return write(tmp_path / "sidecar.yaml", good_settings(tmp_path))


def test_check_prints_summary_and_exits_0(tmp_path: Path) -> None:
    result = cli("check", "--config", str(good_config(tmp_path)))
    assert result.returncode == 0, result.stderr
    assert "polygon" in result.stdout and "https://api.polygon.io" in result.stdout
    assert "query apiKey" in result.stdout
    assert "config OK" in result.stdout
    assert "sk-cli-" not in result.stdout


def test_check_refuses_a_generated_interception_ca_nobody_can_trust(tmp_path: Path) -> None:
    settings = good_settings(tmp_path) | {"forward_proxy": {"mitm": {"enabled": True}}}
    result = cli("check", "--config", str(write(tmp_path / "mitm.yaml", settings)))
    assert result.returncode == 2
    assert "forward_proxy.mitm.ca_cert_out: is required when the CA is generated" in result.stderr
    settings["forward_proxy"]["mitm"]["ca_cert_out"] = str(tmp_path / "ca" / "ca.pem")
    result = cli("check", "--config", str(write(tmp_path / "mitm.yaml", settings)))
    assert result.returncode == 0, result.stderr


def test_check_uses_sidecar_config_env(tmp_path: Path) -> None:
    result = cli("check", env={"SIDECAR_CONFIG": str(good_config(tmp_path))})
    assert result.returncode == 0, result.stderr


def test_check_lists_every_problem_with_its_path(tmp_path: Path) -> None:
    config = write(
        tmp_path / "bad.yaml",
        {
            "listen": "nope",
            "lgo": {},
            "secrets": {"backend": "hashicorp"},
            "upstreams": {
                "polygon": {"url": "ftp://x", "secret": "{client}", "inject": {"cookie": "k"}},
                "ok": {"url": "https://a.example", "secret": "{client_id}", "inject": {"query": "k"}, "timeout_seconds": -1},
            },
        },
    )
    result = cli("check", "--config", str(config))
    assert result.returncode == 2
    err = result.stderr
    for expected in (
        "listen: expected host:port",
        "lgo: unknown key (did you mean log?)",
        "secrets.backend: expected one of file, aws, vault",
        "upstreams.polygon.url: expected an http:// or https:// URL",
        "upstreams.polygon.secret: unknown placeholder {client}",
        "upstreams.polygon.inject.cookie: unknown key",
        "upstreams.polygon.inject: expected one of query, header",
        "upstreams.ok.timeout_seconds: must be greater than 0",
    ):
        assert expected in err, f"{expected!r} not in:\n{err}"


def test_env_interpolation(tmp_path: Path) -> None:
    write(tmp_path / "keys.yaml", {"a": make_secret("env")})
    config = write(
        tmp_path / "c.yaml",
        "listen: ${LISTEN_ADDR:-127.0.0.1:18080}\n"
        "shutdown_grace_seconds: ${GRACE}\n"
        "secrets: {file: {path: keys.yaml}}\n"
        "upstreams:\n  p: {url: '${API_URL}', secret: '{client_id}', inject: {query: k}}\n",
    )
    result = cli("check", "--config", str(config), env={"GRACE": "7", "API_URL": "https://api.example.com"})
    assert result.returncode == 0, result.stderr
    assert "127.0.0.1:18080" in result.stdout and "https://api.example.com" in result.stdout
    result = cli("check", "--config", str(config), env={"GRACE": "x"})
    assert result.returncode == 2
    assert "shutdown_grace_seconds: expected a number" in result.stderr
    assert "upstreams.p.url: environment variable API_URL is not set" in result.stderr


def test_missing_config_and_bad_yaml(tmp_path: Path) -> None:
    result = cli("check", env={"SIDECAR_CONFIG": ""})
    assert result.returncode == 2 and "no config file" in result.stderr
    bad = write(tmp_path / "bad.yaml", "upstreams: [\n")
    result = cli("check", "--config", str(bad))
    assert result.returncode == 2 and "line" in result.stderr


def test_run_with_invalid_config_exits_2_before_binding(tmp_path: Path) -> None:
    port = closed_port()
    config = write(tmp_path / "c.yaml", {"listen": f"127.0.0.1:{port}", "upstreams": {"x": {"url": "nope"}}})
    result = cli("run", "--config", str(config))
    assert result.returncode == 2
    assert "upstreams.x.url" in result.stderr
    # Nothing was bound: the port is still free.
    s = socket.socket()
    s.bind(("127.0.0.1", port))
    s.close()


def test_run_with_unreadable_keys_file_fails_clearly(tmp_path: Path) -> None:
    config = good_config(tmp_path)
    (tmp_path / "keys.yaml").write_text("- just\n- a list\n", encoding="utf-8")
    result = cli("run", "--config", str(config))
    assert result.returncode == 1
    assert "must hold a mapping" in result.stdout


def test_python_m_and_console_script_agree(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("credential-sidecar")
    result = subprocess.run(
        [str(exe), "check", "--config", str(good_config(tmp_path))], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


def test_version_and_the_listening_line_name_the_build_that_runs(
    tmp_path: Path, start_sidecar: Callable[..., SidecarProcess]
) -> None:
    # What really runs: the data plane imports from C extensions (compiled) or from .py files.
    expected = "compiled" if str(lean_server.__file__).endswith(tuple(EXTENSION_SUFFIXES)) else "python"
    assert buildinfo.build() == expected
    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"credential-sidecar {sidecar.__version__} ({expected})"
    proc = start_sidecar(good_settings(tmp_path), wait_ready=False)
    (listening,) = [line for line in proc.lines() if line.get("message") == "listening"]
    assert listening["build"] == expected


def test_the_record_of_compiled_sources_names_what_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(buildinfo, "MANIFEST", tmp_path / "record.json")
    assert buildinfo.changed_since_compiled() is None  # no record: an installed package, never "stale"
    buildinfo.record()
    assert buildinfo.changed_since_compiled() == []
    recorded = json.loads((tmp_path / "record.json").read_text())
    recorded["proxy.py"] = "0" * 64  # as if proxy.py was edited after compiling
    recorded["gone.py"] = "0" * 64  # ... and gone.py deleted
    del recorded["config.py"]  # ... and config.py added
    (tmp_path / "record.json").write_text(json.dumps(recorded))
    assert buildinfo.changed_since_compiled() == ["config.py", "gone.py", "proxy.py"]
    # Stale only matters when compiled modules run: a pure build never runs old code.
    monkeypatch.setattr(buildinfo, "compiled_modules", lambda: ("sidecar.pipeline",))
    assert buildinfo.stale_sources() == ["config.py", "gone.py", "proxy.py"]
    monkeypatch.setattr(buildinfo, "compiled_modules", lambda: ())
    assert buildinfo.stale_sources() == []


@pytest.mark.skipif(not buildinfo.compiled_modules(), reason="only a compiled build can be stale")
def test_a_stale_compiled_build_is_named_at_startup(
    tmp_path: Path, start_sidecar: Callable[..., SidecarProcess]
) -> None:
    saved = buildinfo.MANIFEST.read_bytes()
    try:
        recorded = json.loads(saved)
        recorded["proxy.py"] = "0" * 64
        buildinfo.MANIFEST.write_text(json.dumps(recorded))
        proc = start_sidecar(good_settings(tmp_path), wait_ready=False)
    finally:
        buildinfo.MANIFEST.write_bytes(saved)
    (warning,) = [line for line in proc.lines() if line.get("message", "").startswith("compiled modules are older")]
    assert warning["level"] == "warning" and warning["changed"] == ["proxy.py"]


def test_run_lifts_the_open_files_limit_to_the_hard_limit(
    tmp_path: Path, start_sidecar: Callable[..., SidecarProcess]
) -> None:
    """Container runtimes often start processes with a soft limit of 1024 open files. Each app
    connection and each pooled upstream connection holds one, so the sidecar raises it."""
    import resource

    from sidecar.app import open_files_target

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip("the hard limit leaves nothing to lift")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # inherited by the sidecar
    try:
        proc = start_sidecar(good_settings(tmp_path))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert proc.proc is not None
    limits = Path(f"/proc/{proc.proc.pid}/limits").read_text()
    (line,) = [row for row in limits.splitlines() if row.startswith("Max open files")]
    lifted = int(line.split()[3])
    assert lifted > 256 and lifted == open_files_target(256, hard)


def test_the_open_files_limit_is_only_ever_raised() -> None:
    import resource

    from sidecar.app import open_files_target

    unlimited = resource.RLIM_INFINITY
    assert open_files_target(1024, 65536) == 65536
    assert open_files_target(1024, unlimited) == 1 << 20  # the kernel refuses an unlimited soft limit
    assert open_files_target(65536, 65536) is None
    # Both unlimited: the old code set the soft limit to 2**20, lowering it.
    assert open_files_target(unlimited, unlimited) is None
    assert open_files_target(1 << 21, unlimited) is None  # already above what it would set
