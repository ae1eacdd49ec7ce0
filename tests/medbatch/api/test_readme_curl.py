"""The README's curl example, run as written against the real server: a token from the CLI, a
library submitted, the job polled to its end, its results fetched as CSV."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from core.settings import REPO_ROOT
from medbatch.stack.worker_process import settings_env
from tests.helpers import unique_valid, write_smi
from tests.medbatch.api.conftest import Api

pytestmark = [pytest.mark.server]


def _example() -> str:
    readme = (REPO_ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```sh\n(.*?)```", readme, re.S) if "curl" in b)
    assert "API=http://127.0.0.1:8080" in block and "samples/library.smi" in block
    return block


def test_the_readme_curl_example_runs(
    api: Api, nci_smiles: list[tuple[str, str]], tmp_path: Path
) -> None:
    assert shutil.which("curl"), "curl is needed (Debian package curl)"
    # The same commands; only where the server is, the CLI and the file differ (molecules no
    # other test scores, so the session's other tests still find theirs unscored).
    library = write_smi(
        tmp_path / "library.smi",
        [f"{smi}\t{name}" for smi, name, _ in unique_valid(nci_smiles, 25, skip=4300)],
    )
    script = (
        _example()
        .replace("API=http://127.0.0.1:8080", f"API={api.url}")
        .replace(".venv/bin/medbatch", str(REPO_ROOT / ".venv" / "bin" / "medbatch"))
        .replace("samples/library.smi", str(library))
    )
    done = subprocess.run(
        ["bash", "-eu", "-c", script],
        cwd=tmp_path,
        env=settings_env(api.settings),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with (tmp_path / "results.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 25 and all(r["status"] == "scored" for r in rows), rows[:3]
