"""The admission webhook end to end, as the API server calls it.

The real CLI (``credential-sidecar webhook``) serves HTTPS with a trustme
certificate; each test POSTs an AdmissionReview v1 the way the API server does,
applies the returned JSONPatch with the jsonpatch library, and validates the pod
that results against the Kubernetes 1.31 schema (kubernetes-validate, strict)
plus the API server's own rules the schema cannot express (unique names, mounts
that name a volume). Variants of the webhook's settings are checked on the pure
``review`` function with the same helpers.
"""

from __future__ import annotations

import base64
import copy
import json
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonpatch
import kubernetes_validate
import pytest
import requests
import trustme
import yaml

from sidecar.webhook.mutate import review
from sidecar.webhook.settings import WebhookSettings, parse_webhook_settings
from tests.support.leaks import make_secret, output_file

ROOT = Path(__file__).resolve().parents[2]
KUBE_VERSION = "1.31"
IMAGE = "registry.example.com/mcp-credential-sidecar:0.2.0"
START_TIMEOUT = 20.0
CHART_VALUES = yaml.safe_load((ROOT / "charts" / "credential-sidecar" / "values.yaml").read_text())


# --------------------------------------------------------------------------- the webhook process


class WebhookProcess:
    """One ``credential-sidecar webhook`` subprocess; its port comes from its "listening" line."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.config_path = workdir / "webhook.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = output_file(f"webhook-{uuid.uuid4().hex[:8]}.log")
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "webhook", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
        )
        log.close()
        self.port = 0
        wait_for(lambda: self._listening() or self.proc.poll() is not None, "the webhook to listen", self.output)
        assert self.proc.poll() is None, self.output()

    def _listening(self) -> bool:
        for line in self.lines():
            if line.get("message") == "listening":
                self.port = int(line["listen"].rsplit(":", 1)[1])
                return True
        return False

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines(self) -> list[dict[str, Any]]:
        out = []
        for raw in self.output().splitlines():
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue
        return out

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=20)


def wait_for(condition: Callable[[], bool], what: str, output: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{output()}")
        time.sleep(0.02)


class Served:
    """The running webhook and what a client needs to call it."""

    def __init__(self, process: WebhookProcess, ca: trustme.CA, ca_file: Path, tls_dir: Path) -> None:
        self.process = process
        self.ca = ca
        self.ca_file = ca_file
        self.tls_dir = tls_dir

    @property
    def url(self) -> str:
        return f"https://localhost:{self.process.port}"

    def post(self, body: bytes | dict[str, Any]) -> requests.Response:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return requests.post(
            self.url + "/mutate", data=data, headers={"Content-Type": "application/json"},
            verify=str(self.ca_file), timeout=10,
        )


@pytest.fixture(scope="module")
def webhook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    workdir = tmp_path_factory.mktemp("webhook")
    ca = trustme.CA()
    tls_dir = workdir / "tls"
    tls_dir.mkdir()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tls_dir / "tls.crt"))
    cert.private_key_pem.write_to_path(str(tls_dir / "tls.key"))
    ca_file = workdir / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    process = WebhookProcess(workdir, {
        "listen": "127.0.0.1:0",
        "tls_cert": "tls/tls.crt",  # relative to the config file
        "tls_key": str(tls_dir / "tls.key"),
        "image": IMAGE,
        "default_config_map": "mcp-sidecar-default",
        "shutdown_grace_seconds": 0,
    })
    served = Served(process, ca, ca_file, tls_dir)
    yield served
    if process.proc.poll() is None:
        assert process.stop() == 0, process.output()


# --------------------------------------------------------------------------- reviews and pods


def admission_review(pod: dict[str, Any] | None, *, operation: str = "CREATE", kind: str = "Pod") -> dict[str, Any]:
    """What the API server sends for a pod CREATE in namespace mcp."""
    request: dict[str, Any] = {
        "uid": str(uuid.uuid4()),
        "kind": {"group": "", "version": "v1", "kind": kind},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": {"group": "", "version": "v1", "kind": kind},
        "requestResource": {"group": "", "version": "v1", "resource": "pods"},
        "name": (pod or {}).get("metadata", {}).get("name", ""),
        "namespace": "mcp",
        "operation": operation,
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller", "groups": []},
        "object": pod,
        "oldObject": None,
        "dryRun": False,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
    }
    if pod is None:
        del request["object"]
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


def app(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "image": f"example.com/{name}:1", **extra}


def pod(*containers: dict[str, Any], annotations: dict[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "fininfo",
            "namespace": "mcp",
            "annotations": {"credential-sidecar.io/inject": "true", **(annotations or {})},
        },
        "spec": {"containers": list(containers) or [app("mcp-server")], **spec},
    }


def validate_pod(patched: dict[str, Any]) -> None:
    """The 1.31 schema, strictly, and what the API server checks beyond it."""
    try:
        kubernetes_validate.validate(patched, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"invalid for Kubernetes {KUBE_VERSION} at {'.'.join(map(str, exc.path))}: {exc.message}")
    spec = patched["spec"]
    every = spec.get("initContainers", []) + spec["containers"]
    names = [c["name"] for c in every]
    assert len(names) == len(set(names)), f"duplicate container names: {names}"
    volumes = [v["name"] for v in spec.get("volumes", [])]
    assert len(volumes) == len(set(volumes)), f"duplicate volumes: {volumes}"
    for container in every:
        env = [e["name"] for e in container.get("env", [])]
        assert len(env) == len(set(env)), f"{container['name']}: duplicate env names {env}"
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{container['name']} mounts unknown volume {mount['name']}"
    for container in spec.get("initContainers", []):
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            # Probes on an init container are allowed only on a restartable (native) sidecar.
            assert probe not in container or container.get("restartPolicy") == "Always"


def response_of(answer: dict[str, Any], sent: dict[str, Any]) -> dict[str, Any]:
    assert answer["apiVersion"] == "admission.k8s.io/v1" and answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert response["uid"] == sent["request"]["uid"]
    return response


def apply(response: dict[str, Any], original: dict[str, Any]) -> dict[str, Any]:
    """The pod as the API server stores it: the JSONPatch applied (or unchanged without one)."""
    if "patch" not in response:
        return copy.deepcopy(original)
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    return jsonpatch.JsonPatch(ops).apply(original)


def admit(served: Served, original: dict[str, Any], **how: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """POST the pod's review over TLS; (the response, the patched pod) after checking it is valid."""
    sent = admission_review(original, **how)
    reply = served.post(sent)
    assert reply.status_code == 200, reply.text
    response = response_of(reply.json(), sent)
    patched = apply(response, original)
    if response["allowed"]:
        validate_pod(patched)
    return response, patched


def sidecar_of(patched: dict[str, Any]) -> dict[str, Any]:
    found = [c for c in patched["spec"].get("initContainers", []) if c["name"] == "credential-sidecar"]
    assert len(found) == 1
    return found[0]


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def volume(patched: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [v for v in patched["spec"]["volumes"] if v["name"] == name]
    return found


def settings(**overrides: Any) -> WebhookSettings:
    return parse_webhook_settings({"image": IMAGE, **overrides})


def in_process(config: WebhookSettings, original: dict[str, Any]) -> dict[str, Any]:
    sent = admission_review(original)
    outcome = review(config, json.dumps(sent).encode())
    assert outcome.status == 200
    return response_of(outcome.body, sent)


# --------------------------------------------------------------------------- injection


def test_an_annotated_pod_gets_the_native_sidecar_of_the_chart(webhook: Served) -> None:
    original = pod(annotations={"credential-sidecar.io/config": "fininfo-sidecar"})
    response, patched = admit(webhook, original)
    assert response["allowed"] is True
    first = patched["spec"]["initContainers"][0]
    sidecar = sidecar_of(patched)
    assert first is sidecar and sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == IMAGE and sidecar["imagePullPolicy"] == "IfNotPresent"
    # The same locked-down context, probes and resources as charts/credential-sidecar.
    chart = CHART_VALUES["sidecar"]
    assert sidecar["securityContext"] == chart["securityContext"]
    assert sidecar["resources"] == chart["resources"]
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert sidecar[probe] == {"httpGet": {"path": path, "port": "admin"}, **chart[probe]}
    assert {p["name"]: p["containerPort"] for p in sidecar["ports"]} == {"proxy": 8080, "admin": 9901}
    # The config from the annotated ConfigMap's key sidecar.yaml, read-only.
    assert sidecar["command"] == ["credential-sidecar", "run"]
    config_path = sidecar["args"][sidecar["args"].index("--config") + 1]
    (mount,) = [m for m in sidecar["volumeMounts"] if config_path.startswith(m["mountPath"] + "/")]
    assert mount["readOnly"] is True
    config_volume = volume(patched, mount["name"])
    assert config_volume["configMap"]["name"] == "fininfo-sidecar"
    assert config_volume["configMap"]["items"] == [{"key": "sidecar.yaml", "path": config_path.rsplit("/", 1)[1]}]
    # Without proxy-env the app is left as it was.
    assert patched["spec"]["containers"] == original["spec"]["containers"]


def test_every_app_container_gets_the_proxy_and_keeps_its_own_settings(webhook: Served) -> None:
    corporate = "http://proxy.corp.example:3128"
    original = pod(
        app("mcp-server", env=[{"name": "LOG_LEVEL", "value": "debug"}]),
        app("worker", env=[{"name": "https_proxy", "value": corporate}, {"name": "NO_PROXY", "value": ".svc"}]),
        app("metrics-exporter"),
        annotations={"credential-sidecar.io/proxy-env": "true"},
    )
    response, patched = admit(webhook, original)
    assert response["allowed"] is True
    ours = {"HTTP_PROXY": "http://127.0.0.1:8080", "HTTPS_PROXY": "http://127.0.0.1:8080",
            "NO_PROXY": "localhost,127.0.0.1,::1"}
    both = {**ours, **{k.lower(): v for k, v in ours.items()}}
    server, worker, exporter = patched["spec"]["containers"]
    assert env_of(server) == {"LOG_LEVEL": "debug", **both}
    assert server["env"][0] == {"name": "LOG_LEVEL", "value": "debug"}  # appended, not reordered
    assert env_of(exporter) == both
    # The pod's own proxy settings win, in both spellings; the rest is added.
    assert env_of(worker) == {
        "https_proxy": corporate, "NO_PROXY": ".svc",
        "HTTP_PROXY": "http://127.0.0.1:8080", "http_proxy": "http://127.0.0.1:8080",
    }
    assert "credential-sidecar" in {c["name"] for c in patched["spec"]["initContainers"]}
    # No CA variables without interception.
    assert not {"SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"} & set(env_of(server))


def test_existing_init_containers_run_after_the_sidecar(webhook: Served) -> None:
    migrate = app("migrate", command=["./migrate"])
    fetch = app("fetch-model", env=[{"name": "HTTP_PROXY", "value": "http://other:1"}])
    original = pod(app("mcp-server"), initContainers=[migrate, fetch], volumes=[{"name": "data", "emptyDir": {}}],
                   annotations={"credential-sidecar.io/proxy-env": "true"})
    _, patched = admit(webhook, original)
    assert [c["name"] for c in patched["spec"]["initContainers"]] == ["credential-sidecar", "migrate", "fetch-model"]
    # Init containers are not app containers: left untouched.
    assert patched["spec"]["initContainers"][1:] == [migrate, fetch]
    assert patched["spec"]["volumes"][0] == {"name": "data", "emptyDir": {}}
    # With no configuration annotation, the webhook's default_config_map.
    config = [v for v in patched["spec"]["volumes"] if "configMap" in v]
    assert [v["configMap"]["name"] for v in config] == ["mcp-sidecar-default"]


def test_interception_shares_the_ca_and_points_every_client_library_at_it(webhook: Served) -> None:
    original = pod(
        app("mcp-server", volumeMounts=[{"name": "cache", "mountPath": "/cache"}],
            env=[{"name": "CURL_CA_BUNDLE", "value": "/etc/ssl/mine.pem"}]),
        app("tool-runner"),
        volumes=[{"name": "cache", "emptyDir": {}}],
        annotations={"credential-sidecar.io/proxy-env": "true", "credential-sidecar.io/intercept": "true",
                     "credential-sidecar.io/keys-secret": "fininfo-keys"},
    )
    response, patched = admit(webhook, original)
    assert response["allowed"] is True
    sidecar = sidecar_of(patched)
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    ca_volume = volume(patched, "credential-sidecar-ca")
    assert "emptyDir" in ca_volume
    ca_dir = mounts["credential-sidecar-ca"]["mountPath"]
    assert not mounts["credential-sidecar-ca"].get("readOnly")  # the sidecar writes ca_cert_out there
    # The keys Secret goes to the sidecar only.
    assert volume(patched, "credential-sidecar-keys")["secret"]["secretName"] == "fininfo-keys"
    assert mounts["credential-sidecar-keys"]["readOnly"] is True
    server, runner = patched["spec"]["containers"]
    for container in (server, runner):
        app_mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert app_mounts["credential-sidecar-ca"] == {"name": "credential-sidecar-ca", "mountPath": ca_dir,
                                                        "readOnly": True}
        assert "credential-sidecar-keys" not in app_mounts and "credential-sidecar-config" not in app_mounts
    ca_file = f"{ca_dir}/ca.crt"
    assert env_of(runner)["SSL_CERT_FILE"] == env_of(runner)["REQUESTS_CA_BUNDLE"] == ca_file
    assert env_of(runner)["CURL_CA_BUNDLE"] == ca_file
    assert env_of(server)["CURL_CA_BUNDLE"] == "/etc/ssl/mine.pem"  # the pod's own is kept
    assert env_of(server)["SSL_CERT_FILE"] == ca_file
    assert server["volumeMounts"][0] == {"name": "cache", "mountPath": "/cache"}


def test_the_service_account_token_reaches_the_sidecar_too(webhook: Served) -> None:
    # The ServiceAccount admission plugin mounted the token before the webhook ran; the
    # sidecar, added later, needs it for the Vault kubernetes login.
    token = "kube-api-access-x7k2p"
    token_dir = "/var/run/secrets/kubernetes.io/serviceaccount"
    original = pod(
        app("mcp-server", volumeMounts=[{"name": token, "mountPath": token_dir, "readOnly": True}]),
        volumes=[{"name": token, "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}}],
    )
    _, patched = admit(webhook, original)
    mounts = {m["mountPath"]: m for m in sidecar_of(patched)["volumeMounts"]}
    assert mounts[token_dir] == {"name": token, "mountPath": token_dir, "readOnly": True}


def test_a_pod_from_a_deployment_template_has_no_name_yet(webhook: Served) -> None:
    original = pod(annotations={"credential-sidecar.io/config": "fininfo-sidecar"})
    original["metadata"] = {
        "generateName": "fininfo-7d9c8b5f4-",
        "labels": {"app": "fininfo", "pod-template-hash": "7d9c8b5f4"},
        "annotations": original["metadata"]["annotations"],
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "fininfo-7d9c8b5f4",
                             "uid": str(uuid.uuid4()), "controller": True, "blockOwnerDeletion": True}],
    }
    response, patched = admit(webhook, original)
    assert response["allowed"] is True and "patch" in response
    assert patched["metadata"] == original["metadata"]
    sidecar_of(patched)
    decisions = [line for line in webhook.process.lines() if line.get("uid") == response["uid"]]
    assert len(decisions) == 1 and decisions[0]["pod"] == "fininfo-7d9c8b5f4-*", decisions


def test_mutation_is_idempotent(webhook: Served) -> None:
    original = pod(app("mcp-server", env=[{"name": "A", "value": "1"}]), app("worker"),
                   annotations={"credential-sidecar.io/proxy-env": "true", "credential-sidecar.io/intercept": "true"})
    _, once = admit(webhook, original)
    response, twice = admit(webhook, once)
    assert response["allowed"] is True and "patch" not in response
    assert twice == once
    # A pod deployed with charts/credential-sidecar (a classic sidecar container) is left alone too.
    classic = pod(app("mcp-server"), {"name": "credential-sidecar", "image": IMAGE})
    response, patched = admit(webhook, classic)
    assert "patch" not in response and patched == classic


def test_pods_without_the_annotation_are_allowed_untouched(webhook: Served) -> None:
    for marks in ({}, {"credential-sidecar.io/inject": "false"}, {"other.io/inject": "true"}):
        original = pod(app("mcp-server"))
        original["metadata"]["annotations"] = marks
        response, patched = admit(webhook, original)
        assert response["allowed"] is True and "patch" not in response and patched == original
    # Neither another operation nor another kind is touched.
    for how in ({"operation": "UPDATE"}, {"kind": "ConfigMap"}):
        sent = admission_review(pod(), **how)
        response = response_of(webhook.post(sent).json(), sent)
        assert response == {"uid": sent["request"]["uid"], "allowed": True}


def test_a_host_network_pod_is_refused_with_the_reason(webhook: Served) -> None:
    # The sidecar's 127.0.0.1 listener would be the node's loopback: every process on the
    # node could have this pod's credentials injected.
    response, _ = admit(webhook, pod(hostNetwork=True))
    assert response["allowed"] is False
    assert "hostNetwork" in response["status"]["message"] and response["status"]["code"] == 403


def test_malformed_reviews_are_answered_and_the_webhook_keeps_serving(webhook: Served) -> None:
    bad_bodies: list[bytes | dict[str, Any]] = [
        b"{not json",
        b"[1, 2]",
        b"\xff\xfe",
        {**admission_review(pod()), "apiVersion": "admission.k8s.io/v1beta1"},
        {**admission_review(pod()), "kind": "TokenReview"},
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"},
        {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"kind": {"kind": "Pod"}}},
        b"[" * 100000,
    ]
    for body in bad_bodies:
        reply = webhook.post(body)
        assert reply.status_code == 400, (body, reply.text)
        assert reply.json()["error"] == "bad_request"
    # A review that can be answered, of a pod that cannot: allowed false with a message.
    no_object = admission_review(None)
    response = response_of(webhook.post(no_object).json(), no_object)
    assert response["allowed"] is False and "no object" in response["status"]["message"]
    wrong_types = admission_review(pod())
    wrong_types["request"]["object"]["spec"] = {"containers": "mcp-server", "initContainers": 7}
    response = response_of(webhook.post(wrong_types).json(), wrong_types)
    assert response["allowed"] is False and response["status"]["message"]
    typo = admission_review(pod(annotations={"credential-sidecar.io/inject": "ture"}))
    response = response_of(webhook.post(typo).json(), typo)
    assert response["allowed"] is False and "credential-sidecar.io/inject" in response["status"]["message"]
    # Still serving, and healthy.
    assert webhook.process.proc.poll() is None
    assert requests.get(webhook.url + "/healthz", verify=str(webhook.ca_file), timeout=5).status_code == 200
    assert requests.get(webhook.url + "/readyz", verify=str(webhook.ca_file), timeout=5).status_code == 200
    response, _ = admit(webhook, pod())
    assert response["allowed"] is True


def test_one_json_line_per_decision_and_never_an_env_value(webhook: Served) -> None:
    secret = make_secret("webhook-env")
    original = pod(app("mcp-server", env=[{"name": "POLYGON_API_KEY", "value": secret}]),
                   annotations={"credential-sidecar.io/proxy-env": "true"})
    response, _ = admit(webhook, original)
    sent = admission_review(pod(hostNetwork=True))
    denied = response_of(webhook.post(sent).json(), sent)
    lines = webhook.process.lines()
    (injected,) = [line for line in lines if line.get("uid") == response["uid"]]
    assert injected["event"] == "admission" and injected["decision"] == "injected"
    assert injected["namespace"] == "mcp" and injected["pod"] == "fininfo"
    assert injected["config_map"] == "mcp-sidecar-default" and injected["proxy_env"] is True
    (refused,) = [line for line in lines if line.get("uid") == denied["uid"]]
    assert refused["decision"] == "denied" and "hostNetwork" in refused["reason"]
    assert secret not in webhook.process.output()


# --------------------------------------------------------------------------- settings variants (in process)


def test_without_a_default_config_map_a_pod_must_name_one() -> None:
    response = in_process(settings(), pod())
    assert response["allowed"] is False and "credential-sidecar.io/config" in response["status"]["message"]
    response = in_process(settings(), pod(annotations={"credential-sidecar.io/config": "mine"}))
    assert response["allowed"] is True


@pytest.mark.parametrize(
    ("annotations", "spec", "says"),
    [
        ({"credential-sidecar.io/intercept": "true"}, {}, "credential-sidecar.io/proxy-env"),
        ({"credential-sidecar.io/injec": "true"}, {}, "unknown annotation"),
        ({"credential-sidecar.io/proxy-env": "yes"}, {}, 'expected "true" or "false"'),
        ({"credential-sidecar.io/config": "Not_A_Name"}, {}, "not a ConfigMap name"),
        ({}, {"containers": [app("web", ports=[{"containerPort": 8080}])]}, "port 8080"),
        ({}, {"volumes": [{"name": "credential-sidecar-config", "emptyDir": {}}]}, "credential-sidecar-config"),
    ],
)
def test_pods_that_cannot_get_the_sidecar_safely_are_refused(
    annotations: dict[str, str], spec: dict[str, Any], says: str
) -> None:
    original = pod(annotations={"credential-sidecar.io/config": "c", **annotations})
    original["spec"].update(spec)
    response = in_process(settings(), original)
    assert response["allowed"] is False and says in response["status"]["message"]


def test_the_settings_choose_image_pull_policy_and_resources() -> None:
    config = settings(image_pull_policy="Always", default_config_map="d",
                      resources={"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": 1073741824}})
    response = in_process(config, pod())
    patched = apply(response, pod())
    validate_pod(patched)
    sidecar = sidecar_of(patched)
    assert sidecar["imagePullPolicy"] == "Always"
    assert sidecar["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1073741824"}}


# --------------------------------------------------------------------------- the config file and the CLI


def test_an_invalid_config_exits_2_naming_every_field(tmp_path: Path) -> None:
    path = tmp_path / "webhook.yaml"
    path.write_text(yaml.safe_dump({
        "listen": "nowhere", "image_pull_policy": "Sometimes", "default_config_map": "Bad_Name",
        "resources": {"requests": {"cpu": "lots"}, "limts": {}}, "tls_crt": "/tls/tls.crt",
    }))
    result = subprocess.run([sys.executable, "-m", "sidecar", "webhook", "--config", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    for field in ("listen:", "image: required", "image_pull_policy:", "default_config_map:",
                  "resources.requests.cpu:", "resources.limts:", "tls_crt: unknown key"):
        assert f"error: {field}" in result.stderr, result.stderr


def test_check_validates_without_serving(tmp_path: Path) -> None:
    path = tmp_path / "webhook.yaml"
    path.write_text(yaml.safe_dump({"image": IMAGE, "tls_cert": "/nonexistent/tls.crt"}))
    result = subprocess.run([sys.executable, "-m", "sidecar", "webhook", "--check", "--config", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and "config OK" in result.stdout and IMAGE in result.stdout
    # Serving needs the certificate: a missing one is a config error, before any port is bound.
    result = subprocess.run([sys.executable, "-m", "sidecar", "webhook", "--config", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and "error: tls_cert/tls_key:" in result.stderr


# --------------------------------------------------------------------------- certificate rotation


def served_certificate(port: int) -> bytes:
    """The DER certificate a fresh TLS handshake gets (no verification: we compare it)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def pem_to_der(pem: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.decode())


def test_a_renewed_certificate_is_served_without_a_restart(webhook: Served) -> None:
    before = served_certificate(webhook.process.port)
    assert before == pem_to_der((webhook.tls_dir / "tls.crt").read_bytes())
    # A pair that does not load (a key of another certificate) leaves the old one in use.
    other = webhook.ca.issue_cert("localhost", "127.0.0.1")
    other.private_key_pem.write_to_path(str(webhook.tls_dir / "tls.key"))
    wait_for(lambda: served_certificate(webhook.process.port) == before and any(
        line.get("message", "").startswith("certificate not reloaded") for line in webhook.process.lines()
    ), "the bad pair to be refused", webhook.process.output)
    # cert-manager renews from a new CA: the new chain and key are written in place.
    new_ca = trustme.CA()
    renewed = new_ca.issue_cert("localhost", "127.0.0.1")
    renewed.cert_chain_pems[0].write_to_path(str(webhook.tls_dir / "tls.crt"))
    renewed.private_key_pem.write_to_path(str(webhook.tls_dir / "tls.key"))
    expected = pem_to_der(renewed.cert_chain_pems[0].bytes())
    wait_for(lambda: served_certificate(webhook.process.port) == expected, "the renewed certificate",
             webhook.process.output)
    # A client that trusts only the new CA completes a review; the old CA no longer verifies.
    new_ca_file = webhook.tls_dir.parent / "new-ca.crt"
    new_ca.cert_pem.write_to_path(str(new_ca_file))
    sent = admission_review(pod())
    reply = requests.post(f"{webhook.url}/mutate", json=sent, verify=str(new_ca_file), timeout=10)
    assert reply.status_code == 200 and reply.json()["response"]["allowed"] is True
    with pytest.raises(requests.exceptions.SSLError):
        webhook.post(sent)
    webhook.ca, webhook.ca_file = new_ca, new_ca_file
    assert webhook.process.proc.poll() is None


def test_sigterm_turns_unready_then_exits_0(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "tls.crt"))
    cert.private_key_pem.write_to_path(str(tmp_path / "tls.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    process = WebhookProcess(tmp_path, {"listen": "127.0.0.1:0", "tls_cert": "tls.crt", "tls_key": "tls.key",
                                        "image": IMAGE, "shutdown_grace_seconds": 30})
    url = f"https://localhost:{process.port}/readyz"
    try:
        assert requests.get(url, verify=str(tmp_path / "ca.crt"), timeout=5).status_code == 200
        process.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: any(line.get("message") == "draining" for line in process.lines()), "draining")
        assert requests.get(url, verify=str(tmp_path / "ca.crt"), timeout=5).status_code == 503
        sent = admission_review(pod(annotations={"credential-sidecar.io/config": "c"}))
        reply = requests.post(url.replace("readyz", "mutate"), json=sent, verify=str(tmp_path / "ca.crt"), timeout=5)
        assert reply.json()["response"]["allowed"] is True  # still answering while unready
        # A second signal ends the grace: the process stops and exits 0.
        assert process.stop() == 0, process.output()
        assert any(line.get("message") == "stopped" for line in process.lines())
    finally:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait(timeout=10)
