"""Build hook: with SIDECAR_COMPILE=1, compile the data plane's modules to C with mypyc.

Everything else lives in pyproject.toml. By default nothing is compiled and the
package is pure Python. With ``SIDECAR_COMPILE=1`` the modules listed below are
compiled by mypyc (part of mypy, which already type-checks them strictly); the
same source then runs as C extension modules, about 20% less CPU per proxied
request (bench/RESULTS.md). The container image is built this way. The .py files
stay in the package, and a module that was not compiled runs as Python.

    SIDECAR_COMPILE=1 pip install .              # a compiled install (needs gcc and Python's headers)
    bash scripts/compile.sh                      # compile in place (tests, bench)
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import Extension, setup

sys.path.insert(0, str(Path(__file__).resolve().parent / "scripts"))
from build_backend import compile_requested  # one reading of SIDECAR_COMPILE for the backend and the build

#: What a warm request runs through (identity/jwt_bearer in JWT mode), and
#: transport/failures.py (the lean client builds its refusals there). Left as Python:
#: upstream.py (one call a request), transport/aio.py (the aiohttp client and its pieces:
#: it defines an OSError and an aiohttp resolver subclass, which mypyc cannot compile as
#: native classes), and what runs at start, reload or per connection (config, app,
#: workers, connect, mitm, the secret backends, the identity and credential factories,
#: the credential Protocol), and the OAuth providers (credentials/oauth.py: a warm request
#: is one dict look-up there).
COMPILED = [
    "sidecar/listen/fast.py",
    "sidecar/listen/aio_exchange.py",
    "sidecar/transport/base.py",
    "sidecar/transport/fast.py",
    "sidecar/transport/failures.py",
    "sidecar/pipeline.py",
    "sidecar/routing.py",
    "sidecar/credentials/static.py",
    "sidecar/access_log.py",
    "sidecar/record.py",
    "sidecar/refusal.py",
    "sidecar/exchange.py",
    "sidecar/identity/base.py",
    "sidecar/identity/header.py",
    "sidecar/inject.py",
    "sidecar/policy.py",
    "sidecar/metrics.py",
    "sidecar/identity/jwt_bearer.py",
    "sidecar/secrets/cache.py",
]

#: setup.py commands that build; the others (egg_info, dist_info, sdist) only read metadata.
BUILDING = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


def extensions() -> list[Extension]:
    if not compile_requested() or not BUILDING.intersection(sys.argv):
        return []  # pure Python, or pip only asking for metadata (mypyc would type-check for nothing)
    try:
        from mypyc.build import mypycify
    except ImportError as exc:
        raise SystemExit("SIDECAR_COMPILE=1 needs mypy (which includes mypyc) in the build environment") from exc
    return mypycify(COMPILED, opt_level="3", group_name="sidecar._compiled")


setup(ext_modules=extensions())
