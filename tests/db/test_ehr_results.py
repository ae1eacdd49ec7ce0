"""EHR results out of the database (SQLite and PostgreSQL): the CSV/Parquet export puts each
patient's models side by side and lists every rejected line; the HTML report draws attention."""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sqlalchemy import select

from core.job_kinds import JobKind
from core.settings import Settings
from db.models import AuditEvent, EhrScore, Job, JobState, Rejection
from db.session import session_scope
from medbatch.reports.ehr import render_ehr_report
from medbatch.services.results import export_results

N_PATIENTS = 30


def _seed(url: str) -> int:
    with session_scope(url) as session:
        extract = Job(
            kind=JobKind.EHR_EXTRACT.value,
            source="night.csv",
            idempotency_key="ehr_extract:test",
            state=JobState.DONE.value,
            params={"models": {"diabetes_lstm_attention": "1", "cvd_autoencoder": "1"}},
            summary={"accepted_rows": 900, "rejected_rows": 2, "rejected_by_kind": {"x": 2}},
        )
        session.add(extract)
        session.flush()
        batch = Job(
            kind=JobKind.EHR_BATCH.value,
            parent_id=extract.id,
            source="night.csv",
            idempotency_key="ehr_batch:test",
            state=JobState.DONE.value,
            params={},
        )
        session.add(batch)
        session.flush()
        for i in range(N_PATIENTS):
            pid = f"P{i:04d}"
            days = [f"2020-0{m}-01" for m in range(1, 4)]
            session.add(
                EhrScore(
                    extract_id=extract.id,
                    job_id=batch.id,
                    patient_id=pid,
                    model_name="diabetes_lstm_attention",
                    model_version="1",
                    risk=i / N_PATIENTS,
                    visits=3,
                    measurements=30,
                    explanation={
                        "attention": [[d, w] for d, w in zip(days, [0.2, 0.3, 0.5], strict=True)],
                        "top_visits": [{"day": days[2], "weight": 0.5}],
                        "top_variables": [{"variable": "hba1c", "contribution": 0.8}],
                    },
                )
            )
            session.add(
                EhrScore(
                    extract_id=extract.id,
                    job_id=batch.id,
                    patient_id=pid,
                    model_name="cvd_autoencoder",
                    model_version="1",
                    risk=0.5,
                    out_of_distribution=i == 7,
                    reconstruction_error=0.3,
                    visits=3,
                    measurements=30,
                    explanation={"top_variables": [{"variable": "age", "contribution": 0.4}]},
                )
            )
        for line, reason in [(5, "value 'abc' is not a number"), (9, "patient_id is empty")]:
            session.add(
                Rejection(job_id=extract.id, line_no=line, record_name="k", raw="", reason=reason)
            )
        return int(extract.id)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_export_one_row_per_patient_then_rejections(
    db_url: str, tmp_path: Path, suffix: str
) -> None:
    extract_id = _seed(db_url)
    out = tmp_path / f"results{suffix}"
    settings = Settings(database_url=db_url, storage_dir=tmp_path)
    n = export_results(settings, extract_id, out, actor="test", batch=7)  # several pages
    assert n == N_PATIENTS + 2
    if suffix == ".csv":
        with out.open() as fh:
            rows = list(csv.DictReader(fh))
        risk = lambda r: float(r["diabetes_risk"])  # noqa: E731
    else:
        rows = pq.read_table(out).to_pylist()
        risk = lambda r: r["diabetes_risk"]  # noqa: E731
    scored = [r for r in rows if r["status"] == "scored"]
    assert [r["patient_id"] for r in scored] == [f"P{i:04d}" for i in range(N_PATIENTS)]
    assert risk(scored[3]) == pytest.approx(0.1)
    assert str(scored[7]["cvd_out_of_distribution"]) == "True"
    assert scored[0]["diabetes_top_variables"] == "hba1c +0.800"
    assert scored[0]["diabetes_top_visits"] == "2020-03-01 0.50"
    rejected = [r for r in rows if r["status"] == "rejected"]
    assert [str(r["line_no"]) for r in rejected] == ["5", "9"]
    assert "not a number" in rejected[0]["reason"]


def test_report_draws_attention_for_any_patient(db_url: str, tmp_path: Path) -> None:
    extract_id = _seed(db_url)
    out = tmp_path / "report.html"
    with session_scope(db_url) as session:
        render_ehr_report(session, extract_id, out, actor="test", patients=["P0002", "NOPE"])
    page = out.read_text()
    assert page.count("<svg") >= 1 + 12  # histogram + highest-risk cards (+ the lookup chart)
    assert "P0002: diabetes-complication risk 0.07" in page  # the requested patient is drawn
    assert "No score in this extract for: NOPE" in page
    assert '"P0029":[["2020-01-01",0.2]' in page  # every patient embedded for the lookup
    assert "patient_id is empty" in page
    with session_scope(db_url) as session:
        actions = session.scalars(select(AuditEvent.action)).all()
    assert "results.report" in actions
