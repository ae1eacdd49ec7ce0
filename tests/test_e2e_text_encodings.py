"""Files as Windows tools write them (UTF-8 byte-order mark, CRLF, gzip, UTF-16) go through
``medbatch screen`` / ``medbatch ehr`` and the real stack and give the same results as the same
file in plain UTF-8."""

from __future__ import annotations

import codecs
import csv
import gzip
from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from core.job_kinds import JobKind
from core.settings import Settings
from db.models import Job, JobState
from db.session import session_scope
from ingest.files import file_sha256
from medbatch.cli import app
from medbatch.stack.embedded import EmbeddedStack
from medbatch.synth.ehr import write_long_csv
from tests.helpers import unique_valid, wait_for_job

pytestmark = [pytest.mark.server]


def _windows(text: str, *, bom: bool = True, crlf: bool = True, utf16: bool = False) -> bytes:
    if crlf:
        text = text.replace("\n", "\r\n")
    if utf16:
        return codecs.BOM_UTF16_LE + text.encode("utf-16-le")
    return (codecs.BOM_UTF8 if bom else b"") + text.encode("utf-8")


def _job_for(settings: Settings, kind: JobKind, path: Path) -> int:
    sha = file_sha256(path)
    with session_scope(settings.database_url) as session:
        ids = [
            j.id
            for j in session.scalars(select(Job).where(Job.kind == kind.value))
            if j.params.get("file_sha256") == sha
        ]
    assert len(ids) == 1, (path.name, ids)
    return int(ids[0])


def _export(job_id: int, out: Path, keep: tuple[str, ...]) -> list[tuple[str, ...]]:
    result = CliRunner().invoke(app, ["results", str(job_id), "--out", str(out)])
    assert result.exit_code == 0, result.output
    with out.open(newline="") as fh:
        return [tuple(row[k] for k in keep) for row in csv.DictReader(fh)]


def test_screen_reads_bom_crlf_gzip_and_utf16_libraries_like_utf8(
    stack: EmbeddedStack, nci_smiles: list[tuple[str, str]], tmp_path: Path
) -> None:
    s = stack.settings
    valid = unique_valid(nci_smiles, 12, skip=900)
    text = "smiles,name\n" + "".join(f"{smi},{name}\n" for smi, name, _ in valid)
    text += "C1CC(,broken\n"
    plain = tmp_path / "plain" / "lib.csv"
    plain.parent.mkdir()
    plain.write_text(text, encoding="utf-8")
    variants = {
        "excel.csv": _windows(text),
        "excel.csv.gz": gzip.compress(_windows(text), mtime=0),
        "unicode.csv": _windows(text, utf16=True),
    }
    keep = ("line_no", "status", "canonical_smiles", "logS", "reason")
    runner = CliRunner()
    result = runner.invoke(app, ["screen", str(plain), "--timeout", "300"])
    assert result.exit_code == 0, result.output
    expected = _export(_job_for(s, JobKind.CHEM_SCREEN, plain), tmp_path / "plain.csv", keep)
    assert [r[1] for r in expected].count("scored") == 12
    for name, data in variants.items():
        path = tmp_path / name
        path.write_bytes(data)
        result = runner.invoke(app, ["screen", str(path), "--timeout", "300"])
        assert result.exit_code == 0, (name, result.output)
        job_id = _job_for(s, JobKind.CHEM_SCREEN, path)
        assert wait_for_job(s, job_id).state == JobState.DONE.value
        assert _export(job_id, tmp_path / f"{name}.out.csv", keep) == expected, name

    # A .smi with a byte-order mark: the first molecule is a molecule, not "\ufeffCCO".
    smi = tmp_path / "bom.smi"
    smi.write_bytes(_windows("CCO ethanol\nc1ccccc1 benzene\n", crlf=False))
    result = runner.invoke(app, ["screen", str(smi), "--timeout", "300"])
    assert result.exit_code == 0, result.output
    rows = _export(_job_for(s, JobKind.CHEM_SCREEN, smi), tmp_path / "smi.csv", keep)
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("1", "scored", "CCO"),
        ("2", "scored", "c1ccccc1"),
    ]


def test_ehr_reads_a_bom_crlf_gzipped_extract_like_utf8(
    stack: EmbeddedStack, tmp_path: Path
) -> None:
    s = stack.settings
    plain = tmp_path / "plain.csv"
    stats = write_long_csv(plain, 60, seed=19, messiness=0.05)
    assert stats.broken_rows > 0
    windows = tmp_path / "excel.csv.gz"
    windows.write_bytes(gzip.compress(_windows(plain.read_text(encoding="utf-8")), mtime=0))
    keep = ("patient_id", "status", "diabetes_risk", "cvd_risk", "line_no", "reason")
    exports = []
    for path in (plain, windows):
        result = CliRunner().invoke(app, ["ehr", str(path), "--timeout", "300"])
        assert result.exit_code == 0, result.output
        job_id = _job_for(s, JobKind.EHR_EXTRACT, path)
        job = wait_for_job(s, job_id, timeout=300)
        assert job.state == JobState.DONE.value, job.error
        assert job.summary["rejected_rows"] == stats.broken_rows
        exports.append(_export(job_id, tmp_path / f"{path.name}.out.csv", keep))
    assert exports[0] == exports[1]
    assert len(exports[0]) > stats.broken_rows
