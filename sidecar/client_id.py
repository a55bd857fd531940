"""The client ID pattern: the one source of what a client ID may be.

A client ID becomes part of a secret's name, so it may not hold ``/``, ``..``, an
ARN's ``:`` or anything beyond 128 characters. The refusal's message (errors.py),
the settings' checks (config.py) and the request path (identity/base.py) read it here;
tests/unit/test_client_id.py checks the chart's schema and the docs against it.
"""

from __future__ import annotations

import re

CLIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+=-]{0,127}")
