"""The container image: the Dockerfile read with Docker's own parser, and its build reproduced.

No Docker engine is needed: the builder stage's steps are replayed into a fresh
venv under tmp_path (the image's /opt/venv), and the installed entrypoint is
started against the compose example's config, probed with the image's own
HEALTHCHECK command and stopped with SIGTERM.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import dockerfile
import pytest

from tests.support.upstream import free_ports

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
FININFO_DOCKERFILE = ROOT / "examples" / "compose" / "fininfo.Dockerfile"
EXAMPLE_CONFIG = ROOT / "examples" / "compose" / "sidecar.yaml"
VENV = "/opt/venv"


Stage = list[dockerfile.Command]


def stages(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults, and the instructions of each stage (FROM first)."""
    global_args: dict[str, str] = {}
    out: list[Stage] = []
    for command in dockerfile.parse_file(str(path)):
        if command.cmd == "FROM":
            out.append([command])
        elif out:
            out[-1].append(command)
        elif command.cmd == "ARG":
            name, _, default = command.value[0].partition("=")
            global_args[name] = default
    return global_args, out


def base_image(stage: Stage, global_args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], stage[0].value[0])


def instructions(stage: Stage, cmd: str) -> list[dockerfile.Command]:
    return [c for c in stage if c.cmd == cmd]


def env_of(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for command in instructions(stage, "ENV"):
        pairs = command.value
        for name, value in zip(pairs[::2], pairs[1::2], strict=True):
            env[name] = value.strip('"')
    return env


@pytest.fixture(scope="module")
def parsed() -> tuple[dict[str, str], list[Stage]]:
    return stages(DOCKERFILE)


# --------------------------------------------------------------------------- what the Dockerfile says


def test_two_stages_on_an_official_slim_python(parsed: tuple[dict[str, str], list[Stage]]) -> None:
    global_args, (builder, final) = parsed
    assert builder[0].value[1:] == ("AS", "builder")
    for stage in (builder, final):
        # Docker Hub's official image: no registry or user prefix, a slim 3.11/3.12 tag.
        assert re.fullmatch(r"python:3\.1[12]-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base_image(stage, global_args))


def test_dependencies_are_installed_in_the_builder_venv(parsed: tuple[dict[str, str], list[Stage]]) -> None:
    _, (builder, _) = parsed
    runs = [c.value[0] for c in instructions(builder, "RUN")]
    # The builder alone gets a C compiler (for mypyc), and no apt lists are kept.
    assert runs[0].startswith("apt-get update") and "gcc" in runs[0] and "rm -rf /var/lib/apt/lists" in runs[0]
    assert runs[1] == f"python -m venv {VENV}"
    assert env_of(builder)["PATH"].startswith(f"{VENV}/bin:")
    installs = [r for r in runs if re.search(r"\bpip install\b", r)]
    assert len(installs) == 1
    # A regular install of this project (boto3 comes with it) plus uvloop and OpenTelemetry: never editable.
    assert '".[fast,tracing]"' in installs[0]
    assert "-e" not in shlex.split(installs[0])
    # Compiled by default, and the build fails when it was asked to compile and did not.
    assert [c.value[0] for c in instructions(builder, "ARG")] == ["SIDECAR_COMPILE=1"]
    assert installs[0].startswith("SIDECAR_COMPILE=${SIDECAR_COMPILE} pip install")
    assert "build() != 'compiled'" in installs[0]


def test_final_stage_gets_only_the_venv(parsed: tuple[dict[str, str], list[Stage]]) -> None:
    _, (_, final) = parsed
    copies = instructions(final, "COPY") + instructions(final, "ADD")
    assert [(c.cmd, c.flags, c.value) for c in copies] == [("COPY", ("--from=builder",), (VENV, VENV))]
    # Nothing is installed in the final stage: its one RUN creates the user.
    for run in instructions(final, "RUN"):
        assert not re.search(r"\b(pip|apt-get|apk|curl|wget)\b", run.value[0])
    assert env_of(final)["PATH"].startswith(f"{VENV}/bin:")


def test_runs_as_a_numeric_non_root_user(parsed: tuple[dict[str, str], list[Stage]]) -> None:
    _, (_, final) = parsed
    (user,) = instructions(final, "USER")
    match = re.fullmatch(r"(\d+)(?::(\d+))?", user.value[0])
    assert match, "USER must be numeric so Kubernetes can verify runAsNonRoot"
    assert int(match.group(1)) != 0 and int(match.group(2) or 1) != 0
    # The chart's securityContext runs the sidecar as the same UID.
    values = (ROOT / "charts" / "credential-sidecar" / "values.yaml").read_text()
    assert f"runAsUser: {match.group(1)}" in values


def test_entrypoint_ports_and_config(parsed: tuple[dict[str, str], list[Stage]]) -> None:
    _, (_, final) = parsed
    (entrypoint,) = instructions(final, "ENTRYPOINT")
    assert entrypoint.json and entrypoint.value == ("credential-sidecar", "run")
    assert instructions(final, "CMD") == []
    (expose,) = instructions(final, "EXPOSE")
    assert set(expose.value) == {"8080", "9901"}
    assert env_of(final)["SIDECAR_CONFIG"] == "/etc/credential-sidecar/config.yaml"


def test_oci_labels(parsed: tuple[dict[str, str], list[Stage]]) -> None:
    _, (_, final) = parsed
    labels: dict[str, str] = {}
    for command in instructions(final, "LABEL"):
        labels.update(zip(command.value[::2], (v.strip('"') for v in command.value[1::2]), strict=True))
    for key in ("title", "description", "version", "revision", "licenses", "base.name"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert labels["org.opencontainers.image.title"] == "mcp-credential-sidecar"


def test_healthcheck_needs_no_shell_tools(parsed: tuple[dict[str, str], list[Stage]]) -> None:
    _, (_, final) = parsed
    (health,) = instructions(final, "HEALTHCHECK")
    assert health.json, "exec form: no shell needed"
    assert health.value[:3] == ("CMD", "python", "-c")
    assert "urllib" in health.value[3] and "http://127.0.0.1:9901/healthz" in health.value[3]
    assert {f.split("=")[0] for f in health.flags} >= {"--interval", "--timeout", "--retries"}
    instructions_text = "\n".join(c.original for c in dockerfile.parse_file(str(DOCKERFILE)))
    assert not re.search(r"\b(curl|wget)\b", instructions_text)


def test_dockerignore_admits_only_what_the_builder_copies(parsed: tuple[dict[str, str], list[Stage]]) -> None:
    _, (builder, _) = parsed
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and line[0] != "#"
    ]
    assert patterns[0] == "*", "an allowlist: everything is excluded first"
    admitted = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for copy in instructions(builder, "COPY"):
        for source in copy.value[:-1]:
            assert source in admitted, f"{source} is copied but excluded by .dockerignore"
            assert (ROOT / source).exists(), f"{source} is copied but missing from the repository"


def test_fininfo_image_is_built_the_same_way() -> None:
    global_args, (builder, final) = stages(FININFO_DOCKERFILE)
    for stage in (builder, final):
        assert re.fullmatch(r"python:3\.1[12]-slim(-\w+)?", base_image(stage, global_args))
    assert instructions(builder, "RUN")[0].value[0] == f"python -m venv {VENV}"
    copies = [(c.flags, c.value) for c in instructions(final, "COPY")]
    assert copies == [(("--from=builder",), (VENV, VENV)), ((), ("server.py", "/app/server.py"))]
    (user,) = instructions(final, "USER")
    assert re.fullmatch(r"[1-9]\d*:[1-9]\d*", user.value[0])
    # Built from examples/fininfo, the compose build context.
    assert (ROOT / "examples" / "fininfo" / "server.py").exists()


# --------------------------------------------------------------------------- the build, replayed




def _dockerignore_anywhere() -> list[str]:
    """.dockerignore's "**/name" exclusions (bytecode, in-place compiled modules), as copytree patterns."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip()[3:] for line in lines if line.strip().startswith("**/")]


def _can_compile_extensions() -> bool:
    include = Path(sysconfig.get_paths()["include"])
    return shutil.which("gcc") is not None and (include / "Python.h").exists()


#: The tests that use image_venv may be the one that builds it: pip and mypyc on a busy
#: 2-core machine take several minutes, beyond the suite's 120 s default (the builder's own
#: steps are bounded at 300 s each below).
IMAGE_BUILD_TIMEOUT = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Replay the builder stage: COPY into WORKDIR, then each RUN with /opt/venv relocated.

    The deviations: PIP_NO_CACHE_DIR is dropped so pip reuses its wheel cache (the
    image keeps no cache), and the apt-get step is replaced by a check that this
    machine can compile. Most of the minute this takes is mypyc compiling.
    """
    _, (builder, _) = stages(DOCKERFILE)
    root = tmp_path_factory.mktemp("image")
    venv = root / "opt" / "venv"
    workdir = root  # Docker's default WORKDIR is /
    # "python" before the venv exists is the base image's interpreter: ours here.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_NO_CACHE", "VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    for command in builder[1:]:
        if command.cmd == "ENV":
            for name, value in env_of([command]).items():
                if name == "PIP_NO_CACHE_DIR":
                    continue
                env[name] = value.replace(VENV, str(venv)).replace("${PATH}", env["PATH"])
        elif command.cmd == "WORKDIR":
            workdir = root / command.value[0].lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif command.cmd == "COPY":
            *sources, dest = command.value
            target = workdir / dest
            for source in sources:
                src = ROOT / source
                if src.is_dir():
                    shutil.copytree(src, target, ignore=shutil.ignore_patterns(*_dockerignore_anywhere()))
                elif dest.endswith("/"):
                    target.mkdir(parents=True, exist_ok=True)  # as Docker does
                    shutil.copy2(src, target / src.name)
                else:
                    shutil.copy2(src, target)
        elif command.cmd == "ARG":
            name, _, default = command.value[0].partition("=")
            env[name] = default  # an ARG is in the environment of the RUNs after it
        elif command.cmd == "RUN" and command.value[0].startswith("apt-get "):
            # Not replayed (it would install into this machine as root). What it is for, a C
            # compiler for mypyc, must be here instead (.ci/run installs it; Debian: gcc python3-dev).
            if not _can_compile_extensions():
                pytest.skip("no C compiler or Python headers here: the builder's compile step cannot be replayed")
        elif command.cmd == "RUN":
            script = command.value[0].replace(VENV, str(venv))
            result = subprocess.run(
                ["sh", "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=300, check=False
            )
            assert result.returncode == 0, f"RUN {script}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
        else:
            pytest.fail(f"the replay does not know {command.cmd}; teach it before adding it to the builder")
    # The source tree is not part of the final image: remove it, so nothing can import from it.
    if workdir != root:
        shutil.rmtree(workdir)
    return venv


@IMAGE_BUILD_TIMEOUT
def test_the_installed_package_lives_in_the_venv(image_venv: Path, tmp_path: Path) -> None:
    # Compiled at install (checked before anything imports it): the image's root
    # filesystem is read-only at run time.
    assert list(image_venv.glob("lib/python3*/site-packages/sidecar/__pycache__/config.*.pyc"))
    python = image_venv / "bin" / "python"
    result = subprocess.run(
        [str(python), "-c", "import sidecar, sidecar.listen.fast as f; from sidecar.buildinfo import build; "
         "print(sidecar.__file__, build(), f.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    init, build, fastserver = result.stdout.split()
    package = Path(init).parent
    assert package.is_relative_to(image_venv)
    # The request path runs compiled (mypyc): fastserver imports from its C extension.
    assert build == "compiled"
    assert fastserver.endswith(".so") and Path(fastserver).is_relative_to(package)
    # pip is removed from the final venv; the console script is there.
    assert not (image_venv / "bin" / "pip").exists()
    assert (image_venv / "bin" / "credential-sidecar").exists()


@IMAGE_BUILD_TIMEOUT
def test_the_entrypoint_checks_the_example_config(image_venv: Path, parsed: tuple[dict[str, str], list[Stage]]) -> None:
    _, (_, final) = parsed
    (entrypoint,) = instructions(final, "ENTRYPOINT")
    program, subcommand = entrypoint.value
    assert subcommand == "run"
    result = subprocess.run(
        [str(image_venv / "bin" / program), "check", "--config", str(EXAMPLE_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "polygon" in result.stdout


@IMAGE_BUILD_TIMEOUT
def test_the_entrypoint_runs_and_passes_its_healthcheck(
    image_venv: Path, parsed: tuple[dict[str, str], list[Stage]], tmp_path: Path
) -> None:
    _, (_, final) = parsed
    (entrypoint,) = instructions(final, "ENTRYPOINT")
    (health,) = instructions(final, "HEALTHCHECK")
    proxy_port, admin_port = free_ports(2)
    # The example config on free ports, with its keys directory beside it as in the container.
    config = tmp_path / "config.yaml"
    config.write_text(
        EXAMPLE_CONFIG.read_text()
        .replace("127.0.0.1:8080", f"127.0.0.1:{proxy_port}")
        .replace("127.0.0.1:9901", f"127.0.0.1:{admin_port}")
    )
    shutil.copytree(EXAMPLE_CONFIG.parent / "keys", tmp_path / "keys")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "PYTHON"))}
    env.update(env_of(final))
    env["PATH"] = f"{image_venv / 'bin'}:{os.environ.get('PATH', '')}"
    env["SIDECAR_CONFIG"] = str(config)  # the image's default path, relocated
    program = str(image_venv / "bin" / entrypoint.value[0])
    process = subprocess.Popen(
        [program, *entrypoint.value[1:]], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        probe = [str(image_venv / "bin" / "python"), *health.value[2:]]
        probe[-1] = probe[-1].replace(":9901/", f":{admin_port}/")
        deadline = time.monotonic() + 20
        while True:
            assert process.poll() is None, f"the sidecar exited: {process.communicate()[0]}"
            if subprocess.run(probe, env=env, capture_output=True, timeout=10, check=False).returncode == 0:
                break
            assert time.monotonic() < deadline, "HEALTHCHECK never passed"
            time.sleep(0.2)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            output, _ = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
    assert process.returncode == 0, output
