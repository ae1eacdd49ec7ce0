"""End to end with the real servers: a SMILES file with valid, invalid and duplicate rows goes
through ingest → Redis → Celery worker → Triton → database, and comes back as results."""

from __future__ import annotations

import csv
import math
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from db.audit import verify_chain
from db.models import AuditEvent, Compound, JobState, LibraryEntry, Rejection
from db.session import session_scope
from ingest.chem.submit import ScreenOptions, submit_library
from medbatch.cli import app
from medbatch.stack.embedded import EmbeddedStack
from tests.helpers import (
    chunk_jobs,
    predictions_for,
    unique_valid,
    wait_for_job,
    write_smi,
)
from workers.dispatch import publish

pytestmark = [pytest.mark.server]

INVALID = {
    "C1CC(": "syntax error",
    "c1ccccc": "unclosed ring",
    "C(C)(C)(C)(C)C": "Explicit valence for atom # 0 C, 5",
    "Xx": "syntax error",
    "C[N+](C)(C)(C)C": "Explicit valence for atom # 1 N, 5",
}


def test_library_is_scored_once_per_unique_molecule(
    stack: EmbeddedStack, nci_smiles: list[tuple[str, str]], tmp_path: Path
) -> None:
    settings = stack.settings
    valid = unique_valid(nci_smiles, 40)
    lines = [f"{smi}\t{name}" for smi, name, _ in valid]
    lines += [f"{bad}\tbad-{i}" for i, bad in enumerate(INVALID)]
    lines += [f"{valid[0][0]}\tdup-exact", "CCO\tethanol", "OCC\tethanol-again"]
    library = write_smi(tmp_path / "library.smi", lines)

    runner = CliRunner()
    result = runner.invoke(app, ["screen", str(library), "--timeout", "300"])
    assert result.exit_code == 0, result.output
    assert "duplicates in file" in result.output
    assert "no worker consumes" not in result.output  # the session's worker answered

    with session_scope(settings.database_url) as session:
        job_id = session.scalar(
            select(LibraryEntry.job_id).order_by(LibraryEntry.job_id.desc()).limit(1)
        )
    job = wait_for_job(settings, job_id)
    assert job.state == JobState.DONE.value, job.error
    n_unique = 40 + 1  # 40 NCI molecules + ethanol
    assert job.summary["rows"] == len(lines)
    assert job.summary["rejected"] == len(INVALID)
    assert job.summary["duplicates"] == 2
    assert job.summary["to_score"] + job.summary["already_scored"] == n_unique

    chunks = chunk_jobs(settings, job_id)
    assert len(chunks) == math.ceil(job.summary["to_score"] / settings.chem_chunk_size)
    assert all(c.state == JobState.DONE.value and c.attempts == 1 for c in chunks)

    preds = predictions_for(settings, job_id)
    assert len(preds) == job.summary["to_score"]
    assert len({p.compound_id for p in preds}) == len(preds), "a molecule was scored twice"
    values = [p.outputs["logS"] for p in preds]
    assert all(v is not None and -15 < v < 5 for v in values), values
    assert {p.model_name for p in preds} == {settings.chem_model_name}

    with session_scope(settings.database_url) as session:
        keys = set(session.scalars(select(Compound.inchikey)))
        assert {ik for _, _, ik in valid} <= keys
        rejections = {
            r.raw: r for r in session.scalars(select(Rejection).where(Rejection.job_id == job_id))
        }
        assert set(rejections) == set(INVALID)
        for raw, expected in INVALID.items():
            assert expected in rejections[raw].reason, rejections[raw].reason
            assert lines[rejections[raw].line_no - 2].startswith(raw)  # header is line 1
        dup_rows = session.scalars(
            select(LibraryEntry).where(
                LibraryEntry.job_id == job_id, LibraryEntry.duplicate_of_line.is_not(None)
            )
        ).all()
        assert sorted(d.record_name for d in dup_rows) == ["dup-exact", "ethanol-again"]
        actions = [
            a
            for (a,) in session.execute(
                select(AuditEvent.action).where(AuditEvent.subject == f"job:{job_id}")
            )
        ]
        assert actions[0] == "job.received" and actions[-1] == "job.done"
        chunk_actions = session.scalars(
            select(AuditEvent.action).where(AuditEvent.subject == f"job:{chunks[0].id}")
        ).all()
        assert chunk_actions == ["job.received", "job.queued", "job.running", "job.done"]
        report = verify_chain(session)
        assert report.ok, report

    out_csv = tmp_path / "results.csv"
    result = runner.invoke(app, ["results", str(job_id), "--out", str(out_csv)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == len(lines)
    assert [int(r["line_no"]) for r in rows] == sorted(int(r["line_no"]) for r in rows)
    statuses = [r["status"] for r in rows]
    assert statuses.count("rejected") == len(INVALID)
    rejected = [r for r in rows if r["status"] == "rejected"]
    assert [r["record_name"] for r in rejected] == [f"bad-{i}" for i in range(len(INVALID))]
    assert all(r["reason"] and r["input"] for r in rejected)
    assert statuses.count("duplicate") == 2
    assert statuses.count("scored") == n_unique
    assert all(r["logS"] for r in rows if r["status"] == "scored")

    out_parquet = tmp_path / "results.parquet"
    assert runner.invoke(app, ["results", str(job_id), "--out", str(out_parquet)]).exit_code == 0
    table = pq.read_table(out_parquet)
    assert table.num_rows == len(lines)

    report = tmp_path / "report.html"
    assert runner.invoke(app, ["report", str(job_id), "--out", str(report)]).exit_code == 0
    page = report.read_text()
    # The histogram (SVG) and the molecules at both ends, drawn with their atom contributions
    # by the explainer on the session's Triton (PNG similarity maps).
    assert page.count("<svg") >= 1 and page.count('<img src="data:image/png;base64,') == 16

    verify = runner.invoke(app, ["audit", "verify"])
    assert verify.exit_code == 0 and "intact" in verify.output

    # The worker's main process serves its pool children's Prometheus metrics.
    live = next(w for w in stack.workers if w.alive())
    metrics = _scrape(stack.metrics_ports[live.name])
    assert metrics['medbatch_items_scored_total{kind="chem_chunk"}'] >= len(preds)
    assert metrics['medbatch_chunks_total{kind="chem_chunk",outcome="done"}'] >= len(chunks)
    assert metrics['medbatch_triton_request_seconds_count{model="molecule_gnn"}'] >= len(chunks)


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


def test_resubmission_is_idempotent_and_dedup_spans_runs(
    stack: EmbeddedStack, nci_smiles: list[tuple[str, str]], tmp_path: Path
) -> None:
    settings = stack.settings
    first = unique_valid(nci_smiles, 20, skip=300)
    library = write_smi(tmp_path / "a.smi", [f"{s}\t{n}" for s, n, _ in first])
    a = submit_library(library, settings, publish)
    assert wait_for_job(settings, a.job_id).state == JobState.DONE.value
    assert len(predictions_for(settings, a.job_id)) == 20

    again = submit_library(library, settings, publish)
    assert again.existing and again.job_id == a.job_id

    # A second library sharing 10 molecules with the first: only the 10 new ones are scored.
    more = unique_valid(nci_smiles, 30, skip=300)
    other = write_smi(tmp_path / "b.smi", [f"{s}\t{n}" for s, n, _ in more[10:]])
    b = submit_library(other, settings, publish)
    done = wait_for_job(settings, b.job_id)
    assert done.state == JobState.DONE.value
    assert done.summary["already_scored"] == 10 and done.summary["to_score"] == 10
    assert len(predictions_for(settings, b.job_id)) == 10

    forced = submit_library(library, settings, publish, ScreenOptions(force=True))
    assert not forced.existing and forced.job_id != a.job_id
    assert wait_for_job(settings, forced.job_id).state == JobState.DONE.value
    assert len(predictions_for(settings, forced.job_id)) == 20
