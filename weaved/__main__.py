"""``python -m weaved``: the same as the ``weaved`` console script."""

from weaved.cli import main

raise SystemExit(main())
