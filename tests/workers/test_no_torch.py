"""Workers speak to Triton; they must never pull torch (or torch-geometric) into their process."""

from __future__ import annotations

import subprocess
import sys


def test_worker_modules_do_not_import_torch() -> None:
    code = (
        "import sys, workers.celery_app, workers.chem.tasks, workers.sweeper, ingest.chem.submit;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torch_geometric'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
