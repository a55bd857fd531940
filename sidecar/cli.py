"""The thin command line: ``run|check [--config FILE]``, ``webhook --config FILE``, ``oauth login``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sidecar import __version__
from sidecar.buildinfo import build
from sidecar.config import Settings, load_settings
from sidecar.errors import ConfigError
from sidecar.summary import describe

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="credential-sidecar",
        description="Inject each MCP client's API key into outbound calls; refuse every other destination.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__} ({build()})")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("run", "start the data plane and the admin listener"),
        ("check", "validate the config file and print a summary"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument(
            "--config",
            default=os.environ.get("SIDECAR_CONFIG"),
            help="config file (default: $SIDECAR_CONFIG)",
        )
    text = "serve the admission webhook that injects the sidecar into annotated pods"
    webhook = sub.add_parser("webhook", help=text, description=text)
    webhook.add_argument("--config", required=True, help="the webhook's config file")
    webhook.add_argument("--check", action="store_true", help="validate the config file, print a summary and exit")
    _oauth_parser(sub)
    return parser


def _webhook(config: str, check_only: bool) -> int:
    # The webhook shares nothing with the data plane: its own settings, its own server.
    from sidecar.webhook.server import run
    from sidecar.webhook.settings import load_webhook_settings

    try:
        settings = load_webhook_settings(config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    if check_only:
        print(f"listen: {settings.listen} (HTTPS: {settings.tls_cert}, {settings.tls_key})")
        print(f"image: {settings.image} ({settings.image_pull_policy})")
        print(f"default_config_map: {settings.default_config_map or '(none: pods must name one)'}")
        print("config OK")
        return 0
    return run(settings)


def _oauth_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``oauth login``: a user's grant for an oauth2_refresh_token upstream, stored in the configured backend."""
    oauth = sub.add_parser("oauth", help="OAuth grants for oauth2_refresh_token upstreams")
    actions = oauth.add_subparsers(dest="oauth_command", required=True)
    text = "grant access once in a browser (authorization code + PKCE) and store the refresh token"
    p = actions.add_parser("login", help=text, description=text)
    p.add_argument("--config", default=os.environ.get("SIDECAR_CONFIG"), help="config file (default: $SIDECAR_CONFIG)")
    p.add_argument("--upstream", required=True, metavar="NAME", help="an upstream of type oauth2_refresh_token")
    p.add_argument("--client", required=True, metavar="ID", help="the client ID whose grant this is")
    p.add_argument("--port", type=int, default=0, metavar="P", help="the redirect's port (default: a free one)")
    p.add_argument(
        "--timeout", type=float, default=300.0, metavar="SECONDS",
        help="how long to wait for the browser's redirect (default: 300)",
    )


def _load(config: str | None) -> tuple[Settings, Path] | None:
    if not config:
        print("error: no config file: pass --config FILE or set SIDECAR_CONFIG", file=sys.stderr)
        return None
    try:
        return load_settings(config), Path(config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script and ``python -m sidecar``."""
    args = _parser().parse_args(argv)
    if args.command == "webhook":
        return _webhook(args.config, args.check)
    loaded = _load(args.config)
    if loaded is None:
        return EXIT_CONFIG
    settings, path = loaded
    if args.command == "oauth":
        from sidecar.oauth_login import run_login  # aiohttp's server and the flow: only for this command

        return run_login(settings, args.upstream, args.client, args.port, args.timeout)
    if args.command == "check":
        print(describe(settings))
        for warning in settings.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        count = len(settings.warnings)
        print("config OK" + (f" ({count} warning{'s' if count > 1 else ''})" if count else ""))
        return 0
    from sidecar.workers import WorkerRole, prepare_multiprocess_metrics, supervise

    worker = WorkerRole.from_env()
    if worker is None and settings.workers > 1:
        prepare_multiprocess_metrics()  # before prometheus_client is first imported
        return supervise(settings, path)
    if worker is not None:
        # Several processes share stdout: whole lines only, so access lines never interleave.
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    from sidecar.app import run

    return run(settings, path, worker)
