"""Build hook: with SIDECAR_COMPILE=1, compile the data plane's modules to C with mypyc.

Everything else lives in pyproject.toml. By default nothing is compiled and the
package is pure Python. With ``SIDECAR_COMPILE=1`` the modules on the request
path are compiled by mypyc (part of mypy, which already type-checks them
strictly); the same source then runs as C extension modules, about 15% less
CPU per proxied request (bench/RESULTS.md). The container image is built this
way. The .py files stay in the package, and a module that was not compiled
simply runs as Python.

    SIDECAR_COMPILE=1 pip install .              # a compiled install
    bash scripts/compile.sh                      # compile in place (tests, bench)
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup

#: The request path: what every proxied request runs through. The rest (config,
#: startup, workers, CONNECT, the AWS client) is cold and stays Python.
COMPILED = [
    "sidecar/fastserver.py",
    "sidecar/fastclient.py",
    "sidecar/proxy.py",
    "sidecar/access_log.py",
    "sidecar/identity.py",
    "sidecar/inject.py",
    "sidecar/policy.py",
    "sidecar/metrics.py",
    "sidecar/tokens.py",
    "sidecar/secrets/cache.py",
]

#: setup.py commands that build; the others (egg_info, dist_info) only read metadata.
BUILDING = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install"}


def extensions() -> list[Extension]:
    if os.environ.get("SIDECAR_COMPILE", "0") != "1":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError as exc:
        if not BUILDING.intersection(sys.argv):
            return []  # pip asking what the build needs (scripts/build_backend.py adds mypy)
        raise SystemExit("SIDECAR_COMPILE=1 needs mypy (which includes mypyc) in the build environment") from exc
    return mypycify(COMPILED, opt_level="3", group_name="sidecar._compiled")


setup(ext_modules=extensions())
