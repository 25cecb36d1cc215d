"""Suite-wide set-up: every log line any test or subprocess renders is also written to one file.

`test_zz_log_secrets.py` (collected last) scans that file for every secret the suite uses.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from watcher.logs import LOG_CAPTURE_ENV

CAPTURE = Path(tempfile.mkdtemp(prefix="watcher-logs-")) / "lines.jsonl"
os.environ[LOG_CAPTURE_ENV] = str(CAPTURE)
