"""``python -m shared_core``: the same as the ``rain`` console script."""

from shared_core.cli import main

raise SystemExit(main())
