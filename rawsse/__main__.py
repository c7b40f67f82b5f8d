"""``python -m rawsse`` → the same entry point as the ``rawsse`` console script."""

from rawsse.cli import main

raise SystemExit(main())
