"""`python -m watcher` runs the same CLI as the `convertr-watcher` script."""

from watcher.cli import main

raise SystemExit(main())
