"""Score one chunk of molecules: load from the database, featurise, one Triton call, one commit.

Idempotent by construction: a chunk already ``done`` is skipped, and predictions are inserted
with ON CONFLICT DO NOTHING on (job, compound, model), so a redelivered or duplicated message
stores every result exactly once.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from celery import Task
from rdkit import Chem
from sqlalchemy import select

from core.job_kinds import JobKind
from core.model_registry import served_model
from core.served_models import ServedModel
from core.settings import Settings
from db import audit
from db.insert_ignore import insert_ignore
from db.jobs import finish_parent_if_complete, transition
from db.models import ChunkItem, Compound, JobState, Prediction, utcnow
from db.session import session_scope
from workers.chem.domain import applicability_for
from workers.chem.featurize import featurize_mols, parse_canonical
from workers.lifecycle import claim, close, infer_or_wait, job_task
from workers.metrics import CHUNKS, ITEMS

log = logging.getLogger(__name__)


def _finite(value: float) -> float | None:
    """A stored prediction: a float, or None where the model gave NaN/inf."""
    v = float(value)
    return v if math.isfinite(v) else None


def _load_chunk(job_id: int, settings: Settings) -> list[tuple[int, str]]:
    with session_scope(settings.database_url) as session:
        rows = session.execute(
            select(Compound.id, Compound.canonical_smiles)
            .join(ChunkItem, ChunkItem.compound_id == Compound.id)
            .where(ChunkItem.job_id == job_id)
            .order_by(ChunkItem.position)
        ).all()
    return [(int(cid), str(smi)) for cid, smi in rows]


def _add_derived(
    entry: ServedModel,
    version: str,
    settings: Settings,
    mols: list[Chem.Mol],
    outputs: list[dict[str, Any]],
) -> int | None:
    """Add the model's derived fields (calibrated interval, applicability domain) to each
    molecule's outputs; returns how many are out of domain (None for a model without them)."""
    applicability = applicability_for(entry, version, settings)
    if applicability is None:
        return None
    value_field, spread_field = list(entry.fields.values())[:2]
    derived = applicability.assess(
        mols,
        [o[value_field] for o in outputs],
        [o[spread_field] for o in outputs],
    )
    names = [name for name, _ in entry.derived]
    for o, values in zip(outputs, derived, strict=True):
        o.update(zip(names, values, strict=True))
    return sum(1 for _, _, inside, _ in derived if not inside)


@job_task(JobKind.CHEM_CHUNK)
def score_chunk(self: Task, job_id: int, settings: Settings) -> str:
    """Featurise a chunk's molecules, one Triton request, store the predictions."""
    job = claim(self, job_id, settings)
    if isinstance(job, str):
        return job
    model = str(job.params.get("model_name", settings.chem_model_name))
    version = str(job.params.get("model_version", settings.chem_model_version))
    actor = audit.current_actor("worker")

    # Seconds per stage, kept in the chunk's summary: where a chunk's time goes, per job.
    t0 = time.perf_counter()
    items = _load_chunk(job_id, settings)
    t_load = time.perf_counter()
    if not items:
        close(job, JobState.DONE, settings, summary={"scored": 0})
        return "empty"
    try:
        # One parse per molecule; everything derived per molecule comes from these mols.
        mols = parse_canonical([smi for _, smi in items])
        arrays = featurize_mols(mols)
    except ValueError as exc:
        close(job, JobState.FAILED, settings, error=f"featurisation failed: {exc}")
        return "failed"
    t_feat = time.perf_counter()

    entry = served_model(model, settings)
    fields = entry.fields  # output tensor → stored field
    out = infer_or_wait(self, job, settings, model, version, arrays, list(fields))
    if isinstance(out, str):
        return out
    t_infer = time.perf_counter()
    values = {name: out[tensor].reshape(len(out[tensor]), -1) for tensor, name in fields.items()}
    wrong = {name: v.shape[0] for name, v in values.items() if v.shape[0] != len(items)}
    if wrong:
        close(
            job,
            JobState.FAILED,
            settings,
            error=f"model returned {wrong} values for {len(items)} molecules",
        )
        return "failed"
    outputs = [{name: _finite(v[i, 0]) for name, v in values.items()} for i in range(len(items))]
    t_domain = time.perf_counter()
    try:
        out_of_domain = _add_derived(entry, version, settings, mols, outputs)
    except (OSError, ValueError, KeyError) as exc:
        close(job, JobState.FAILED, settings, error=f"applicability domain: {exc}")
        return "failed"
    t_derived = time.perf_counter()
    now = utcnow()
    rows = [
        {
            "job_id": job_id,
            "compound_id": cid,
            "model_name": model,
            "model_version": version,
            "outputs": outputs[i],
            "created_at": now,
        }
        for i, (cid, _) in enumerate(items)
    ]
    with session_scope(settings.database_url) as session:
        inserted = insert_ignore(session, Prediction, rows, ("job_id", "compound_id", "model_name"))
        transition(
            session,
            job_id,
            JobState.DONE,
            actor=actor,
            summary={
                "scored": len(rows),
                "out_of_domain": out_of_domain,
                "model": model,
                "model_version": version,
                "seconds": {
                    "load": round(t_load - t0, 4),
                    "featurize": round(t_feat - t_load, 4),
                    "triton": round(t_infer - t_feat, 4),
                    "domain": round(t_derived - t_domain, 4),
                    "store": round(time.perf_counter() - t_derived, 4),
                },
            },
            details={"predictions": len(rows), "newly_stored": inserted},
        )
    CHUNKS.labels(JobKind.CHEM_CHUNK.value, JobState.DONE.value).inc()
    ITEMS.labels(JobKind.CHEM_CHUNK.value).inc(len(rows))
    log.info("chunk job %s: %d molecules scored by %s v%s", job_id, len(rows), model, version)
    if job.parent_id is not None:
        with session_scope(settings.database_url) as session:
            finish_parent_if_complete(session, job.parent_id, actor=actor)
    return "done"
