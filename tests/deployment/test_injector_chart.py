"""The injector chart, rendered offline with real Helm (helm-python-sdk) like charts/credential-sidecar.

Every manifest is validated strictly with kubernetes-validate; the registration,
the pods and the TLS are asserted per template; and the rendered config and
generated certificate are handed to the real ``credential-sidecar webhook``,
which is then called the way the API server would: trusting only the
configuration's caBundle and checking the Service's DNS name.
"""

from __future__ import annotations

import base64
import copy
import http.client
import json
import re
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import requests
import yaml
from cryptography import x509

from tests.e2e.test_webhook import IMAGE, WebhookProcess, admission_review, pod

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "charts" / "credential-sidecar-injector"
RELEASE = "inj"
NAMESPACE = "mcp-system"
SERVICE_HOST = f"{RELEASE}-credential-sidecar-injector.{NAMESPACE}.svc"
KUBE_VERSIONS = ("1.29", "1.31", kubernetes_validate.latest_version())
CRD_KINDS = {"Certificate", "Issuer"}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "cert-manager": {"tls": {"source": "cert-manager"}},
    "cert-manager-cluster-issuer": {
        "tls": {"source": "cert-manager", "certManager": {"issuerRef": {"kind": "ClusterIssuer", "name": "internal-ca"}}},
    },
    "custom": {
        "replicaCount": 3,
        "image": {"repository": "registry.example.com/mcp-credential-sidecar", "tag": "0.2.0"},
        "sidecar": {
            "image": {"repository": "registry.example.com/mcp-credential-sidecar", "tag": "0.2.0", "pullPolicy": "Always"},
            "defaultConfigMap": "mcp-sidecar",
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
        },
        "webhook": {
            "failurePolicy": "Ignore",
            "timeoutSeconds": 10,
            "objectSelector": {"matchLabels": {"credential-sidecar.io/inject": "true"}},
            "reinvocationPolicy": "IfNeeded",
        },
        "podDisruptionBudget": {"enabled": False},
        "priorityClassName": "system-cluster-critical",
    },
}


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Template file name -> its manifests (NOTES.txt left out)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path, text in chart.render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE).items():
        if path.endswith("NOTES.txt"):
            continue
        docs = [doc for doc in yaml.safe_load_all(text) if doc]
        if docs:
            out[Path(path).name] = docs
    return out


def of_kind(manifests: dict[str, list[dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    return [doc for docs in manifests.values() for doc in docs if doc["kind"] == kind]


def only(manifests: dict[str, list[dict[str, Any]]], kind: str) -> dict[str, Any]:
    (doc,) = of_kind(manifests, kind)
    return doc


def registration(manifests: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    (hook,) = only(manifests, "MutatingWebhookConfiguration")["webhooks"]
    return hook


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def value_set(request: pytest.FixtureRequest, chart: helm.Chart) -> tuple[str, dict[str, list[dict[str, Any]]]]:
    return request.param, render(chart, VALUE_SETS[request.param])


# --------------------------------------------------------------------------- whole chart


def test_lint_is_clean_for_every_value_set() -> None:
    for name, values in VALUE_SETS.items():
        report = helm.lint(CHART_DIR, copy.deepcopy(values), strict=True, namespace=NAMESPACE, kube_version="v1.29.0")
        assert report["errors"] == [], name
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], name


def test_every_manifest_validates_strictly(value_set: tuple[str, dict[str, list[dict[str, Any]]]]) -> None:
    name, manifests = value_set
    for template, docs in manifests.items():
        for doc in docs:
            if doc["kind"] in CRD_KINDS:
                assert doc["apiVersion"] == "cert-manager.io/v1"
                continue
            for version in KUBE_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    where = ".".join(str(p) for p in exc.path)
                    pytest.fail(f"{name}: {template} invalid for Kubernetes {version} at {where}: {exc.message}")


def test_it_asks_for_no_kubernetes_api_access(value_set: tuple[str, dict[str, list[dict[str, Any]]]]) -> None:
    _, manifests = value_set
    kinds = {doc["kind"] for docs in manifests.values() for doc in docs}
    assert not kinds & {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}
    assert only(manifests, "ServiceAccount")["automountServiceAccountToken"] is False
    spec = only(manifests, "Deployment")["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False


# --------------------------------------------------------------------------- the pods


def test_two_locked_down_replicas_behind_a_disruption_budget(chart: helm.Chart) -> None:
    manifests = render(chart, {})
    deployment = only(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    pdb = only(manifests, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["command"] == ["credential-sidecar", "webhook"]
    context = container["securityContext"]
    assert context["runAsNonRoot"] and context["readOnlyRootFilesystem"]
    assert context["allowPrivilegeEscalation"] is False and context["capabilities"] == {"drop": ["ALL"]}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "https", "scheme": "HTTPS"}
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    assert not any(a != b and b.startswith(a + "/") for a in mounts for b in mounts), "nested mounts"
    spread = spec["topologySpreadConstraints"][0]
    assert spread["labelSelector"]["matchLabels"].items() <= labels.items()
    # Disabled on request.
    assert not of_kind(render(chart, VALUE_SETS["custom"]), "PodDisruptionBudget")


def test_the_service_reaches_the_webhook_port(value_set: tuple[str, dict[str, list[dict[str, Any]]]]) -> None:
    _, manifests = value_set
    service = only(manifests, "Service")
    deployment = only(manifests, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    client = registration(manifests)["clientConfig"]["service"]
    assert client == {"name": service["metadata"]["name"], "namespace": NAMESPACE, "path": "/mutate",
                      "port": port["port"]}


# --------------------------------------------------------------------------- the registration


def test_the_registration_sends_pod_creations_as_v1_reviews(chart: helm.Chart) -> None:
    hook = registration(render(chart, {}))
    assert hook["admissionReviewVersions"] == ["v1"] and hook["sideEffects"] == "None"
    assert hook["failurePolicy"] == "Fail" and hook["timeoutSeconds"] == 5
    assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                              "resources": ["pods"], "scope": "Namespaced"}]
    assert hook["namespaceSelector"] == {"matchLabels": {"credential-sidecar.io/injection": "enabled"}}
    assert "objectSelector" not in hook
    custom = registration(render(chart, VALUE_SETS["custom"]))
    assert custom["failurePolicy"] == "Ignore" and custom["timeoutSeconds"] == 10
    assert custom["objectSelector"] == {"matchLabels": {"credential-sidecar.io/inject": "true"}}
    assert custom["reinvocationPolicy"] == "IfNeeded"


def test_the_rendered_webhook_config_names_the_sidecar_image(chart: helm.Chart) -> None:
    config = yaml.safe_load(only(render(chart, VALUE_SETS["custom"]), "ConfigMap")["data"]["webhook.yaml"])
    assert config["image"] == "registry.example.com/mcp-credential-sidecar:0.2.0"
    assert config["image_pull_policy"] == "Always" and config["default_config_map"] == "mcp-sidecar"
    # Helm merges maps: the default limit stays unless set to null.
    assert config["resources"] == {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}}
    default = yaml.safe_load(only(render(chart, {}), "ConfigMap")["data"]["webhook.yaml"])
    assert default["image"] == "mcp-credential-sidecar:0.1.0" and default["default_config_map"] is None


# --------------------------------------------------------------------------- TLS


def test_cert_manager_issues_the_certificate_and_injects_its_ca(chart: helm.Chart) -> None:
    for name in ("cert-manager", "cert-manager-cluster-issuer"):
        manifests = render(chart, VALUE_SETS[name])
        certificate = only(manifests, "Certificate")
        assert SERVICE_HOST in certificate["spec"]["dnsNames"]
        volumes = only(manifests, "Deployment")["spec"]["template"]["spec"]["volumes"]
        (tls,) = [v for v in volumes if "secret" in v]
        assert tls["secret"]["secretName"] == certificate["spec"]["secretName"]
        configuration = only(manifests, "MutatingWebhookConfiguration")
        assert configuration["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == (
            f"{NAMESPACE}/{certificate['metadata']['name']}"
        )
        assert "caBundle" not in registration(manifests)["clientConfig"]
        assert not of_kind(manifests, "Secret"), "cert-manager writes the Secret"
        issuers = of_kind(manifests, "Issuer")
        if name == "cert-manager":
            assert certificate["spec"]["issuerRef"] == {"kind": "Issuer", "name": issuers[0]["metadata"]["name"]}
        else:
            assert not issuers and certificate["spec"]["issuerRef"] == {"kind": "ClusterIssuer", "name": "internal-ca"}


def test_without_cert_manager_a_self_signed_pair_is_generated(chart: helm.Chart) -> None:
    manifests = render(chart, {})
    assert not of_kind(manifests, "Certificate")
    secret = only(manifests, "Secret")
    assert secret["type"] == "kubernetes.io/tls"
    ca_pem = base64.b64decode(registration(manifests)["clientConfig"]["caBundle"])
    assert ca_pem == base64.b64decode(secret["data"]["ca.crt"])
    leaf = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    ca = x509.load_pem_x509_certificate(ca_pem)
    leaf.verify_directly_issued_by(ca)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    )
    assert SERVICE_HOST in names


def test_the_webhook_serves_the_rendered_config_and_certificate_as_the_api_server_calls_it(
    chart: helm.Chart, tmp_path: Path
) -> None:
    manifests = render(chart, {"sidecar": {"defaultConfigMap": "mcp-sidecar"}})
    secret = only(manifests, "Secret")
    config = yaml.safe_load(only(manifests, "ConfigMap")["data"]["webhook.yaml"])
    for key in ("tls.crt", "tls.key"):
        (tmp_path / key).write_bytes(base64.b64decode(secret["data"][key]))
    # The pod's paths become the local copies; only the listener moves to a free loopback port.
    config.update({"listen": "127.0.0.1:0", "tls_cert": str(tmp_path / "tls.crt"),
                   "tls_key": str(tmp_path / "tls.key"), "shutdown_grace_seconds": 0})
    process = WebhookProcess(tmp_path, config)
    try:
        # The API server trusts caBundle only and checks the Service's DNS name.
        ca_file = tmp_path / "ca-bundle.pem"
        ca_file.write_bytes(base64.b64decode(registration(manifests)["clientConfig"]["caBundle"]))
        context = ssl.create_default_context(cafile=str(ca_file))
        sent = admission_review(pod())
        # Dial the loopback port, but verify (and send SNI for) the Service's name.
        connection = http.client.HTTPSConnection(SERVICE_HOST, process.port, context=context, timeout=10)
        connection.sock = context.wrap_socket(
            socket.create_connection(("127.0.0.1", process.port), timeout=10), server_hostname=SERVICE_HOST
        )
        connection.request("POST", "/mutate", body=json.dumps(sent), headers={"Content-Type": "application/json"})
        reply = connection.getresponse()
        assert reply.status == 200
        response = json.loads(reply.read())["response"]
        assert response["uid"] == sent["request"]["uid"] and response["allowed"] is True
        ops = json.loads(base64.b64decode(response["patch"]))
        (sidecar,) = [op["value"][0] for op in ops if op["path"] == "/spec/initContainers"]
        assert sidecar["image"] == config["image"]
        connection.close()
        # Another name than the Service's is refused by the client, as by the API server.
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"https://127.0.0.1:{process.port}/healthz", verify=str(ca_file), timeout=5)
    finally:
        assert process.stop() == 0, process.output()


# --------------------------------------------------------------------------- values


def test_wrong_value_types_fail_the_schema(chart: helm.Chart) -> None:
    wrong = [
        ({"webhook": {"failurePolicy": "Maybe"}}, "/webhook/failurePolicy"),
        ({"webhook": {"timeoutSeconds": 31}}, "/webhook/timeoutSeconds"),
        ({"tls": {"source": "vault"}}, "/tls/source"),
        ({"replicaCount": "2"}, "/replicaCount"),
        ({"sidecar": {"defaultConfigMap": "Not_A_Name"}}, "/sidecar/defaultConfigMap"),
        ({"sidecar": {"resources": {"requests": {"cpu": "lots"}}}}, "/sidecar/resources/requests/cpu"),
        ({"tls": {"certManager": {"issuerRef": {"kind": "Vault", "name": "x"}}}}, "/tls/certManager/issuerRef/kind"),
        ({"unknownTopLevel": True}, "unknownTopLevel"),
    ]
    for values, where in wrong:
        with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
            chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_every_values_key_has_a_comment_above_it() -> None:
    previous = ""
    missing = []
    for number, line in enumerate((CHART_DIR / "values.yaml").read_text().splitlines(), 1):
        if not line.strip():
            continue
        if re.match(r"^\s*[A-Za-z_][\w.-]*:", line) and not previous.lstrip().startswith("#"):
            missing.append(f"{number}: {line.strip()}")
        previous = line
    assert missing == []


def test_every_helper_has_a_comment() -> None:
    text = (CHART_DIR / "templates" / "_helpers.tpl").read_text()
    defines = re.findall(r"(\*/\}\}\n|\{\{- end \}\}\n)\{\{- define \"([^\"]+)\"", text)
    assert len(defines) >= 8
    for before, name in defines:
        assert before.startswith("*/") or name.endswith(("Dir", "Path")), f"{name} has no comment"


def test_the_sidecar_image_default_matches_the_webhook_image() -> None:
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert values["sidecar"]["image"]["repository"] == values["image"]["repository"]
    assert IMAGE.rsplit(":", 1)[0].endswith(values["image"]["repository"])
