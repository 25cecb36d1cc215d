"""The exit statuses of the `convertr-watcher` commands: each number is written here and only here.

The CLI maps errors to them, and the commands it runs (the daemon, the demo) return them.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
# A command line that makes no sense; argparse exits 2 for the mistakes it catches itself.
EXIT_USAGE = 2
# Another process holds the state file's write lock. 75 is EX_TEMPFAIL: nothing is wrong with this
# process or its config, and the same command succeeds once the holder ends. Distinct from 1 so a
# script can tell "try later" from a failure, and not in RestartPreventExitStatus, so the unit
# retries on its restart schedule and starts once a manual `once` (a backfill) has finished.
EXIT_LOCKED = 75
# EX_CONFIG: the configuration (or anything else only the operator can fix) is wrong. systemd's
# RestartPreventExitStatus=78 keeps the unit from restart-looping on it.
EXIT_CONFIG = 78
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C
