"""Score one bucket of an extract's patients with every EHR model and store the results.

Idempotent: scores are inserted with ON CONFLICT DO NOTHING on (extract, patient, model), so a
redelivered batch (worker killed, Triton restarted mid-batch) stores each patient's score once.
Results are committed every ``ehr_triton_batch`` patients; the bucket file is removed only after
the job is ``done``, so an operator's retry of a failed batch finds it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from celery import Task
from sqlalchemy import func, select

from db import audit
from db.models import EhrScore, JobState, utcnow
from db.session import session_scope
from db.upsert import insert_ignore
from ingest.ehr.spill import read_bucket
from medbatch.errors import InferenceError
from medbatch.settings import Settings, get_settings
from workers.celery_app import TASK_EHR_SCORE, app
from workers.ehr.scoring import (
    OUTPUTS,
    ModelBatch,
    Patient,
    build_inputs,
    not_scored_rows,
    patients,
    score_rows,
)
from workers.lifecycle import Claim, claim, close, infer_or_wait, run_guarded
from workers.memory import current_rss_mb, peak_rss_mb, reset_peak_rss
from workers.metrics import ITEMS

log = logging.getLogger(__name__)


@app.task(name=TASK_EHR_SCORE, bind=True, max_retries=None)
def score_batch(self: Task, job_id: int) -> str:
    """Celery entry point; returns a short outcome word (kept in the worker log only)."""
    return run_guarded(self, job_id, get_settings(), _score_batch)


def _infer_isolating(
    task: Task, job: Claim, settings: Settings, batch: ModelBatch, version: str
) -> list[dict[str, Any]] | str:
    """Score ``batch``; if Triton refuses the request, split it until the refused patients are
    alone, and record them as not scored with Triton's reason: one patient's inputs never fail
    the other patients of the batch."""
    if not batch.patients:
        return []
    try:
        out = infer_or_wait(
            task,
            job,
            settings,
            batch.model,
            version,
            batch.inputs,
            OUTPUTS[batch.model],
            fail_on_refusal=False,
        )
    except InferenceError as exc:
        if len(batch.patients) == 1:
            return not_scored_rows(batch.model, version, [(batch.patients[0], str(exc))])
        half = len(batch.patients) // 2
        first = _infer_isolating(task, job, settings, batch.subset(range(half)), version)
        if isinstance(first, str):
            return first
        rest = _infer_isolating(
            task, job, settings, batch.subset(range(half, len(batch.patients))), version
        )
        return rest if isinstance(rest, str) else first + rest
    if isinstance(out, str):
        return out
    if out["RISK"].shape[0] != len(batch.patients):
        close(
            job,
            JobState.FAILED,
            settings,
            error=f"{batch.model} returned {out['RISK'].shape[0]} risks for "
            f"{len(batch.patients)} patients",
        )
        return "failed"
    return score_rows(batch, out, version)


def _score_group(task: Task, job: Claim, group: list[Patient], settings: Settings) -> int | str:
    """Score ``group`` with each model and commit; the rows stored, or the outcome word."""
    rows: list[dict[str, Any]] = []
    for model, version in job.params["models"].items():
        batch = build_inputs(model, group)
        rows.extend(not_scored_rows(model, version, batch.skipped))
        scored = _infer_isolating(task, job, settings, batch, version)
        if isinstance(scored, str):
            return scored
        rows.extend(scored)
    now = utcnow()
    for row in rows:
        row.update(extract_id=job.parent_id, job_id=job.job_id, created_at=now)
    with session_scope(settings.database_url) as session:
        return insert_ignore(session, EhrScore, rows, ("extract_id", "patient_id", "model_name"))


def _score_batch(self: Task, job_id: int, settings: Settings) -> str:
    job = claim(self, job_id, settings)
    if isinstance(job, str):
        return job
    path = Path(job.params["spool_file"])
    if not path.is_file():
        close(
            job,
            JobState.FAILED,
            settings,
            error=f"the patients of this batch ({path.name}) are gone from the spool directory; "
            "submit the extract again with `medbatch ehr FILE --force`",
        )
        return "failed"
    reset_peak_rss()
    rss_start = current_rss_mb()
    group_size = settings.ehr_triton_batch
    n_patients = stored = ood = 0
    group: list[Patient] = []
    for patient in patients(read_bucket(path)):
        group.append(patient)
        if len(group) == group_size:
            outcome = _score_group(self, job, group, settings)
            if isinstance(outcome, str):
                return outcome
            n_patients, stored, group = n_patients + len(group), stored + outcome, []
    if group:
        outcome = _score_group(self, job, group, settings)
        if isinstance(outcome, str):
            return outcome
        n_patients, stored = n_patients + len(group), stored + outcome
    with session_scope(settings.database_url) as session:
        ood = int(
            session.scalar(
                select(func.count())
                .select_from(EhrScore)
                .where(EhrScore.job_id == job_id, EhrScore.out_of_distribution.is_(True))
            )
            or 0
        )
        audit.append(
            session,
            actor=audit.current_actor("worker"),
            action="ehr.scored",
            subject=f"job:{job_id}",
            details={"patients": n_patients, "stored": stored, "models": job.params["models"]},
        )
    ITEMS.labels(job.kind).inc(n_patients)
    summary = {
        "patients": n_patients,
        "scores_stored": stored,
        "out_of_distribution": ood,
        "rss_start_mb": round(rss_start, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    close(job, JobState.DONE, settings, summary=summary)
    path.unlink(missing_ok=True)
    log.info("ehr batch job %s: %d patients scored", job_id, n_patients)
    return "done"
