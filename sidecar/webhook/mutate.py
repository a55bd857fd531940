"""Pure admission logic: an AdmissionReview (parsed JSON) in, the answer out.

No I/O here, so every pod shape is a table entry in tests/e2e/test_webhook.py. The
answer is an ``Outcome``: the HTTP status, the body to send and the one log
line's fields. The rules (docs/deployment.md, "Automatic injection"):

- a review that is not an AdmissionReview v1 with a request and a uid: 400, no review;
- not a Pod, not CREATE, no ``credential-sidecar.io/inject: "true"``, or the sidecar
  already there: allowed, no patch (idempotent);
- an annotated pod the webhook cannot inject safely: allowed false, with the reason;
- else allowed, with a JSONPatch that adds the sidecar (a native sidecar: the first
  init container, ``restartPolicy: Always``) and what the annotations ask for.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sidecar.webhook.settings import WebhookSettings, valid_object_name

API_VERSION = "admission.k8s.io/v1"
PREFIX = "credential-sidecar.io/"
INJECT = PREFIX + "inject"
CONFIG = PREFIX + "config"
PROXY_ENV = PREFIX + "proxy-env"
INTERCEPT = PREFIX + "intercept"
KEYS_SECRET = PREFIX + "keys-secret"
ANNOTATIONS = (INJECT, CONFIG, PROXY_ENV, INTERCEPT, KEYS_SECRET)

CONTAINER_NAME = "credential-sidecar"
#: The contract's fixed ports: the data plane on the pod's loopback, the admin port for probes.
PROXY_PORT = 8080
ADMIN_PORT = 9901
PROXY_URL = f"http://127.0.0.1:{PROXY_PORT}"
NO_PROXY = "localhost,127.0.0.1,::1"
CONFIG_KEY = "sidecar.yaml"
CONFIG_DIR = "/etc/credential-sidecar/config"
KEYS_DIR = "/etc/credential-sidecar/secrets"
#: Where the sidecar writes its interception CA (forward_proxy.mitm.ca_cert_out) and the app reads it.
CA_DIR = "/var/run/credential-sidecar/ca"
CA_FILE = CA_DIR + "/ca.crt"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
VOLUME_CONFIG = "credential-sidecar-config"
VOLUME_TMP = "credential-sidecar-tmp"
VOLUME_KEYS = "credential-sidecar-keys"
VOLUME_CA = "credential-sidecar-ca"
#: Variable pairs set in forward-proxy mode; a container that has either spelling keeps its own.
PROXY_VARIABLES = (("HTTP_PROXY", "http_proxy"), ("HTTPS_PROXY", "https_proxy"), ("NO_PROXY", "no_proxy"))
#: The CA bundle variables of Python's ssl module and OpenSSL, requests, and curl.
CA_VARIABLES = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
#: The chart's locked-down container securityContext (charts/credential-sidecar, sidecar.securityContext).
SECURITY_CONTEXT: Mapping[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
#: The chart's probe timings (startup once a second for 30 s, then liveness and readiness).
PROBES: Mapping[str, tuple[str, Mapping[str, int]]] = {
    "startupProbe": ("/healthz", {"periodSeconds": 1, "failureThreshold": 30, "timeoutSeconds": 2}),
    "livenessProbe": ("/healthz", {"periodSeconds": 10, "failureThreshold": 3, "timeoutSeconds": 2}),
    "readinessProbe": ("/readyz", {"periodSeconds": 5, "failureThreshold": 2, "timeoutSeconds": 2}),
}
_TRUE, _FALSE = "true", "false"


class BadReview(Exception):
    """The body is no AdmissionReview v1 request we can answer (HTTP 400)."""


@dataclass
class Outcome:
    """What to answer and what to log about it."""

    status: int
    body: dict[str, Any]
    #: injected | unchanged | skipped | denied | bad_request
    decision: str
    reason: str
    log: dict[str, Any] = field(default_factory=dict)


def _review(uid: str, response: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": {"uid": uid, **response}}


def _escape(key: str) -> str:
    """A name as one JSON Pointer segment (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


def _flag(annotations: Mapping[str, Any], key: str) -> bool | str:
    """An on/off annotation: True, False, or the problem."""
    value = annotations.get(key)
    if value is None:
        return False
    text = str(value).strip().lower()
    if text == _TRUE:
        return True
    if text == _FALSE:
        return False
    return f'{key}: expected "true" or "false", got {json.dumps(str(value))[:80]}'


def _has_sidecar(spec: Mapping[str, Any]) -> bool:
    return any(
        isinstance(c, Mapping) and c.get("name") == CONTAINER_NAME
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or [])
    )


def _probe(path: str, timings: Mapping[str, int]) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "admin"}, **timings}


def _sidecar_container(
    settings: WebhookSettings, *, keys: bool, intercept: bool, token_mount: Mapping[str, Any] | None
) -> dict[str, Any]:
    mounts: list[dict[str, Any]] = [
        {"name": VOLUME_CONFIG, "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": VOLUME_TMP, "mountPath": "/tmp"},  # noqa: S108 - an emptyDir of its own
    ]
    if keys:
        mounts.append({"name": VOLUME_KEYS, "mountPath": KEYS_DIR, "readOnly": True})
    if intercept:
        mounts.append({"name": VOLUME_CA, "mountPath": CA_DIR})
    if token_mount is not None:
        # Added after the ServiceAccount admission plugin ran: the token volume it mounted
        # into the app is mounted here too (the vault and aws backends log in with it).
        mounts.append({"name": token_mount["name"], "mountPath": SERVICE_ACCOUNT_DIR, "readOnly": True})
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        # A native sidecar: started before the app containers, stopped after them.
        "restartPolicy": "Always",
        "command": ["credential-sidecar", "run"],
        "args": ["--config", f"{CONFIG_DIR}/{CONFIG_KEY}"],
        "ports": [
            {"name": "proxy", "containerPort": PROXY_PORT, "protocol": "TCP"},
            {"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
        ],
        **{name: _probe(path, timings) for name, (path, timings) in PROBES.items()},
        "securityContext": json.loads(json.dumps(SECURITY_CONTEXT)),
        "volumeMounts": mounts,
    }
    if settings.resources:
        container["resources"] = {kind: dict(amounts) for kind, amounts in settings.resources.items()}
    return container


def _volumes(config_map: str, keys_secret: str | None, intercept: bool) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": VOLUME_CONFIG, "configMap": {"name": config_map, "items": [{"key": CONFIG_KEY, "path": CONFIG_KEY}]}},
        {"name": VOLUME_TMP, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
    ]
    if keys_secret is not None:
        # Mounted into the sidecar only; world-readable inside that one container because
        # the pod may set no fsGroup that would let UID 10001 read a 0440 file.
        volumes.append({"name": VOLUME_KEYS, "secret": {"secretName": keys_secret, "defaultMode": 0o444}})
    if intercept:
        volumes.append({"name": VOLUME_CA, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}})
    return volumes


def _append(ops: list[dict[str, Any]], path: str, existing: Any, items: list[dict[str, Any]]) -> None:
    """Ops that append ``items`` to the list at ``path`` (created when absent)."""
    if not items:
        return
    if not existing:
        ops.append({"op": "add", "path": path, "value": items})
    else:
        ops.extend({"op": "add", "path": path + "/-", "value": item} for item in items)


def _env_names(container: Mapping[str, Any]) -> set[str]:
    return {str(e.get("name")) for e in container.get("env") or [] if isinstance(e, Mapping)}


def _refusal(spec: Mapping[str, Any], annotations: Mapping[str, Any]) -> str | None:
    """Why this annotated pod cannot get the sidecar, or None."""
    unknown = sorted(k for k in annotations if k.startswith(PREFIX) and k not in ANNOTATIONS)
    if unknown:
        return f"{unknown[0]}: unknown annotation (known: {', '.join(ANNOTATIONS)})"
    if spec.get("hostNetwork"):
        # The data plane listens on 127.0.0.1: with the node's network that is the node's
        # loopback, and every process on the node could fetch this pod's credentials.
        return "hostNetwork: true: the sidecar's loopback listener would be the node's, open to every process on it"
    taken = {
        port.get("containerPort")
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or [])
        if isinstance(c, Mapping)
        for port in c.get("ports") or []
        if isinstance(port, Mapping)
    }
    clash = sorted(p for p in (PROXY_PORT, ADMIN_PORT) if p in taken)
    if clash:
        return (
            f"port {clash[0]} is already a containerPort of this pod; the sidecar needs {PROXY_PORT} and {ADMIN_PORT}"
        )
    ours = {VOLUME_CONFIG, VOLUME_TMP, VOLUME_KEYS, VOLUME_CA}
    names = {str(v.get("name")) for v in spec.get("volumes") or [] if isinstance(v, Mapping)}
    if names & ours:
        return f"volume {sorted(names & ours)[0]} already exists but the pod has no {CONTAINER_NAME} container"
    return None


def _mutation(
    settings: WebhookSettings, spec: Mapping[str, Any], annotations: Mapping[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]] | str:
    """The JSONPatch and the log fields for an annotated pod, or why it is refused."""
    refusal = _refusal(spec, annotations)
    if refusal is not None:
        return refusal
    flags: dict[str, bool] = {}
    for key in (PROXY_ENV, INTERCEPT):
        flag = _flag(annotations, key)
        if isinstance(flag, str):
            return flag
        flags[key] = flag
    proxy_env, intercept = flags[PROXY_ENV], flags[INTERCEPT]
    if intercept and not proxy_env:
        return f'{INTERCEPT}: "true" needs {PROXY_ENV}: "true" (interception only sees calls sent through HTTPS_PROXY)'
    config_map = annotations.get(CONFIG, settings.default_config_map)
    if config_map is None:
        return f"{CONFIG}: name the ConfigMap of the sidecar's config (key {CONFIG_KEY}); this webhook has no default"
    if not isinstance(config_map, str) or not valid_object_name(config_map):
        return f"{CONFIG}: not a ConfigMap name"
    keys_secret = annotations.get(KEYS_SECRET)
    if keys_secret is not None and (not isinstance(keys_secret, str) or not valid_object_name(keys_secret)):
        return f"{KEYS_SECRET}: not a Secret name"

    containers = [c for c in spec.get("containers") or [] if isinstance(c, Mapping)]
    token_mount = next(
        (
            m
            for c in containers
            for m in c.get("volumeMounts") or []
            if isinstance(m, Mapping) and m.get("mountPath") == SERVICE_ACCOUNT_DIR and m.get("name")
        ),
        None,
    )
    sidecar = _sidecar_container(
        settings, keys=keys_secret is not None, intercept=intercept, token_mount=token_mount
    )
    ops: list[dict[str, Any]] = []
    if spec.get("initContainers"):
        # First, so the init containers after it can already use it, as Istio's native sidecar does.
        ops.append({"op": "add", "path": "/spec/initContainers/0", "value": sidecar})
    else:
        ops.append({"op": "add", "path": "/spec/initContainers", "value": [sidecar]})
    _append(ops, "/spec/volumes", spec.get("volumes"), _volumes(config_map, keys_secret, intercept))

    kept: list[str] = []
    for index, container in enumerate(containers):
        have = _env_names(container)
        env: list[dict[str, str]] = []
        if proxy_env:
            for pair in PROXY_VARIABLES:
                if have & set(pair):
                    # The pod's own setting wins (a proxy chain, an extra NO_PROXY entry):
                    # both spellings stay as the pod wrote them.
                    kept.append(f"{container.get('name')}:{pair[0]}")
                    continue
                value = NO_PROXY if pair[0] == "NO_PROXY" else PROXY_URL
                env.extend({"name": name, "value": value} for name in pair)
        if intercept:
            for name in CA_VARIABLES:
                if name in have:
                    kept.append(f"{container.get('name')}:{name}")
                else:
                    env.append({"name": name, "value": CA_FILE})
            _append(
                ops,
                f"/spec/containers/{index}/volumeMounts",
                container.get("volumeMounts"),
                [{"name": VOLUME_CA, "mountPath": CA_DIR, "readOnly": True}],
            )
        _append(ops, f"/spec/containers/{index}/env", container.get("env"), env)
    log = {
        "config_map": config_map,
        "proxy_env": proxy_env,
        "intercept": intercept,
        "keys_secret": keys_secret,
        "containers": len(containers),
    }
    if kept:
        log["env_kept"] = kept
    return ops, log


def _pod_name(request: Mapping[str, Any], pod: Mapping[str, Any]) -> str:
    metadata = pod.get("metadata") if isinstance(pod.get("metadata"), Mapping) else {}
    assert isinstance(metadata, Mapping)
    name = metadata.get("name") or request.get("name")
    if name:
        return str(name)
    generate = metadata.get("generateName")
    # A Deployment's pod is named after admission: log the prefix it will get.
    return f"{generate}*" if generate else "(no name)"


def review(settings: WebhookSettings, body: bytes) -> Outcome:
    """Answer one AdmissionReview body; never raises for any input."""
    try:
        return _review_or_raise(settings, body)
    except BadReview as exc:
        message = str(exc)
        return Outcome(400, {"error": "bad_request", "message": message}, "bad_request", message)


def _review_or_raise(settings: WebhookSettings, body: bytes) -> Outcome:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise BadReview("the body is not JSON") from None
    if not isinstance(document, dict):
        raise BadReview("the body is not a JSON object")
    if document.get("apiVersion") != API_VERSION or document.get("kind") != "AdmissionReview":
        raise BadReview(f"expected an AdmissionReview of {API_VERSION}")
    request = document.get("request")
    if not isinstance(request, dict):
        raise BadReview("the AdmissionReview has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview("the AdmissionReview's request has no uid")

    log: dict[str, Any] = {"uid": uid, "namespace": request.get("namespace"), "operation": request.get("operation")}

    def answer(decision: str, reason: str, **response: Any) -> Outcome:
        return Outcome(200, _review(uid, response), decision, reason, log)

    kind = request.get("kind")
    if not isinstance(kind, Mapping) or kind.get("kind") != "Pod" or kind.get("group", "") != "":
        log["kind"] = kind.get("kind") if isinstance(kind, Mapping) else None
        return answer("skipped", "not a pod", allowed=True)
    if request.get("operation") != "CREATE":
        return answer("skipped", "not a create", allowed=True)
    pod = request.get("object")
    if not isinstance(pod, dict):
        return answer("denied", "no object", allowed=False,
                      status={"code": 400, "message": "the AdmissionReview's request has no object"})
    log["pod"] = _pod_name(request, pod)
    metadata = pod.get("metadata") if isinstance(pod.get("metadata"), Mapping) else {}
    annotations = (metadata or {}).get("annotations") or {}
    spec = pod.get("spec")
    if not isinstance(annotations, Mapping) or not isinstance(spec, Mapping):
        return answer("denied", "not a pod object", allowed=False,
                      status={"code": 400, "message": "the object is not a Pod (metadata.annotations, spec)"})
    inject = _flag(annotations, INJECT)
    if isinstance(inject, str):
        return answer("denied", inject, allowed=False, status={"code": 400, "message": inject})
    if not inject:
        return answer("skipped", "not annotated", allowed=True)
    try:
        if _has_sidecar(spec):
            return answer("unchanged", "already injected", allowed=True)
        mutation = _mutation(settings, spec, annotations)
    except (TypeError, AttributeError, KeyError, ValueError):
        # A field of the wrong JSON type somewhere in the spec: the API server would refuse
        # the pod anyway; refuse it here with a message instead of failing the call.
        mutation = "the pod spec has a field of the wrong type"
    if isinstance(mutation, str):
        return answer("denied", mutation, allowed=False,
                      status={"code": 403, "reason": "Forbidden", "message": f"credential-sidecar: {mutation}"})
    ops, fields = mutation
    log.update(fields)
    patch = base64.b64encode(json.dumps(ops, separators=(",", ":")).encode()).decode("ascii")
    return answer("injected", "annotated", allowed=True, patchType="JSONPatch", patch=patch)
