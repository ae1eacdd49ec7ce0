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


def _score_rows(extract_id: int, job_id: int, patients: range) -> list[dict[str, object]]:
    from datetime import UTC, datetime

    now = datetime(2026, 12, 2, 4, 30, 15, 123456, tzinfo=UTC)
    rows: list[dict[str, object]] = []
    for i in patients:
        for model in ("diabetes_lstm_attention", "cvd_autoencoder"):
            scored = i % 5 != 3
            rows.append(
                {
                    "extract_id": extract_id,
                    "job_id": job_id,
                    "patient_id": f"MRN-{i:05d}",
                    "model_name": model,
                    "model_version": "1",
                    "risk": i / 100 + 1e-9 if scored else None,
                    "not_scored": None if scored else "none of its input variables was measured",
                    "out_of_distribution": (i % 7 == 0) if model == "cvd_autoencoder" else None,
                    "reconstruction_error": 0.25 + i if model == "cvd_autoencoder" else None,
                    "visits": i % 20,
                    "measurements": 90 + i,
                    "explanation": {
                        "top_variables": [{"variable": "hba1c", "contribution": 0.1234}],
                        "attention": [["2020-01-0" + str(1 + i % 9), 0.5]],
                        "note": 'ünïcode, "quotes", tab\there, back\\slash',
                    },
                    "created_at": now,
                }
            )
    return rows


def test_columnar_score_inserts_store_what_the_orm_path_stores_once(db_url: str) -> None:
    """insert_scores (COPY on PostgreSQL, executemany on SQLite) against insert_ignore (the
    SQLAlchemy statement it replaced): the same stored values, each row once on redelivery."""
    from db.ehr_results import SCORE_COLUMNS, insert_scores
    from db.insert_ignore import insert_ignore

    first, second = _seed(db_url), _seed_other(db_url)
    with session_scope(db_url) as session:
        job = session.scalars(select(Job.id).where(Job.parent_id == first)).one()
        other_job = session.scalars(select(Job.id).where(Job.parent_id == second)).one()
        assert insert_scores(session, _score_rows(first, job, range(100, 160))) == 120
    with session_scope(db_url) as session:  # a redelivered batch: only the new patients
        assert insert_scores(session, _score_rows(first, job, range(150, 170))) == 20
        rows = _score_rows(second, other_job, range(100, 170))
        assert insert_ignore(session, EhrScore, rows, ("extract_id", "patient_id", "model_name"))
    with session_scope(db_url) as session:

        def stored(extract_id: int) -> list[tuple[object, ...]]:
            scores = session.scalars(
                select(EhrScore)
                .where(EhrScore.extract_id == extract_id, EhrScore.patient_id.like("MRN-%"))
                .order_by(EhrScore.patient_id, EhrScore.model_name)
            )
            names = [c for c in SCORE_COLUMNS if c not in ("extract_id", "job_id")]
            return [tuple(getattr(s, c) for c in names) for s in scores]

        columnar, orm = stored(first), stored(second)
    assert len(columnar) == 140
    for a, b in zip(columnar, orm, strict=True):
        assert a == b, [(x, y) for x, y in zip(a, b, strict=True) if x != y]
    assert {type(r[5]) for r in columnar} == {bool, type(None)}  # out_of_distribution


def _seed_other(url: str) -> int:
    with session_scope(url) as session:
        extract = Job(
            kind=JobKind.EHR_EXTRACT.value,
            source="other.csv",
            idempotency_key="ehr_extract:other",
            state=JobState.DONE.value,
            params={"models": {"diabetes_lstm_attention": "1"}},
        )
        session.add(extract)
        session.flush()
        session.add(
            Job(
                kind=JobKind.EHR_BATCH.value,
                parent_id=extract.id,
                source="other.csv",
                idempotency_key="ehr_batch:other",
                state=JobState.DONE.value,
                params={},
            )
        )
        return int(extract.id)


def test_superseding_score_inserts_replace_a_stored_row_and_add_the_rest(db_url: str) -> None:
    """``replace=True`` (a patient released early on part of its rows, scored again on all of
    them): its stored rows are overwritten, new ones added; on PostgreSQL through the COPY
    path's fallback, on SQLite by ``ON CONFLICT DO UPDATE``."""
    from db.ehr_results import insert_scores

    first = _seed(db_url)
    with session_scope(db_url) as session:
        job = session.scalars(select(Job.id).where(Job.parent_id == first)).one()
        assert insert_scores(session, _score_rows(first, job, range(100, 110))) == 20
    late = _score_rows(first, job, range(105, 115))
    for row in late:
        row["measurements"] = 1000 + int(str(row["patient_id"])[-3:])
        row["explanation"] = {"top_variables": [], "late": True}
    with session_scope(db_url) as session:
        assert insert_scores(session, late, replace=True) == 20
    with session_scope(db_url) as session:
        rows = session.execute(
            select(EhrScore.patient_id, EhrScore.measurements, EhrScore.explanation).where(
                EhrScore.extract_id == first, EhrScore.patient_id.like("MRN-%")
            )
        ).all()
    assert len(rows) == 30  # 100..114, two models each: nothing twice
    for patient, measurements, explanation in rows:
        i = int(patient[-3:])
        if i >= 105:
            assert measurements == 1000 + i and explanation.get("late") is True
        else:
            assert measurements == 90 + i and "late" not in explanation
