"""A FHIR Bulk Data $export end to end with the real servers: ``medbatch ehr FOLDER`` → Redis → the
Celery worker (NDJSON streamed, Patients first, spilled by patient) → Triton → the database; every
defect rejected at its file and line, corrections and unknown codes counted; and the same cohort
scored from a long CSV and from a $export gets the same risks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from core.job_kinds import JobKind
from db.models import EhrScore, Job, JobState, Rejection
from db.session import session_scope
from ingest.ehr.reader import read_extract
from ingest.ehr.submit import extract_sha256
from medbatch.cli import app
from medbatch.stack.embedded import EmbeddedStack
from medbatch.synth.ehr import synth_patients, write_long_csv
from medbatch.synth.ehr_fhir import write_fhir_export
from tests.helpers import wait_for_job
from tests.test_e2e_ehr import GROWTH_BOUND_MB, MODELS, PEAK_RSS_BOUND_MB

pytestmark = [pytest.mark.server]


def _extract_job(settings: object, path: Path) -> int:
    sha = extract_sha256(path)
    with session_scope(settings.database_url) as session:  # type: ignore[attr-defined]
        jobs = [
            j
            for j in session.scalars(
                select(Job).where(Job.kind == JobKind.EHR_EXTRACT.value).order_by(Job.id)
            )
            if j.params.get("file_sha256") == sha
        ]
    assert len(jobs) == 1, f"{len(jobs)} extract jobs for {path.name}"
    return int(jobs[0].id)


def _score(stack: EmbeddedStack, path: Path, timeout: int = 300) -> Job:
    result = CliRunner().invoke(app, ["ehr", str(path), "--timeout", str(timeout)])
    assert result.exit_code == 0, result.output
    assert "patients scored" in result.output
    job = wait_for_job(stack.settings, _extract_job(stack.settings, path), timeout=timeout)
    assert job.state == JobState.DONE.value, job.error
    return job


def _risks(stack: EmbeddedStack, extract_id: int) -> dict[tuple[str, str], float | None]:
    with session_scope(stack.settings.database_url) as session:
        return {
            (s.patient_id, s.model_name): s.risk
            for s in session.scalars(select(EhrScore).where(EhrScore.extract_id == extract_id))
        }


def test_an_export_with_defects_is_scored_per_valid_patient(
    stack: EmbeddedStack, tmp_path: Path
) -> None:
    stats = write_fhir_export(
        tmp_path / "bulk-export", 150, seed=43, messiness=0.05, observations_per_file=2500
    )
    assert stats.broken_rows > 50 and len(stats.files) >= 3
    job = _score(stack, stats.path)
    expected: dict[str, int] = {}
    for block in read_extract(stats.path):
        for pid in block.patient_id.to_pylist():
            expected[pid] = expected.get(pid, 0) + 1
    risks = _risks(stack, job.id)
    assert {p for p, _ in risks} == set(expected)
    assert {m for _, m in risks} == MODELS and len(risks) == 2 * len(expected)

    with session_scope(stack.settings.database_url) as session:
        rejected = {
            r.line_no: (r.record_name, r.reason)
            for r in session.scalars(select(Rejection).where(Rejection.job_id == job.id))
        }
    with stats.defects_path.open() as fh:
        defects = {int(r["line"]): r for r in csv.DictReader(fh)}
    assert {n: k for n, (k, _) in rejected.items()} == {n: d["kind"] for n, d in defects.items()}
    for n, (_, reason) in rejected.items():
        assert reason.startswith(f"{defects[n]['file']}, line {int(defects[n]['file_line']):,}: ")
    summary = job.summary
    assert summary["rejected_rows"] == stats.broken_rows
    assert summary["accepted_rows"] == stats.measurements
    assert summary["skipped"] == stats.skipped
    assert summary["unknown_codes"] == stats.unknown_codes
    assert summary["fhir"]["observations_accepted"] == stats.valid_rows
    assert summary["fhir"]["patients"] == stats.patients

    out = tmp_path / "results.csv"
    result = CliRunner().invoke(app, ["results", str(job.id), "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert sum(r["status"] == "scored" for r in rows) == len(expected)
    assert sum(r["status"] == "rejected" for r in rows) == stats.broken_rows
    assert any(r["reason"].startswith("Observation-0002.ndjson, line ") for r in rows)
    report = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", str(job.id), "--out", str(report)])
    assert result.exit_code == 0, result.output
    assert "Risk distribution" in report.read_text()


def test_the_same_cohort_gets_the_same_risks_from_csv_and_from_fhir(
    stack: EmbeddedStack, tmp_path: Path
) -> None:
    n, seed = 80, 17
    csv_path = tmp_path / "cohort.csv"
    write_long_csv(csv_path, n, seed, messiness=0.0)
    stats = write_fhir_export(tmp_path / "cohort-export", n, seed, messiness=0.0)
    assert stats.skipped and stats.unknown_codes  # corrections and vital signs, not defects
    from_csv = _risks(stack, _score(stack, csv_path).id)
    from_fhir = _risks(stack, _score(stack, stats.path).id)
    only_age = {
        p.patient_id
        for p in synth_patients(n, seed)
        if any(v.measured == ("age",) for v in p.visits)
    }  # a visit with nothing but an age has no Observation
    compared = [k for k in from_csv if k[0] not in only_age]
    assert len(compared) >= 2 * (n - 2)
    for key in compared:
        assert from_fhir[key] == pytest.approx(from_csv[key], abs=1e-6), key


@pytest.mark.slow
def test_a_million_observation_export_runs_in_bounded_worker_memory(
    stack: EmbeddedStack, tmp_path: Path
) -> None:
    s = stack.settings
    stats = write_fhir_export(tmp_path / "big", 25_000, seed=2026, messiness=0.002, compress=True)
    assert stats.observations >= 1_000_000, stats.observations
    job = _score(stack, stats.path, timeout=1200)
    assert job.summary["fhir"]["resources"] == stats.rows
    assert job.summary["accepted_rows"] == stats.measurements
    assert job.summary["buckets"] >= 4
    with session_scope(s.database_url) as session:
        children = list(session.scalars(select(Job).where(Job.parent_id == job.id)))
        patients = session.scalar(
            select(func.count(func.distinct(EhrScore.patient_id))).where(
                EhrScore.extract_id == job.id
            )
        )
    assert patients >= 0.999 * stats.patients  # all but one whose every line broke, if any
    peaks = {c.kind + f"#{c.id}": c.summary for c in children}
    print(json.dumps({"observations": stats.observations, "tasks": peaks}, indent=1))
    for name, summary in peaks.items():
        assert summary["peak_rss_mb"] <= PEAK_RSS_BOUND_MB, (name, summary)
        growth = summary["peak_rss_mb"] - summary["rss_start_mb"]
        assert growth <= GROWTH_BOUND_MB, (name, summary)
