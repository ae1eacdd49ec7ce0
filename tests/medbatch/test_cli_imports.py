"""``medbatch`` starts without the heavy libraries: each command imports the services it calls,
and the services import matplotlib, RDKit, pynetdicom, Alembic … only where they are used. A
new process is measured from the command to done (benchmarks.ehr), so what ``import
medbatch.cli`` loads is paid by every command, ``--help`` included."""

from __future__ import annotations

import json
import subprocess
import sys

#: Never loaded by ``import medbatch.cli`` (each is a tenth of a second or more to import).
HEAVY = (
    "matplotlib",
    "rdkit",
    "pynetdicom",
    "pydicom",
    "highdicom",
    "alembic",
    "PIL",
    "celery",
    "sqlalchemy",
    "medbatch.reports",
    "medbatch.stack.embedded",
)


def _loaded_after(code: str) -> set[str]:
    """Top-level packages and medbatch modules in ``sys.modules`` after running ``code`` in a
    fresh interpreter (this process has imported half the project already)."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    return set(json.loads(result.stdout.splitlines()[-1]))


def _heavy_in(modules: set[str]) -> list[str]:
    return sorted(h for h in HEAVY if h in modules or any(m.startswith(h + ".") for m in modules))


def test_importing_the_cli_loads_no_heavy_library() -> None:
    assert _heavy_in(_loaded_after("import medbatch.cli")) == []


def test_the_ehr_command_path_draws_nothing() -> None:
    """What ``medbatch ehr FILE`` imports (submit, follow, the summary table) has no report,
    drawing or DICOM library in it."""
    modules = _loaded_after(
        "import medbatch.cli\n"
        "from medbatch.services.ehr import extract_progress, extract_summary, submit_extract\n"
        "import ingest.ehr.submit, workers.dispatch  # what submit_extract imports when called"
    )
    drawn = {"matplotlib", "rdkit", "pynetdicom", "pydicom", "highdicom", "PIL"}
    assert sorted(h for h in _heavy_in(modules) if h in drawn) == []
    assert "pyarrow" not in modules  # the worker reads the extract, not the submitter
