"""`python -m sidecar` is the same as `credential-sidecar`."""

from sidecar.cli import main

raise SystemExit(main())
