"""Nightly EHR scoring end to end with the real servers: generated extracts with valid and broken
rows (long and wide) go through ``medbatch ehr`` / the drop folder → Redis → the Celery worker
(streaming ingest, patient buckets) → Triton (both EHR models) → the database, and come back as
one score per valid patient, a reason for every broken row, exports and a report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from core.job_kinds import JobKind
from core.settings import Settings
from db.models import EhrScore, Job, JobState, Rejection
from db.session import session_scope
from ingest.ehr.dropfolder import scan_drop_folder
from ingest.ehr.reader import read_extract
from ingest.files import file_sha256
from medbatch.cli import app
from medbatch.stack.embedded import EmbeddedStack
from medbatch.synth.ehr import SynthStats, write_long_csv, write_wide_csv
from tests.helpers import wait_for_job
from workers.celery_app import beat_schedule
from workers.dispatch import publish

pytestmark = [pytest.mark.server]

MODELS = {"diabetes_lstm_attention", "cvd_autoencoder"}
#: The worker's memory for a whole 1-million-row extract. The CSV is ~48 MB; validating it as one
#: block took 331 MB more than the worker's baseline (measured), streaming it in 1 MiB blocks
#: ~50 MB, the same for a 4× larger file (pyarrow reads a few dozen blocks ahead). The benchmark
#: target (issue 5) is 1 GB in all.
PEAK_RSS_BOUND_MB = 1024
GROWTH_BOUND_MB = 120


def _extract_job(settings: Settings, path: Path) -> int:
    sha = file_sha256(path)
    with session_scope(settings.database_url) as session:
        jobs = [
            j
            for j in session.scalars(
                select(Job).where(Job.kind == JobKind.EHR_EXTRACT.value).order_by(Job.id)
            )
            if j.params.get("file_sha256") == sha
        ]
    assert len(jobs) == 1, f"{len(jobs)} extract jobs for {path.name}"
    return int(jobs[0].id)


def _accepted_patients(path: Path) -> dict[str, int]:
    """Patients with at least one accepted row (the reader is checked row by row elsewhere)."""
    counts: dict[str, int] = {}
    for block in read_extract(path):
        for pid in block.patient_id.to_pylist():
            counts[pid] = counts.get(pid, 0) + 1
    return counts


def _defects(stats: SynthStats) -> dict[int, str]:
    with stats.defects_path.open() as fh:
        return {int(r["line"]): r["kind"] for r in csv.DictReader(fh)}


def _scores(settings: Settings, extract_id: int) -> list[EhrScore]:
    with session_scope(settings.database_url) as session:
        return list(session.scalars(select(EhrScore).where(EhrScore.extract_id == extract_id)))


def _check_scored(settings: Settings, extract_id: int, path: Path, stats: SynthStats) -> None:
    job = wait_for_job(settings, extract_id, timeout=300)
    assert job.state == JobState.DONE.value, job.error
    expected = _accepted_patients(path)
    scores = _scores(settings, extract_id)
    by_model: dict[str, dict[str, EhrScore]] = {m: {} for m in MODELS}
    for s in scores:
        assert s.patient_id not in by_model[s.model_name], "a patient was scored twice"
        by_model[s.model_name][s.patient_id] = s
    for model in MODELS:
        assert set(by_model[model]) == set(expected), model  # one score per valid patient
    for pid, n_rows in expected.items():
        d, c = by_model["diabetes_lstm_attention"][pid], by_model["cvd_autoencoder"][pid]
        assert 0.0 <= d.risk <= 1.0 and 0.0 <= c.risk <= 1.0
        assert d.measurements == n_rows
        weights = np.array([w for _, w in d.explanation["attention"]])
        assert len(weights) == d.visits and 1 <= d.visits <= 20
        assert weights.sum() == pytest.approx(1.0, abs=1e-3), pid  # over real visits only
        assert (weights >= 0).all()
        assert c.out_of_distribution is not None and c.reconstruction_error is not None
    # every broken row is reported, at its line, with the generator's defect kind and a reason
    with session_scope(settings.database_url) as session:
        rejected = {
            r.line_no: (r.record_name, r.reason)
            for r in session.scalars(select(Rejection).where(Rejection.job_id == extract_id))
        }
    defects = _defects(stats)
    assert set(rejected) == set(defects)
    for line, kind in defects.items():
        assert rejected[line][0] == kind, (line, rejected[line])
        assert rejected[line][1]
    assert job.summary["rejected_rows"] == stats.broken_rows
    assert job.summary["accepted_rows"] == stats.measurements


@pytest.mark.parametrize("fmt", ["long", "wide"])
def test_extract_with_broken_rows_is_scored_per_valid_patient(
    stack: EmbeddedStack, tmp_path: Path, fmt: str
) -> None:
    s = stack.settings
    path = tmp_path / f"night-{fmt}.csv"
    writer = write_long_csv if fmt == "long" else write_wide_csv
    stats = writer(path, 180, seed=41 if fmt == "long" else 42, messiness=0.06)
    assert stats.broken_rows > 10

    result = CliRunner().invoke(app, ["ehr", str(path), "--timeout", "300"])
    assert result.exit_code == 0, result.output
    assert "patients scored" in result.output
    extract_id = _extract_job(s, path)
    _check_scored(s, extract_id, path, stats)

    # exports: one row per scored patient, then one per rejected line
    for suffix in (".csv", ".parquet"):
        out = tmp_path / f"results{suffix}"
        result = CliRunner().invoke(app, ["results", str(extract_id), "--out", str(out)])
        assert result.exit_code == 0, result.output
        rows = (
            list(csv.DictReader(out.open())) if suffix == ".csv" else pq.read_table(out).to_pylist()
        )
        statuses = [r["status"] for r in rows]
        assert statuses.count("scored") == len(_accepted_patients(path))
        assert statuses.count("rejected") == stats.broken_rows
    report = tmp_path / "report.html"
    some_patient = next(iter(_accepted_patients(path)))
    result = CliRunner().invoke(
        app, ["report", str(extract_id), "--out", str(report), "--patient", some_patient]
    )
    assert result.exit_code == 0, result.output
    page = report.read_text()
    assert f"{some_patient}: diabetes-complication risk" in page
    assert "Risk distribution" in page


@pytest.mark.slow
def test_a_grouped_extract_is_scored_while_read_and_a_late_row_rescores_its_patient(
    stack: EmbeddedStack, tmp_path: Path
) -> None:
    """Each patient's rows together (a warehouse query's order), but the first patient's first
    two rows at the end of the file (a late lab result): complete patients are released in early
    buckets while the file is read; the late rows reopen the first patient, whose score is then
    replaced by one on all its rows. Every patient ends with one score per model, on all its
    rows."""
    s = stack.settings
    source = tmp_path / "grouped-source.csv"
    write_long_csv(source, 12_000, seed=96, messiness=0.0)  # ~0.5 M rows, ~25 MB
    header, *body = source.read_text().splitlines(keepends=True)
    first = body[0].split(",", 1)[0]
    assert body[1].startswith(first + ",")
    path = tmp_path / "grouped.csv"
    path.write_text(header + "".join(body[2:]) + "".join(body[:2]))

    result = CliRunner().invoke(app, ["ehr", str(path), "--timeout", "300"])
    assert result.exit_code == 0, result.output
    extract_id = _extract_job(s, path)
    job = wait_for_job(s, extract_id, timeout=300)
    assert job.state == JobState.DONE.value, job.error
    assert job.summary["early_buckets"] >= 2  # released before the end of the file
    assert job.summary["grouped_by_patient"] is False
    assert job.summary["reopened_patients"] == 1
    expected = _accepted_patients(path)
    scores = _scores(s, extract_id)
    assert len(scores) == 2 * len(expected)
    assert {(r.patient_id, r.model_name) for r in scores} == {
        (p, m) for p in expected for m in MODELS
    }
    assert all(r.measurements == expected[r.patient_id] for r in scores)
    with session_scope(s.database_url) as session:
        batches = {
            j.id: j
            for j in session.scalars(
                select(Job).where(Job.parent_id == extract_id, Job.kind == JobKind.EHR_BATCH.value)
            )
        }
    early = {r.patient_id for r in scores if ":early:" in (batches[r.job_id].idempotency_key or "")}
    assert len(early) > len(expected) // 2  # most patients were scored while the file was read
    assert first not in early  # the reopened patient: by a late bucket, which supersedes
    late = [j for j in batches.values() if ":early:" not in (j.idempotency_key or "")]
    assert late and all(j.params.get("supersede") for j in late)


def test_the_same_file_dropped_twice_is_scored_once(stack: EmbeddedStack, tmp_path: Path) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    s = stack.settings.model_copy(update={"ehr_drop_dir": drop, "ehr_drop_settle_s": 0.0})
    source = tmp_path / "source.csv"
    stats = write_long_csv(source, 60, seed=77, messiness=0.03)
    (drop / "extract-2026-11-29.csv").write_bytes(source.read_bytes())

    (first,) = scan_drop_folder(s, publish)
    assert first.outcome == "submitted"
    _check_scored(s, first.job_id, source, stats)  # type: ignore[arg-type]

    (drop / "extract-2026-11-29-resent.csv").write_bytes(source.read_bytes())
    (second,) = scan_drop_folder(s, publish)
    assert second.outcome == "duplicate" and second.job_id == first.job_id
    assert scan_drop_folder(s, publish) == []
    with session_scope(s.database_url) as session:
        ingests = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.kind == JobKind.EHR_INGEST.value, Job.parent_id == first.job_id)
        )
    assert ingests == 1
    assert len(_scores(s, first.job_id)) == 2 * len(_accepted_patients(source))
    # the beat entry that runs the scan is there when a drop folder is configured
    schedule = beat_schedule(s)["scan-ehr-drop-folder"]
    assert schedule["task"] == "medbatch.ehr.scan_drop_folder"


@pytest.mark.slow
def test_a_million_row_extract_runs_in_bounded_worker_memory(
    stack: EmbeddedStack, tmp_path: Path
) -> None:
    s = stack.settings
    path = tmp_path / "big.csv"
    stats = write_long_csv(path, 23_500, seed=2026, messiness=0.002)
    assert stats.rows >= 1_000_000, stats.rows
    size_mb = path.stat().st_size / (1 << 20)

    result = CliRunner().invoke(app, ["ehr", str(path), "--timeout", "900"])
    assert result.exit_code == 0, result.output
    extract_id = _extract_job(s, path)
    job = wait_for_job(s, extract_id, timeout=900)
    assert job.state == JobState.DONE.value, job.error
    assert job.summary["accepted_rows"] + job.summary["rejected_rows"] == stats.rows
    assert job.summary["buckets"] >= 4  # scored as several independent batches

    with session_scope(s.database_url) as session:
        children = list(session.scalars(select(Job).where(Job.parent_id == extract_id)))
        patients = session.scalar(
            select(func.count(func.distinct(EhrScore.patient_id))).where(
                EhrScore.extract_id == extract_id
            )
        )
    assert patients == len(_accepted_patients(path))
    peaks = {c.kind + f"#{c.id}": c.summary for c in children}
    print(json.dumps({"file_mb": round(size_mb, 1), "tasks": peaks}, indent=1))
    for name, summary in peaks.items():
        assert summary["peak_rss_mb"] <= PEAK_RSS_BOUND_MB, (name, summary)
        growth = summary["peak_rss_mb"] - summary["rss_start_mb"]
        assert growth <= GROWTH_BOUND_MB, (name, summary)
    ingest = next(c for c in children if c.kind == JobKind.EHR_INGEST.value)
    # bounded by the block size, not the file: well under what one whole-file block costs
    growth = ingest.summary["peak_rss_mb"] - ingest.summary["rss_start_mb"]
    assert growth <= 40 + 60 * s.ehr_block_bytes / (1 << 20), ingest.summary


def test_no_patient_identifier_reaches_any_log(stack: EmbeddedStack, tmp_path: Path) -> None:
    """After the extracts above, no log of the stack names one of their patients."""
    path = tmp_path / "ids.csv"
    write_long_csv(path, 25, seed=41)  # same seed as the long extract above: same identifiers
    identifiers = set(_accepted_patients(path))
    with session_scope(stack.settings.database_url) as session:
        stored = set(session.scalars(select(EhrScore.patient_id).distinct()))
    assert identifiers & stored, "these identifiers went through the stack"
    logs = [p for p in stack.state_dir.rglob("*.log") if p.is_file()]
    assert logs
    for log_path in logs:
        text = log_path.read_text(errors="replace")
        for identifier in identifiers:
            assert identifier not in text, f"a patient identifier appears in {log_path}"


def test_a_patient_triton_refuses_does_not_fail_the_others(
    stack: EmbeddedStack, tmp_path: Path
) -> None:
    """Age is carried forward with the calendar: 119 at the first visit and measured again five
    years later makes the model see 124, beyond its physiological range, and refuse the request.
    The worker splits the request until that patient is alone; everyone else is scored."""
    s = stack.settings
    path = tmp_path / "centenarian.csv"
    stats = write_long_csv(path, 40, seed=5, messiness=0.0)
    with path.open("a") as fh:
        fh.write("CENTENARIAN-1,2015-01-05,age,119,years\n")
        fh.write("CENTENARIAN-1,2015-01-05,hba1c,7.9,%\n")
        fh.write("CENTENARIAN-1,2020-03-01,hba1c,8.4,%\n")
    assert stats.broken_rows == 0
    result = CliRunner().invoke(app, ["ehr", str(path), "--timeout", "300"])
    assert result.exit_code == 0, result.output
    extract_id = _extract_job(s, path)
    job = wait_for_job(s, extract_id)
    assert job.state == JobState.DONE.value, job.error
    scores = _scores(s, extract_id)
    refused = [x for x in scores if x.patient_id == "CENTENARIAN-1"]
    others = [x for x in scores if x.patient_id != "CENTENARIAN-1"]
    assert len(others) == 2 * 40 and all(x.risk is not None for x in others)
    by_model = {x.model_name: x for x in refused}
    assert by_model["diabetes_lstm_attention"].risk is None
    assert "age" in (by_model["diabetes_lstm_attention"].not_scored or "")
