"""The webhook's own config file: YAML in, frozen validated settings out.

Like the sidecar's config, every problem is collected with its field path
(``resources.limits.memory: ...``) so one run lists them all, and an unknown key
is an error.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sidecar.errors import ConfigError
from sidecar.net import HostPort, parse_listen

DEFAULT_LISTEN = "0.0.0.0:8443"
DEFAULT_TLS_CERT = Path("/tls/tls.crt")
DEFAULT_TLS_KEY = Path("/tls/tls.key")
DEFAULT_IMAGE_PULL_POLICY = "IfNotPresent"
PULL_POLICIES = ("Always", "IfNotPresent", "Never")
#: The sidecar chart's defaults (charts/credential-sidecar values.yaml, sidecar.resources).
DEFAULT_RESOURCES: Mapping[str, Mapping[str, str]] = {
    "requests": {"cpu": "50m", "memory": "96Mi"},
    "limits": {"memory": "256Mi"},
}
DEFAULT_SHUTDOWN_GRACE_SECONDS = 5.0
#: A Kubernetes resource.Quantity ("50m", "96Mi", "1.5", "2e3").
QUANTITY_PATTERN = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[numkMGTPE]|[KMGTPE]i)?")
#: A DNS-1123 subdomain: what a ConfigMap or Secret name must be.
OBJECT_NAME_PATTERN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
OBJECT_NAME_MAX = 253
_KEYS = ("listen", "tls_cert", "tls_key", "image", "image_pull_policy", "default_config_map", "resources",
         "shutdown_grace_seconds")


@dataclass(frozen=True)
class WebhookSettings:
    """What the webhook serves on and what it injects."""

    image: str
    listen: HostPort = field(default_factory=lambda: HostPort("0.0.0.0", 8443))
    tls_cert: Path = DEFAULT_TLS_CERT
    tls_key: Path = DEFAULT_TLS_KEY
    image_pull_policy: str = DEFAULT_IMAGE_PULL_POLICY
    #: the ConfigMap of a pod without credential-sidecar.io/config; None: such a pod is denied
    default_config_map: str | None = None
    #: the sidecar container's resources (requests/limits -> resource -> quantity)
    resources: Mapping[str, Mapping[str, str]] = field(default_factory=lambda: DEFAULT_RESOURCES)
    #: after SIGTERM: /readyz answers 503 while reviews are still served this long
    shutdown_grace_seconds: float = DEFAULT_SHUTDOWN_GRACE_SECONDS


def valid_object_name(name: str) -> bool:
    """A name a ConfigMap or Secret may have."""
    return len(name) <= OBJECT_NAME_MAX and OBJECT_NAME_PATTERN.fullmatch(name) is not None


def _resources(value: Any, problems: list[str]) -> dict[str, dict[str, str]]:
    if not isinstance(value, Mapping):
        problems.append("resources: expected a mapping with requests and/or limits")
        return {}
    out: dict[str, dict[str, str]] = {}
    for kind, amounts in value.items():
        if kind not in ("requests", "limits"):
            problems.append(f"resources.{kind}: unknown key (expected requests, limits)")
            continue
        if not isinstance(amounts, Mapping):
            problems.append(f"resources.{kind}: expected a mapping of resource name to quantity")
            continue
        out[kind] = {}
        for name, quantity in amounts.items():
            text = str(quantity) if isinstance(quantity, int | float) and not isinstance(quantity, bool) else quantity
            if not isinstance(text, str) or not QUANTITY_PATTERN.fullmatch(text):
                problems.append(f"resources.{kind}.{name}: expected a Kubernetes quantity such as 50m or 96Mi")
                continue
            out[kind][str(name)] = text
    return out


def parse_webhook_settings(raw: Any) -> WebhookSettings:
    """Validate a parsed YAML document; ConfigError lists every problem with its field path."""
    if not isinstance(raw, Mapping):
        raise ConfigError(["(top level): expected a mapping"])
    problems: list[str] = []
    for key in raw:
        if key not in _KEYS:
            problems.append(f"{key}: unknown key (expected one of {', '.join(_KEYS)})")

    listen = HostPort("0.0.0.0", 8443)
    listen_text = raw.get("listen", DEFAULT_LISTEN)
    parsed = parse_listen(listen_text) if isinstance(listen_text, str) else None
    if parsed is None:
        problems.append("listen: expected host:port, e.g. 0.0.0.0:8443")
    else:
        listen = parsed

    paths: dict[str, Path] = {}
    for key, default in (("tls_cert", DEFAULT_TLS_CERT), ("tls_key", DEFAULT_TLS_KEY)):
        value = raw.get(key, str(default))
        if not isinstance(value, str) or not value:
            problems.append(f"{key}: expected a file path")
            paths[key] = default
        else:
            paths[key] = Path(value)

    image = raw.get("image")
    if image is None:
        problems.append("image: required: the sidecar image to inject, e.g. registry.example.com/credential-sidecar")
        image = ""
    elif not isinstance(image, str) or not image or any(c.isspace() for c in image):
        problems.append("image: expected an image reference without spaces")
        image = ""

    policy = raw.get("image_pull_policy", DEFAULT_IMAGE_PULL_POLICY)
    if policy not in PULL_POLICIES:
        problems.append(f"image_pull_policy: expected one of {', '.join(PULL_POLICIES)}")
        policy = DEFAULT_IMAGE_PULL_POLICY

    default_config_map = raw.get("default_config_map")
    if default_config_map is not None and (
        not isinstance(default_config_map, str) or not valid_object_name(default_config_map)
    ):
        problems.append("default_config_map: expected a ConfigMap name (lower-case DNS subdomain) or null")
        default_config_map = None

    resources = _resources(raw["resources"], problems) if "resources" in raw else DEFAULT_RESOURCES

    grace = raw.get("shutdown_grace_seconds", DEFAULT_SHUTDOWN_GRACE_SECONDS)
    if isinstance(grace, bool) or not isinstance(grace, int | float) or not 0 <= grace <= 300:
        problems.append("shutdown_grace_seconds: expected a number of seconds from 0 to 300")
        grace = DEFAULT_SHUTDOWN_GRACE_SECONDS

    if problems:
        raise ConfigError(problems)
    return WebhookSettings(
        image=image,
        listen=listen,
        tls_cert=paths["tls_cert"],
        tls_key=paths["tls_key"],
        image_pull_policy=policy,
        default_config_map=default_config_map,
        resources=resources,
        shutdown_grace_seconds=float(grace),
    )


def load_webhook_settings(path: str | Path) -> WebhookSettings:
    """Read and validate the webhook's config file; relative TLS paths are taken from the file's folder."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from None
    settings = parse_webhook_settings({} if raw is None else raw)
    base = path.parent
    return WebhookSettings(
        **{
            **settings.__dict__,
            "tls_cert": settings.tls_cert if settings.tls_cert.is_absolute() else base / settings.tls_cert,
            "tls_key": settings.tls_key if settings.tls_key.is_absolute() else base / settings.tls_key,
        }
    )
