"""The docker compose examples: fininfo beside the sidecar, file backend, AWS and Vault variants.

No Docker here, so the files are parsed and their arrangement asserted: the
sidecar runs the image's entrypoint with the mounted config, the keys and
config are mounted read-only into the sidecar only, and fininfo shares the
sidecar's network namespace. The mounts are then laid out under tmp_path and
the real ``credential-sidecar check`` reads the config as the container would.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import dockerfile
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
COMPOSE_FILES = {
    "file": EXAMPLES / "docker-compose.yml",
    "aws": EXAMPLES / "docker-compose.aws.yml",
    "vault": EXAMPLES / "docker-compose.vault.yml",
}
#: Services a variant runs besides the sidecar and fininfo (its store, for trying it out).
STORE_SERVICES = {"vault": {"openbao", "openbao-seed"}}
CONFIG_TARGET = "/etc/credential-sidecar/config.yaml"


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose's ${NAME} / ${NAME:-default}, with an empty environment unless given."""
    env = env or {}
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: env.get(m.group(1)) or m.group(2) or "", value)


def load(kind: str) -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILES[kind].read_text())


def image_command(path: Path, cmd: str) -> tuple[str, ...]:
    (found,) = [c for c in dockerfile.parse_file(str(path)) if c.cmd == cmd]
    assert found.json
    return found.value


@pytest.fixture(params=sorted(COMPOSE_FILES))
def compose(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    return request.param, load(request.param)


def test_two_services_built_from_the_repository(compose: tuple[str, dict[str, Any]]) -> None:
    kind, doc = compose
    services = doc["services"]
    assert set(services) == {"sidecar", "fininfo"} | STORE_SERVICES.get(kind, set())
    sidecar, fininfo = services["sidecar"], services["fininfo"]
    assert sidecar["image"] == "mcp-credential-sidecar:local"
    assert (EXAMPLES / sidecar["build"]["context"] / sidecar["build"]["dockerfile"]).resolve() == ROOT / "Dockerfile"
    context = EXAMPLES / fininfo["build"]["context"]
    assert context.resolve() == EXAMPLES / "fininfo"
    assert (context / fininfo["build"]["dockerfile"]).resolve() == EXAMPLES / "compose" / "fininfo.Dockerfile"


def test_sidecar_runs_the_image_entrypoint_with_the_mounted_config(compose: tuple[str, dict[str, Any]]) -> None:
    _, doc = compose
    sidecar = doc["services"]["sidecar"]
    assert "entrypoint" not in sidecar
    full = [*image_command(ROOT / "Dockerfile", "ENTRYPOINT"), *sidecar["command"]]
    assert full == ["credential-sidecar", "run", "--config", CONFIG_TARGET]
    (config_mount,) = [v for v in sidecar["volumes"] if v["target"] == CONFIG_TARGET]
    assert config_mount["type"] == "bind" and config_mount["read_only"] is True
    assert (EXAMPLES / config_mount["source"]).is_file()


def test_every_mount_is_read_only_and_only_the_sidecar_has_any(compose: tuple[str, dict[str, Any]]) -> None:
    _, doc = compose
    sidecar, fininfo = doc["services"]["sidecar"], doc["services"]["fininfo"]
    for volume in sidecar["volumes"]:
        assert isinstance(volume, dict), "long syntax, so read_only is explicit"
        assert volume["type"] == "bind" and volume["read_only"] is True, volume
    assert "volumes" not in fininfo
    assert doc.get("volumes") is None


def test_file_backend_keys_are_mounted_read_only_where_the_config_looks() -> None:
    sidecar = load("file")["services"]["sidecar"]
    config_source = EXAMPLES / next(v["source"] for v in sidecar["volumes"] if v["target"] == CONFIG_TARGET)
    config = yaml.safe_load(config_source.read_text())
    assert config["secrets"]["backend"] == "file"
    keys_path = Path(CONFIG_TARGET).parent / config["secrets"]["file"]["path"]
    (keys_mount,) = [v for v in sidecar["volumes"] if keys_path.is_relative_to(v["target"]) and v["target"] != "/"]
    assert keys_mount["read_only"] is True
    # A directory mount, overridable from the shell, defaulting to the placeholder keys.
    assert "${SIDECAR_KEYS_DIR" in keys_mount["source"]
    default_dir = EXAMPLES / interpolate(keys_mount["source"])
    assert (default_dir / keys_path.relative_to(keys_mount["target"])).is_file()


def test_aws_variant_gives_credentials_to_the_sidecar_only() -> None:
    services = load("aws")["services"]
    sidecar, fininfo = services["sidecar"], services["fininfo"]
    env = {e.partition("=")[0]: e.partition("=")[2] for e in sidecar["environment"]}
    assert {"AWS_REGION", "AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= env.keys()
    aws_dir = Path(env["AWS_CONFIG_FILE"]).parent
    assert Path(env["AWS_SHARED_CREDENTIALS_FILE"]).parent == aws_dir
    (aws_mount,) = [v for v in sidecar["volumes"] if Path(v["target"]) == aws_dir]
    assert aws_mount["read_only"] is True
    assert not [name for name in fininfo.get("environment", {}) if name.startswith("AWS_")]
    config_source = EXAMPLES / next(v["source"] for v in sidecar["volumes"] if v["target"] == CONFIG_TARGET)
    assert yaml.safe_load(config_source.read_text())["secrets"]["backend"] == "aws"


def test_fininfo_shares_the_sidecar_network_namespace(compose: tuple[str, dict[str, Any]]) -> None:
    _, doc = compose
    sidecar, fininfo = doc["services"]["sidecar"], doc["services"]["fininfo"]
    assert fininfo["network_mode"] == "service:sidecar"
    assert not {"ports", "networks", "expose"} & fininfo.keys()
    assert fininfo["depends_on"] == {"sidecar": {"condition": "service_healthy"}}
    # Only fininfo's MCP port is published, on the host's loopback; never 8080 or 9901.
    fininfo_cmd = image_command(EXAMPLES / "compose" / "fininfo.Dockerfile", "CMD")
    fininfo_port = fininfo_cmd[fininfo_cmd.index("--port") + 1]
    assert fininfo_cmd[fininfo_cmd.index("--host") + 1] == "0.0.0.0"
    assert sidecar["ports"] == [f"127.0.0.1:{fininfo_port}:{fininfo_port}"]

    config_source = EXAMPLES / next(v["source"] for v in sidecar["volumes"] if v["target"] == CONFIG_TARGET)
    config = yaml.safe_load(config_source.read_text())
    # Both listeners on loopback of the shared namespace: the app reaches the data
    # plane there, and the image's HEALTHCHECK asks the admin listener there.
    assert config["listen"] == "127.0.0.1:8080"
    assert config["admin_listen"] == "127.0.0.1:9901"
    health = image_command(ROOT / "Dockerfile", "HEALTHCHECK")
    assert f"http://{config['admin_listen']}/healthz" in health[-1]
    assert fininfo["environment"]["POLYGON_BASE_URL"] == f"http://{config['listen']}/polygon"
    assert "polygon" in config["upstreams"]


def test_both_containers_are_hardened(compose: tuple[str, dict[str, Any]]) -> None:
    _, doc = compose
    for name, service in doc["services"].items():
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        uid, _, gid = service["user"].partition(":")
        assert int(uid) > 0 and int(gid) > 0, name
        assert "privileged" not in service


@pytest.mark.parametrize("kind", sorted(COMPOSE_FILES))
def test_the_sidecar_accepts_the_config_as_mounted(kind: str, tmp_path: Path) -> None:
    beside_python = Path(sys.executable).parent / "credential-sidecar"
    executable = str(beside_python) if beside_python.exists() else shutil.which("credential-sidecar")
    if executable is None:
        pytest.skip("the credential-sidecar console script is not installed beside this Python or on PATH")
    sidecar = load(kind)["services"]["sidecar"]
    # Lay the bind mounts out as the container sees them, under tmp_path.
    for volume in sidecar["volumes"]:
        source = Path(os.path.expanduser(interpolate(volume["source"])))
        source = source if source.is_absolute() else EXAMPLES / source
        target = tmp_path / volume["target"].lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        elif source.is_file():
            shutil.copy(source, target)
        else:
            target.mkdir()  # e.g. no ~/.aws on this machine: docker would create it empty
    args = [interpolate(a) for a in sidecar["command"]]
    args[args.index("--config") + 1] = str(tmp_path / CONFIG_TARGET.lstrip("/"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SIDECAR_", "VAULT_"))}
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    for entry in sidecar.get("environment", []):  # what compose sets in the container (VAULT_ADDR, ...)
        name, equals, value = entry.partition("=")
        if equals:
            env[name] = interpolate(value)
    result = subprocess.run(
        [executable, "check", *args], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_vault_variant_gives_a_token_to_the_sidecar_only_and_seeds_the_path_it_reads() -> None:
    services = load("vault")["services"]
    sidecar, fininfo, openbao, seed = (services[n] for n in ("sidecar", "fininfo", "openbao", "openbao-seed"))
    env = {e.partition("=")[0]: interpolate(e.partition("=")[2]) for e in sidecar["environment"]}
    assert env["VAULT_ADDR"] == "http://openbao:8200"
    # One dev token: the server's root token is what the sidecar logs in with.
    root = next(a for a in openbao["command"] if a.startswith("-dev-root-token-id="))
    assert env["VAULT_TOKEN"] == interpolate(root.partition("=")[2]) == interpolate(seed["environment"]["BAO_TOKEN"])
    assert not [name for name in fininfo.get("environment", {}) if name.startswith(("VAULT_", "BAO_"))]
    assert "ports" not in openbao  # reachable on the compose network only
    assert sidecar["depends_on"] == {"openbao-seed": {"condition": "service_completed_successfully"}}
    config_source = EXAMPLES / next(v["source"] for v in sidecar["volumes"] if v["target"] == CONFIG_TARGET)
    config = yaml.safe_load(config_source.read_text())
    assert config["secrets"]["backend"] == "vault"
    # The seed writes the path the polygon template reads for the client "demo", under the KV mount.
    written = seed["command"][seed["command"].index("put") + 1]
    mount = config["secrets"]["vault"]["mount"]
    assert written == f"{mount}/" + config["upstreams"]["polygon"]["secret"].format(client_id="demo")
