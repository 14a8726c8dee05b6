"""`python -m proxy` is the same as the `resilience-proxy` console script."""

from proxy.cli import main

raise SystemExit(main())
