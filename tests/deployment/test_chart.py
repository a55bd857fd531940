"""The Helm chart, rendered offline with real Helm (helm-python-sdk) for several value sets.

Every rendered manifest is validated strictly with kubernetes-validate (unknown
fields are errors), the properties that make the pod secure and working are
asserted per template, and the rendered sidecar config is handed to the real
``credential-sidecar check`` with the container's own command and arguments.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import trustme
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "charts" / "credential-sidecar"
RELEASE = "fin"
NAMESPACE = "mcp"
# Native sidecars (restartable init containers) are on by default from 1.29: the
# oldest version the default values target, and the newest schemas shipped.
KUBE_VERSIONS = ("1.29", kubernetes_validate.latest_version())
# Custom resources kubernetes-validate has no schema for; checked by hand below.
CRD_KINDS = {"ServiceMonitor"}

ROLE_ARN = "arn:aws:iam::123456789012:role/mcp-fininfo-sidecar"
POLYGON = {
    "url": "https://api.polygon.io",
    "secret": "mcp/polygon/{client_id}",
    "inject": {"query": "apiKey"},
    "clients": ["*"],
}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "file-backend": {
        "sidecar": {
            "secretsFile": {"existingSecret": "fininfo-keys"},
            "config": {"upstreams": {"polygon": POLYGON}},
        },
    },
    "aws-irsa": {
        "serviceAccount": {"irsaRoleArn": ROLE_ARN},
        "sidecar": {
            "config": {
                "secrets": {
                    "backend": "aws",
                    "aws": {"region": "us-east-1"},
                    "prefetch": ["agent-reporting"],
                },
                "tracing": {"otlp_endpoint": "http://otel-collector.observability:4318"},
                "upstreams": {
                    "polygon": POLYGON,
                    "internal": {
                        "url": "https://rates.internal.example.com",
                        "secret": "mcp/rates/{client_id}",
                        "secret_field": "token",
                        "inject": {"header": "Authorization", "format": "Bearer {secret}"},
                        "clients": ["agent-*"],
                        "allow_private": True,
                        "connect_to": "10.20.0.15:443",
                    },
                    # The same API again with a team key, route mode only.
                    "polygon-team": {**POLYGON, "secret": "mcp/polygon/team", "forward_proxy": False},
                },
            },
        },
        # Every optional object on, so each is rendered and validated at least once.
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "networkPolicy": {
            "enabled": True,
            "ingressFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}],
            "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        },
        "podDisruptionBudget": {"enabled": True},
        "replicaCount": 2,
    },
    "jwt-forward-proxy": {
        "app": {"useForwardProxy": True, "noProxy": [".svc", ".cluster.local"]},
        "sidecar": {
            "secretsFile": {"existingSecret": "fininfo-keys", "key": "keys.yaml"},
            "config": {
                "identity": {
                    "jwt": {
                        "issuer": "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_abc",
                        "jwks_url": "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_abc/.well-known/jwks.json",
                        "audience": None,
                        "algorithms": ["RS256"],
                        "client_id_claims": ["client_id", "sub"],
                        "leeway_seconds": 30,
                    },
                },
                "upstreams": {"polygon": POLYGON},
            },
        },
    },
    "jwt-two-issuers": {
        # Agents in one Cognito user pool, people on an in-house provider whose TLS
        # certificate comes from a private CA: its bundle, from a ConfigMap, is mounted
        # into the sidecar only and named by that entry's ca_file.
        "sidecar": {
            "secretsFile": {"existingSecret": "fininfo-keys"},
            "extraVolumeMounts": [{"name": "idp-ca", "mountPath": "/etc/credential-sidecar/idp-ca", "readOnly": True}],
            "config": {
                "identity": {
                    "jwt": [
                        {
                            "issuer": "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_agents",
                            "require_token_use": "access",
                            "client_id_claims": ["client_id"],
                        },
                        {
                            "issuer": "https://sso.corp.example/realms/people",
                            "audience": ["fininfo-mcp"],
                            "client_id_claims": ["sub"],
                            "required_claims": {"tenant": "acme", "email_verified": True},
                            "ca_file": "/etc/credential-sidecar/idp-ca/ca.crt",
                        },
                    ],
                },
                "upstreams": {"polygon": POLYGON},
            },
        },
        "extraVolumes": [{"name": "idp-ca", "configMap": {"name": "corp-root-ca"}}],
    },
    "mitm": {
        "app": {"useForwardProxy": True},
        "sidecar": {
            "secretsFile": {"existingSecret": "fininfo-keys"},
            "config": {
                "upstreams": {"polygon": POLYGON},
                "forward_proxy": {
                    "enabled": True,
                    "passthrough_hosts": ["files.pythonhosted.org"],
                    "mitm": {"enabled": True},
                },
            },
        },
    },
    "vault-kubernetes": {
        # Vault's kubernetes auth method: the sidecar logs in with a projected token of
        # the pod's ServiceAccount; the app gets no token.
        "sidecar": {
            "vaultToken": {"audience": "vault"},
            "config": {
                "secrets": {
                    "backend": "vault",
                    "vault": {
                        "address": "https://vault.vault.svc:8200",
                        "namespace": "mcp",
                        "auth": {"method": "kubernetes", "role": "fininfo-sidecar"},
                    },
                },
                "upstreams": {"polygon": POLYGON},
            },
        },
    },
    "classic-sidecar": {
        "sidecar": {
            "native": False,
            "secretsFile": {"existingSecret": "fininfo-keys"},
            "config": {"upstreams": {"polygon": POLYGON}},
        },
    },
}

# ConfigMaps a value set mounts besides the chart's own, key -> a stand-in for its
# contents; a CA bundle must hold a real certificate, or check refuses its ca_file.
EXTRA_CONFIGMAPS: dict[str, dict[str, Any]] = {
    "corp-root-ca": {"ca.crt": lambda: trustme.CA().cert_pem.bytes().decode()},
}


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Render with Helm; template file name -> its manifests (NOTES.txt left out)."""
    rendered = chart.render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE)
    out: dict[str, list[dict[str, Any]]] = {}
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        docs = [doc for doc in yaml.safe_load_all(text) if doc]
        if docs:
            out[Path(path).name] = docs
    return out


def one(manifests: dict[str, list[dict[str, Any]]], template: str) -> dict[str, Any]:
    assert template in manifests, f"{template} rendered nothing"
    (doc,) = manifests[template]
    return doc


def pod_spec(manifests: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return one(manifests, "deployment.yaml")["spec"]["template"]["spec"]


def sidecar_container(spec: dict[str, Any]) -> dict[str, Any]:
    found = [c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "credential-sidecar"]
    assert len(found) == 1, "exactly one credential-sidecar container"
    return found[0]


def app_container(spec: dict[str, Any]) -> dict[str, Any]:
    (app,) = [c for c in spec["containers"] if c["name"] == "mcp-server"]
    return app


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def sidecar_config(manifests: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return yaml.safe_load(one(manifests, "configmap.yaml")["data"]["config.yaml"])


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def value_set(request: pytest.FixtureRequest, chart: helm.Chart) -> tuple[str, dict[str, list[dict[str, Any]]]]:
    return request.param, render(chart, VALUE_SETS[request.param])


# --------------------------------------------------------------------------- whole chart


def test_lint_is_clean_for_every_value_set() -> None:
    for name, values in VALUE_SETS.items():
        report = helm.lint(CHART_DIR, copy.deepcopy(values), strict=True, namespace=NAMESPACE, kube_version="v1.29.0")
        assert report["errors"] == [], name
        # Severity 1 is INFO ("icon is recommended"); warnings and errors fail.
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], name


def test_every_manifest_validates_strictly(value_set: tuple[str, dict[str, list[dict[str, Any]]]]) -> None:
    name, manifests = value_set
    kinds = set()
    for template, docs in manifests.items():
        for doc in docs:
            kinds.add(doc["kind"])
            if doc["kind"] in CRD_KINDS:
                continue
            for version in KUBE_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    where = ".".join(str(p) for p in exc.path)
                    pytest.fail(f"{name}: {template} invalid for Kubernetes {version} at {where}: {exc.message}")
    assert {"ConfigMap", "Deployment", "ServiceAccount", "Service"} <= kinds


def test_wrong_value_types_fail_the_schema(chart: helm.Chart) -> None:
    wrong = [
        ({"app": {"port": "eighty"}}, "/app/port"),
        ({"sidecar": {"native": "yes"}}, "/sidecar/native"),
        ({"replicaCount": "2"}, "/replicaCount"),
        ({"sidecar": {"config": {"workers": "4"}}}, "/sidecar/config/workers"),
        ({"sidecar": {"config": {"secrets": {"backend": "hashicorp"}}}}, "/sidecar/config/secrets/backend"),
        (
            {"sidecar": {"config": {"secrets": {"vault": {"auth": {"method": "ldap"}}}}}},
            "/sidecar/config/secrets/vault/auth/method",
        ),
        ({"sidecar": {"vaultToken": {"expirationSeconds": 60}}}, "/sidecar/vaultToken/expirationSeconds"),
        (
            {"sidecar": {"config": {"upstreams": {"polygon": {**POLYGON, "injct": {}}}}}},
            "/sidecar/config/upstreams/polygon",
        ),
        (
            {"sidecar": {"config": {"upstreams": {"polygon": {**POLYGON, "connect_to": 8443}}}}},
            "/sidecar/config/upstreams/polygon/connect_to",
        ),
        (
            {"sidecar": {"config": {"upstreams": {"polygon": {**POLYGON, "connect_to": "10.0.0.5"}}}}},
            "/sidecar/config/upstreams/polygon/connect_to",
        ),
        (
            {"sidecar": {"config": {"upstreams": {"polygon": {**POLYGON, "forward_proxy": "no"}}}}},
            "/sidecar/config/upstreams/polygon/forward_proxy",
        ),
        (
            {"sidecar": {"config": {"identity": {"jwt": {"issuer": "https://idp", "algorithms": ["HS256"]}}}}},
            "algorithms",
        ),
        ({"serviceAccount": {"irsaRoleArn": "my-role"}}, "/serviceAccount/irsaRoleArn"),
        ({"unknownTopLevel": True}, "unknownTopLevel"),
    ]
    for values, where in wrong:
        with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(values)


def test_impossible_combinations_fail_with_the_value_to_change(chart: helm.Chart) -> None:
    cases = [
        ({"sidecar": {"config": {"upstreams": {"polygon": POLYGON}}}}, "sidecar.secretsFile.existingSecret"),
        (
            {"app": {"useForwardProxy": True}, "sidecar": {"config": {"forward_proxy": {"enabled": False}}}},
            "app.useForwardProxy",
        ),
        ({"serviceMonitor": {"enabled": True}, "service": {"enabled": False}}, "service.enabled"),
        (
            {"sidecar": {"config": {"forward_proxy": {"enabled": False, "mitm": {"enabled": True}}}}},
            "sidecar.config.forward_proxy.mitm.enabled",
        ),
        (  # the sidecar refuses this too (a crash-looping pod otherwise)
            {"sidecar": {"config": {"forward_proxy": {"enabled": False, "passthrough_hosts": ["github.com"]}}}},
            "sidecar.config.forward_proxy.passthrough_hosts",
        ),        (
            {"sidecar": {"config": {"secrets": {"backend": "vault", "vault": {"auth": {"role": "r"}}}}}},
            "sidecar.config.secrets.vault.address",
        ),
        (
            {"sidecar": {"config": {"secrets": {"backend": "vault", "vault": {"address": "https://v:8200"}}}}},
            "sidecar.config.secrets.vault.auth.role",
        ),
    ]
    for values, message in cases:
        with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
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
    # Each define follows a {{/* ... */}} comment, or is one of a commented block of paths.
    defines = re.findall(r"(\*/\}\}\n|\{\{- end \}\}\n)\{\{- define \"([^\"]+)\"", text)
    assert defines, "no helpers found"
    for before, name in defines:
        assert before.startswith("*/") or name.endswith(("Dir", "Path")), f"{name} has no comment"


def test_schema_covers_every_default(chart: helm.Chart) -> None:
    # The defaults themselves pass, and every values key is described in the schema.
    chart.validate_schema({})
    schema = chart.schema
    assert schema is not None

    def walk(values: dict[str, Any], node: dict[str, Any], path: str) -> None:
        props = node.get("properties", {})
        for key, value in values.items():
            assert key in props, f"{path}{key} is not in values.schema.json"
            if isinstance(value, dict) and value and props[key].get("properties"):
                walk(value, props[key], f"{path}{key}.")

    walk(chart.values, schema, "")


# --------------------------------------------------------------------------- deployment.yaml


def test_deployment_secures_both_containers(value_set: tuple[str, dict[str, list[dict[str, Any]]]]) -> None:
    _, manifests = value_set
    spec = pod_spec(manifests)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    for container in (sidecar_container(spec), app_container(spec)):
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc["runAsUser"] != 0
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


def test_deployment_runs_a_native_sidecar_by_default(chart: helm.Chart) -> None:
    spec = pod_spec(render(chart, VALUE_SETS["defaults"]))
    (init,) = spec["initContainers"]
    assert init["name"] == "credential-sidecar"
    assert init["restartPolicy"] == "Always"
    assert [c["name"] for c in spec["containers"]] == ["mcp-server"]
    # Separate UIDs: the app owns nothing the sidecar writes.
    assert init["securityContext"]["runAsUser"] != spec["containers"][0]["securityContext"]["runAsUser"]


def test_deployment_runs_a_classic_sidecar_when_asked(chart: helm.Chart) -> None:
    spec = pod_spec(render(chart, VALUE_SETS["classic-sidecar"]))
    assert "initContainers" not in spec
    assert [c["name"] for c in spec["containers"]] == ["credential-sidecar", "mcp-server"]
    assert "restartPolicy" not in spec["containers"][0]


def test_deployment_probes_the_admin_port(value_set: tuple[str, dict[str, list[dict[str, Any]]]]) -> None:
    _, manifests = value_set
    sidecar = sidecar_container(pod_spec(manifests))
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert ports == {"proxy": 8080, "admin": 9901}
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    # Probes come from the kubelet on the pod IP: the admin listener must not be loopback.
    config = sidecar_config(manifests)
    assert config["admin_listen"] == "0.0.0.0:9901"
    assert config["listen"] == "127.0.0.1:8080"


def test_deployment_and_config_agree_on_moved_ports(chart: helm.Chart) -> None:
    manifests = render(chart, {"sidecar": {"ports": {"proxy": 15001, "admin": 15002}}, "app": {"port": 15001 + 2}})
    sidecar = sidecar_container(pod_spec(manifests))
    assert {p["name"]: p["containerPort"] for p in sidecar["ports"]} == {"proxy": 15001, "admin": 15002}
    config = sidecar_config(manifests)
    assert (config["listen"], config["admin_listen"]) == ("127.0.0.1:15001", "0.0.0.0:15002")


def test_deployment_rolls_pods_when_the_config_changes(chart: helm.Chart) -> None:
    def checksum(values: dict[str, Any]) -> str:
        return one(render(chart, values), "deployment.yaml")["spec"]["template"]["metadata"]["annotations"][
            "checksum/config"
        ]

    base = checksum(VALUE_SETS["file-backend"])
    assert re.fullmatch(r"[0-9a-f]{64}", base)
    assert base == checksum(VALUE_SETS["file-backend"])
    changed = copy.deepcopy(VALUE_SETS["file-backend"])
    changed["sidecar"]["config"]["secrets"] = {"cache": {"ttl_seconds": 60}}
    assert checksum(changed) != base


def test_deployment_sets_proxy_env_only_in_forward_proxy_mode(chart: helm.Chart) -> None:
    plain = env_of(app_container(pod_spec(render(chart, VALUE_SETS["file-backend"]))))
    assert not {"HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "SSL_CERT_FILE"} & plain.keys()

    env = env_of(app_container(pod_spec(render(chart, VALUE_SETS["jwt-forward-proxy"]))))
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy"):
        assert env[name] == "http://127.0.0.1:8080"
    assert env["NO_PROXY"] == env["no_proxy"] == "localhost,127.0.0.1,::1,.svc,.cluster.local"
    assert "SSL_CERT_FILE" not in env


def test_deployment_shares_the_mitm_ca_through_an_emptydir(chart: helm.Chart) -> None:
    manifests = render(chart, VALUE_SETS["mitm"])
    spec = pod_spec(manifests)
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes["mitm-ca"]
    sidecar_mounts = {m["name"]: m for m in sidecar_container(spec)["volumeMounts"]}
    app = app_container(spec)
    app_mounts = {m["name"]: m for m in app["volumeMounts"]}
    ca_dir = "/var/run/credential-sidecar/ca"
    assert sidecar_mounts["mitm-ca"]["mountPath"] == ca_dir
    assert not sidecar_mounts["mitm-ca"].get("readOnly")
    assert app_mounts["mitm-ca"] == {"name": "mitm-ca", "mountPath": ca_dir, "readOnly": True}
    env = env_of(app)
    assert env["SSL_CERT_FILE"] == env["REQUESTS_CA_BUNDLE"] == f"{ca_dir}/ca.crt"
    assert env["HTTPS_PROXY"] == "http://127.0.0.1:8080"
    assert sidecar_config(manifests)["forward_proxy"]["mitm"] == {"enabled": True, "ca_cert_out": f"{ca_dir}/ca.crt"}


def test_deployment_mounts_an_existing_mitm_ca_without_its_key_in_the_app(chart: helm.Chart) -> None:
    values = copy.deepcopy(VALUE_SETS["mitm"])
    values["sidecar"]["mitmCA"] = {"existingSecret": "sidecar-ca"}
    manifests = render(chart, values)
    spec = pod_spec(manifests)
    volumes = {v["name"]: v for v in spec["volumes"]}
    # The key stays in the sidecar; the app gets what the sidecar writes: the CA plus
    # the public roots, so passthrough hosts still verify under SSL_CERT_FILE.
    assert volumes["mitm-ca-secret"]["secret"]["secretName"] == "sidecar-ca"
    assert "emptyDir" in volumes["mitm-ca"]
    assert "mitm-ca-secret" not in {m["name"] for m in app_container(spec)["volumeMounts"]}
    mitm = sidecar_config(manifests)["forward_proxy"]["mitm"]
    assert mitm["ca_key"] == "/etc/credential-sidecar/mitm-ca/tls.key"
    assert mitm["ca_cert_out"] == "/var/run/credential-sidecar/ca/ca.crt"


def test_deployment_mounts_the_keys_secret_read_only_into_the_sidecar_only(chart: helm.Chart) -> None:
    manifests = render(chart, VALUE_SETS["file-backend"])
    spec = pod_spec(manifests)
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["sidecar-keys"]["secret"]["secretName"] == "fininfo-keys"
    (mount,) = [m for m in sidecar_container(spec)["volumeMounts"] if m["name"] == "sidecar-keys"]
    assert mount["readOnly"] is True
    # A directory mount, not subPath: a rotated Secret must reach the file backend.
    assert "subPath" not in mount
    assert "sidecar-keys" not in {m["name"] for m in app_container(spec)["volumeMounts"]}
    assert sidecar_config(manifests)["secrets"]["file"]["path"] == "/etc/credential-sidecar/secrets/keys.yaml"


def test_deployment_mounts_extra_volumes_into_the_sidecar_only(chart: helm.Chart) -> None:
    manifests = render(chart, VALUE_SETS["jwt-two-issuers"])
    spec = pod_spec(manifests)
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["idp-ca"] == {"name": "idp-ca", "configMap": {"name": "corp-root-ca"}}
    mounts = {m["name"]: m for m in sidecar_container(spec)["volumeMounts"]}
    assert mounts["idp-ca"] == {"name": "idp-ca", "mountPath": "/etc/credential-sidecar/idp-ca", "readOnly": True}
    assert "idp-ca" not in {m["name"] for m in app_container(spec)["volumeMounts"]}
    # The chart's own mounts stay in place beside the extra one.
    assert {"sidecar-config", "sidecar-tmp", "sidecar-keys"} <= mounts.keys()


# --------------------------------------------------------------------------- configmap.yaml


def test_configmap_renders_structured_values(chart: helm.Chart) -> None:
    aws = sidecar_config(render(chart, VALUE_SETS["aws-irsa"]))
    assert aws["secrets"]["backend"] == "aws"
    assert aws["secrets"]["aws"] == {"region": "us-east-1", "version_stage": "AWSCURRENT"}
    assert "file" not in aws["secrets"]
    assert aws["secrets"]["prefetch"] == ["agent-reporting"]
    assert aws["secrets"]["cache"]["ttl_seconds"] == 300
    assert aws["secrets"]["lookup_timeout_seconds"] == 5
    assert set(aws["upstreams"]) == {"polygon", "internal", "polygon-team"}
    assert aws["upstreams"]["internal"]["inject"] == {"header": "Authorization", "format": "Bearer {secret}"}
    assert aws["upstreams"]["internal"]["connect_to"] == "10.20.0.15:443"
    assert aws["upstreams"]["polygon-team"]["forward_proxy"] is False
    assert aws["tracing"] == {
        "otlp_endpoint": "http://otel-collector.observability:4318", "service_name": "credential-sidecar",
        "timeout_seconds": 5, "client_id": False,
    }

    jwt = sidecar_config(render(chart, VALUE_SETS["jwt-forward-proxy"]))["identity"]
    assert jwt["header"] == "X-Client-Id"
    assert jwt["jwt"]["issuer"].startswith("https://cognito-idp.")
    assert jwt["jwt"]["client_id_claims"] == ["client_id", "sub"]


def test_configmap_renders_a_list_of_issuers(chart: helm.Chart) -> None:
    jwt = sidecar_config(render(chart, VALUE_SETS["jwt-two-issuers"]))["identity"]["jwt"]
    assert [entry["issuer"] for entry in jwt] == [
        "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_agents",
        "https://sso.corp.example/realms/people",
    ]
    assert jwt[1]["required_claims"] == {"tenant": "acme", "email_verified": True}
    assert jwt[1]["ca_file"] == "/etc/credential-sidecar/idp-ca/ca.crt"


def test_configmap_raw_override_replaces_the_rendered_config(chart: helm.Chart) -> None:
    raw = "listen: 127.0.0.1:8080\nadmin_listen: 0.0.0.0:9901\nupstreams: {}\n"
    manifests = render(chart, {"sidecar": {"rawConfig": raw}})
    assert one(manifests, "configmap.yaml")["data"]["config.yaml"].strip() == raw.strip()


# --------------------------------------------------------------------------- serviceaccount.yaml


def test_serviceaccount_carries_the_irsa_role(chart: helm.Chart) -> None:
    sa = one(render(chart, VALUE_SETS["aws-irsa"]), "serviceaccount.yaml")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == ROLE_ARN
    assert sa["automountServiceAccountToken"] is False
    deployment = one(render(chart, VALUE_SETS["aws-irsa"]), "deployment.yaml")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    # Only the sidecar gets the role: the EKS webhook skips the app container.
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["eks.amazonaws.com/skip-containers"] == "mcp-server"

    plain = one(render(chart, {}), "serviceaccount.yaml")
    assert "annotations" not in plain["metadata"]
    assert "serviceaccount.yaml" not in render(chart, {"serviceAccount": {"create": False}})


# ------------------------------------------------- service, servicemonitor, networkpolicy, pdb


def test_service_exposes_the_mcp_server_and_never_the_data_plane(chart: helm.Chart) -> None:
    plain = one(render(chart, {}), "service.yaml")
    assert [(p["name"], p["targetPort"]) for p in plain["spec"]["ports"]] == [("http", "http")]
    monitored = one(render(chart, VALUE_SETS["aws-irsa"]), "service.yaml")
    assert [p["targetPort"] for p in monitored["spec"]["ports"]] == ["http", "admin"]
    assert "service.yaml" not in render(chart, {"service": {"enabled": False}})


def test_optional_objects_are_gated_by_enabled(chart: helm.Chart) -> None:
    defaults = render(chart, {})
    for template in ("servicemonitor.yaml", "networkpolicy.yaml", "poddisruptionbudget.yaml"):
        assert template not in defaults
    manifests = render(chart, VALUE_SETS["aws-irsa"])
    selector = one(manifests, "deployment.yaml")["spec"]["selector"]["matchLabels"]

    monitor = one(manifests, "servicemonitor.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"] == selector
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}
    ]

    policy = one(manifests, "networkpolicy.yaml")["spec"]
    assert policy["podSelector"]["matchLabels"] == selector
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["egress"][1]["to"][0]["ipBlock"]["except"] == ["169.254.169.254/32"]
    assert [p["port"] for p in policy["egress"][1]["ports"]] == [443]

    pdb = one(manifests, "poddisruptionbudget.yaml")["spec"]
    assert pdb == {"maxUnavailable": 1, "selector": {"matchLabels": selector}}


def test_notes_name_the_mode_and_warn_without_upstreams(chart: helm.Chart) -> None:
    notes = chart.render({}, name=RELEASE, namespace=NAMESPACE)["credential-sidecar/templates/NOTES.txt"]
    assert "native sidecar" in notes and "no upstreams are configured" in notes
    notes = chart.render(copy.deepcopy(VALUE_SETS["aws-irsa"]), name=RELEASE, namespace=NAMESPACE)[
        "credential-sidecar/templates/NOTES.txt"
    ]
    assert "Upstreams: internal, polygon" in notes and "WARNING" not in notes


# --------------------------------------------------------------------------- the binary accepts it


def _credential_sidecar() -> str | None:
    beside_python = Path(sys.executable).parent / "credential-sidecar"
    if beside_python.exists():
        return str(beside_python)
    return shutil.which("credential-sidecar")


def _materialize_pod_files(
    manifests: dict[str, list[dict[str, Any]]], sidecar: dict[str, Any], spec: dict[str, Any], root: Path
) -> dict[str, str]:
    """Lay the sidecar's volume mounts out under ``root``; returns mountPath -> local dir."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    configmap = one(manifests, "configmap.yaml")
    mapping = {}
    for mount in sidecar["volumeMounts"]:
        local = root / mount["mountPath"].lstrip("/")
        local.mkdir(parents=True, exist_ok=True)
        mapping[mount["mountPath"]] = str(local)
        volume = volumes[mount["name"]]
        if "configMap" in volume:
            name = volume["configMap"]["name"]
            if name == configmap["metadata"]["name"]:
                files = dict(configmap["data"])
            else:
                assert name in EXTRA_CONFIGMAPS, f"ConfigMap {name} has no stand-in in EXTRA_CONFIGMAPS"
                files = {key: make() for key, make in EXTRA_CONFIGMAPS[name].items()}
            for key, text in files.items():
                (local / key).write_text(text)
        elif "secret" in volume:
            # A stand-in for the Secret's contents: a keys file in the file backend's format.
            for item in volume["secret"].get("items", []):
                (local / item["path"]).write_text("mcp/polygon/alice: not-a-real-key\n")
    return mapping


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_the_sidecar_accepts_the_rendered_config(chart: helm.Chart, name: str, tmp_path: Path) -> None:
    manifests = render(chart, VALUE_SETS[name])
    spec = pod_spec(manifests)
    sidecar = sidecar_container(spec)
    command, args = sidecar["command"], sidecar["args"]
    # The chart runs the image's entrypoint explicitly; check takes the same arguments.
    assert command == ["credential-sidecar", "run"]
    mapping = _materialize_pod_files(manifests, sidecar, spec, tmp_path)
    executable = _credential_sidecar()
    if executable is None:
        pytest.skip("the credential-sidecar console script is not installed beside this Python or on PATH")

    def local(value: str) -> str:
        for mount_path, directory in mapping.items():
            if value.startswith(mount_path + "/"):
                return directory + value[len(mount_path) :]
        return value

    config_file = Path(local(args[args.index("--config") + 1]))
    # One pass over every in-pod path, so a replaced path is never rewritten again.
    mounts = "|".join(re.escape(m) for m in sorted(mapping, key=len, reverse=True))
    in_pod_path = re.compile(rf"(?<![\w/.-])(?:{mounts})/[\w/.-]*")
    config_file.write_text(in_pod_path.sub(lambda m: local(m.group(0)), config_file.read_text()))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SIDECAR_"))}
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    result = subprocess.run(
        [executable, "check", *command[2:], *[local(a) for a in args]],
        capture_output=True,
        text=True,
        env={**env, **{e["name"]: e["value"] for e in sidecar.get("env", []) if "value" in e}},
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"{name}: credential-sidecar check failed:\n{result.stdout}{result.stderr}"


# Each identity.jwt value: None when both Helm and the sidecar accept it, else what
# Helm's refusal says (the sidecar must refuse it too, naming the same place).
COGNITO = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_agents"
PEOPLE = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_people"
JWT_PARITY: dict[str, tuple[Any, str | None, str]] = {
    "one issuer": ({"issuer": COGNITO}, None, ""),
    "a list of issuers": (
        [{"issuer": COGNITO, "client_id_claims": ["client_id"]}, {"issuer": PEOPLE, "client_id_claims": ["sub"]}],
        None,
        "",
    ),
    "jwks_url without issuer": (
        {"jwks_url": f"{COGNITO}/.well-known/jwks.json"},
        "missing property 'issuer'",
        "identity.jwt.issuer",
    ),
    "a list entry without issuer": (
        [{"issuer": COGNITO}, {"jwks_url": f"{PEOPLE}/.well-known/jwks.json"}],
        "missing property 'issuer'",
        "identity.jwt[1].issuer",
    ),
    "an empty list": ([], "minItems", "identity.jwt"),
    "an unknown key in a list entry": ([{"issuer": COGNITO, "isuer": PEOPLE}], "'isuer' not allowed", "isuer"),
    "the same issuer twice": ([{"issuer": COGNITO}, {"issuer": COGNITO}], "jwt[1].issuer", "identity.jwt[1].issuer"),
    "two token headers": (
        [{"issuer": COGNITO}, {"issuer": PEOPLE, "header": "X-Id-Token"}],
        "same header",
        "same header",
    ),
    "http jwks_url for an https issuer": (
        {"issuer": COGNITO, "jwks_url": "http://127.0.0.1:9229/jwks.json"},
        "allow_http_jwks",
        "identity.jwt.jwks_url",
    ),
    "http jwks_url with allow_http_jwks false": (
        {"issuer": COGNITO, "jwks_url": "http://127.0.0.1:9229/jwks.json", "allow_http_jwks": False},
        "allow_http_jwks",
        "identity.jwt.jwks_url",
    ),
    "http jwks_url allowed": (
        {"issuer": COGNITO, "jwks_url": "http://127.0.0.1:9229/jwks.json", "allow_http_jwks": True},
        None,
        "",
    ),
    "http issuer and http jwks_url": (
        {"issuer": "http://127.0.0.1:9229/us-east-1_local", "jwks_url": "http://127.0.0.1:9229/jwks.json"},
        None,
        "",
    ),
    "required claims of each type": (
        {"issuer": COGNITO, "required_claims": {"custom:tenant": "acme", "email_verified": True, "level": 3}},
        None,
        "",
    ),
    "a required claim that is a number with a fraction": (
        {"issuer": COGNITO, "required_claims": {"level": 1.5}},
        "required_claims/level",
        "identity.jwt.required_claims.level",
    ),
    "pinning iss": (
        {"issuer": COGNITO, "required_claims": {"iss": COGNITO}},
        "invalid propertyName 'iss'",
        "identity.jwt.required_claims.iss",
    ),
}


@pytest.mark.parametrize("case", sorted(JWT_PARITY))
def test_schema_and_sidecar_agree_on_identity_jwt(chart: helm.Chart, case: str, tmp_path: Path) -> None:
    jwt, helm_says, sidecar_says = JWT_PARITY[case]
    values = {"sidecar": {"config": {"identity": {"jwt": jwt}}}}
    if helm_says is None:
        assert sidecar_config(render(chart, values))["identity"]["jwt"] == jwt
    else:
        with pytest.raises((helm.HelmValuesError, helm.HelmRenderError), match=re.escape(helm_says)):
            chart.render(copy.deepcopy(values), name=RELEASE, namespace=NAMESPACE)

    executable = _credential_sidecar()
    if executable is None:
        pytest.skip("the credential-sidecar console script is not installed beside this Python or on PATH")
    # What the chart renders, with identity.jwt copied as is (as configFile does).
    config = sidecar_config(render(chart, {}))
    config["identity"]["jwt"] = jwt
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SIDECAR_"))}
    result = subprocess.run(
        [executable, "check", "--config", str(config_file)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    if helm_says is None:
        assert result.returncode == 0, f"{case}: Helm accepts it, the sidecar does not:\n{output}"
    else:
        assert result.returncode == 2, f"{case}: Helm refuses it, the sidecar does not:\n{output}"
        assert sidecar_says in output, output


def test_vault_kubernetes_login_uses_a_projected_token_in_the_sidecar_only(chart: helm.Chart) -> None:
    manifests = render(chart, VALUE_SETS["vault-kubernetes"])
    spec = pod_spec(manifests)
    assert spec["automountServiceAccountToken"] is False  # the app gets no token of the pod's
    (volume,) = [v for v in spec["volumes"] if v["name"] == "vault-token"]
    (source,) = volume["projected"]["sources"]
    assert source["serviceAccountToken"] == {"path": "token", "expirationSeconds": 3600, "audience": "vault"}
    mounts = {m["name"]: m for m in sidecar_container(spec)["volumeMounts"]}
    assert mounts["vault-token"]["readOnly"] is True
    assert "vault-token" not in {m["name"] for m in app_container(spec)["volumeMounts"]}
    vault = sidecar_config(manifests)["secrets"]["vault"]
    assert vault == {
        "address": "https://vault.vault.svc:8200", "namespace": "mcp", "mount": "secret",
        "auth": {"method": "kubernetes", "role": "fininfo-sidecar",
                 "jwt_file": mounts["vault-token"]["mountPath"] + "/token"},
    }


def test_vault_with_no_method_named_is_the_sidecars_default_kubernetes_login(chart: helm.Chart) -> None:
    """A null method drops the chart's value: the sidecar then logs in by kubernetes, so the chart projects for it."""
    values = copy.deepcopy(VALUE_SETS["vault-kubernetes"])
    values["sidecar"]["config"]["secrets"]["vault"]["auth"] = {"method": None, "role": "fininfo-sidecar"}
    manifests = render(chart, values)
    mounts = {m["name"]: m for m in sidecar_container(pod_spec(manifests))["volumeMounts"]}
    assert sidecar_config(manifests)["secrets"]["vault"]["auth"] == {
        "role": "fininfo-sidecar", "jwt_file": mounts["vault-token"]["mountPath"] + "/token",
    }
    values["sidecar"]["config"]["secrets"]["vault"]["auth"] = {"method": None}
    with pytest.raises(helm.HelmRenderError, match=re.escape(
        "sidecar.config.secrets.vault.auth.role: the Vault role to log in as is required with method kubernetes"
    )):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_vault_with_a_token_file_of_its_own_projects_nothing(chart: helm.Chart) -> None:
    values = copy.deepcopy(VALUE_SETS["vault-kubernetes"])
    values["sidecar"]["config"]["secrets"]["vault"]["auth"] = {
        "method": "approle", "role_id": "6a1c...", "secret_id_file": "/etc/vault/secret-id",
    }
    manifests = render(chart, values)
    assert "vault-token" not in {v["name"] for v in pod_spec(manifests)["volumes"]}
    assert sidecar_config(manifests)["secrets"]["vault"]["auth"] == {
        "method": "approle", "role_id": "6a1c...", "secret_id_file": "/etc/vault/secret-id",
    }
