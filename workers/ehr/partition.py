"""Stream one EHR extract: record every bad row with its reason, spill the accepted measurements
into patient buckets, and turn each bucket into a scoring job.

While the file is grouped by patient, complete patients leave early, each early bucket's job
committed after its file is stored (``ingest/ehr/release.py``), so scoring overlaps the read.

Crash safety: the hash bucket jobs and this job's ``done`` are committed in one transaction, after
the bucket files are fsync'd. A worker killed earlier leaves no hash bucket job; the redelivered
ingest empties the spool directory and starts again (rejections are keyed by line, so they are
stored once). Early bucket jobs it already committed stand; the new delivery releases nothing
early and its hash buckets, which then hold every patient, replace their scores. A worker killed
after a commit but before publishing leaves queued jobs whose message never left; the sweeper
re-sends them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from celery import Task
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from core.errors import InputError
from core.job_kinds import JobKind
from core.settings import Settings
from core.storage import Storage, scratch, storage_for
from db import audit
from db.insert_ignore import insert_ignore
from db.jobs import finish_parent_if_complete, transition
from db.models import EhrScore, Job, JobState, Rejection, utcnow
from db.session import session_scope
from ingest.ehr.fhir_export import fingerprint
from ingest.ehr.reader import LongBlock, read_extract
from ingest.ehr.release import LONG_ROW_BYTES, EarlyBucket, GroupedRelease
from ingest.ehr.spill import Bucket, BucketSpill, bucket_count
from workers.dispatch import publish
from workers.lifecycle import Claim, claim, job_task
from workers.memory import current_rss_mb, peak_rss_mb, reset_peak_rss
from workers.metrics import CHUNKS

log = logging.getLogger(__name__)

_PROGRESS_EVERY_S = 1.0


class _Progress:
    """Counts of the ingest so far, written to the job's summary about once a second (the CLI
    shows them as a progress bar)."""

    def __init__(self, job_id: int, settings: Settings) -> None:
        self.job_id = job_id
        self.settings = settings
        self.bytes_read = 0
        self.accepted = 0
        self.rejected: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.unknown_codes: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self._last = 0.0

    def on_bytes(self, n: int) -> None:
        self.bytes_read = n

    def add(self, block: LongBlock) -> None:
        self.accepted += len(block)
        self.rejected.update(r.kind for r in block.rejections)
        self.skipped.update(block.skipped)
        self.unknown_codes.update(block.unknown_codes)
        self.counts.update(block.counts)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "bytes_read": self.bytes_read,
            "accepted_rows": self.accepted,
            "rejected_rows": sum(self.rejected.values()),
            "rejected_by_kind": dict(sorted(self.rejected.items())),
        }
        if self.counts or self.skipped or self.unknown_codes:  # a FHIR export
            out["skipped"] = dict(sorted(self.skipped.items()))
            out["unknown_codes"] = _top(self.unknown_codes)
            out["fhir"] = dict(sorted(self.counts.items()))
        return out

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < _PROGRESS_EVERY_S:
            return
        self._last = now
        with session_scope(self.settings.database_url) as session:
            session.execute(
                update(Job)
                .where(Job.id == self.job_id)
                .values(summary=self.summary(), updated_at=utcnow())
            )


_UNKNOWN_CODES_SHOWN = 100


def _top(counts: Counter[str]) -> dict[str, int]:
    """The most frequent codes (a summary stays small whatever an export holds)."""
    top = dict(counts.most_common(_UNKNOWN_CODES_SHOWN))
    rest = sum(counts.values()) - sum(top.values())
    if rest:
        top[f"(other {len(counts) - len(top)} codes)"] = rest
    return top


def _store_rejections(extract_id: int, block: LongBlock, settings: Settings) -> None:
    rows = [
        {
            "job_id": extract_id,
            "line_no": r.line,
            "record_name": r.kind,
            "raw": "",  # the row holds a patient identifier; the line number finds it
            "reason": r.reason,
        }
        for r in block.rejections
    ]
    with session_scope(settings.database_url) as session:
        insert_ignore(session, Rejection, rows, ("job_id", "line_no"))


def _reject(job: Claim, settings: Settings, error: str, summary: dict[str, Any]) -> str:
    """The file cannot be read as an extract: the ingest and the extract are both rejected, and
    so are the early buckets already released (scores stored from them are removed: an early
    batch still running removes its own when it ends, see ``tasks.score_batch``)."""
    actor = audit.current_actor("worker")
    with session_scope(settings.database_url) as session:
        transition(
            session, job.job_id, JobState.REJECTED, actor=actor, error=error, summary=summary
        )
        if job.parent_id is not None:
            transition(
                session, job.parent_id, JobState.REJECTED, actor=actor, error=error, summary=summary
            )
            early = session.scalars(
                select(Job.id).where(
                    Job.parent_id == job.parent_id,
                    Job.kind == JobKind.EHR_BATCH.value,
                    Job.state == JobState.QUEUED.value,
                )
            ).all()
            for batch_id in early:
                transition(
                    session,
                    batch_id,
                    JobState.REJECTED,
                    actor=actor,
                    error=f"its extract was rejected: {error}",
                )
            session.execute(delete(EhrScore).where(EhrScore.extract_id == job.parent_id))
    CHUNKS.labels(job.kind, JobState.REJECTED.value).inc()
    return "rejected"


def _check_unchanged(path: Path, params: dict[str, Any]) -> str | None:
    """The file (or export folder) is what was submitted: same size, same modification time."""
    if not (path.is_file() or path.is_dir()):
        return f"{path.name} is no longer at {path.parent}; drop or submit it again"
    if fingerprint(path) != (params["size_bytes"], params["mtime_ns"]):
        return (
            f"{path.name} changed after it was submitted (size or modification time differ); "
            "submit the final file again"
        )
    return None


@job_task(JobKind.EHR_INGEST)
def ingest_extract(self: Task, job_id: int, settings: Settings) -> str:
    job = claim(self, job_id, settings)
    if isinstance(job, str):
        return job
    storage = storage_for(settings)
    with scratch(settings) as tmp:
        stored = job.params.get("object")  # put in shared storage when it was submitted
        path = storage.fetch_tree(str(stored), tmp) if stored else Path(job.params["path"])
        return _ingest(job, settings, storage, path, tmp)


def _ingest(job: Claim, settings: Settings, storage: Storage, path: Path, tmp: Path) -> str:
    """Stream the extract at ``path`` into buckets (written to storage), then commit their jobs;
    ``tmp``: this task's scratch folder (where buckets are spilled before a shared store)."""
    job_id = job.job_id
    assert job.parent_id is not None, "an ingest job always has its extract as parent"
    extract_id = job.parent_id
    progress = _Progress(job_id, settings)
    if "object" not in job.params and (error := _check_unchanged(path, job.params)):
        return _reject(job, settings, error, progress.summary())

    reset_peak_rss()
    rss_start = current_rss_mb()
    text_bytes = job.params.get("text_bytes", job.params["size_bytes"])  # gzip: uncompressed
    basis = job.params.get("bucket_basis_bytes", text_bytes)  # FHIR: its long-CSV equivalent
    n = bucket_count(basis, settings.ehr_bucket_bytes, settings.ehr_max_buckets)
    prefix = f"ehr/extract-{extract_id}"
    spill_dir = settings.ehr_spool_dir / prefix[4:] if storage.is_local else tmp / "spill"
    spill = BucketSpill(spill_dir, n)
    # An earlier delivery of this ingest that released early buckets: their jobs stand (they
    # may have run); this delivery releases none and its hash buckets replace their scores.
    earlier = _early_jobs(settings, extract_id)
    if not earlier:
        storage.delete_prefix(f"{prefix}-early")  # files of a delivery killed before any job
    release = GroupedRelease(
        tmp / "early", spill, enabled=settings.ehr_release_grouped and not earlier
    )
    early_ids: list[int] = []
    early_rows = settings.ehr_bucket_bytes // LONG_ROW_BYTES  # the hash buckets' size in rows
    started = time.perf_counter()
    try:
        blocks = read_extract(
            path,
            job.params.get("format"),
            block_size=settings.ehr_block_bytes,
            on_bytes=progress.on_bytes,
        )
        for block in blocks:
            progress.add(block)
            for early in release.add(block, early_rows):
                early_ids.append(_release_early(job, extract_id, early, storage, prefix, settings))
            if block.rejections:
                _store_rejections(extract_id, block, settings)
            progress.tick()
        for early in release.close():
            early_ids.append(_release_early(job, extract_id, early, storage, prefix, settings))
    except InputError as exc:
        spill.close()
        return _reject(job, settings, str(exc), progress.summary())
    buckets = spill.close()
    keys = _keep(storage, prefix, buckets)
    seconds = time.perf_counter() - started
    summary = {
        **progress.summary(),
        "buckets": len(buckets) + len(early_ids) + len(earlier),
        "early_buckets": len(early_ids) + len(earlier),
        "grouped_by_patient": release.grouped and not earlier,
        "reopened_patients": len(release.reopened),
        "seconds": round(seconds, 3),
        "rows_per_s": round((progress.accepted + sum(progress.rejected.values())) / seconds),
        **(
            {"resources_per_s": round(progress.counts["resources"] / seconds)}
            if progress.counts
            else {}
        ),
        "rss_start_mb": round(rss_start, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    supersede = bool(release.reopened or earlier)
    batch_ids = _commit_batches(job, extract_id, buckets, keys, summary, settings, supersede)
    CHUNKS.labels(job.kind, JobState.DONE.value).inc()
    for batch_id in batch_ids:
        publish(batch_id, JobKind.EHR_BATCH.value)
    with session_scope(settings.database_url) as session:
        finish_parent_if_complete(session, extract_id, actor=audit.current_actor("worker"))
    log.info(
        "extract job %s ingested: %d measurements, %d rejected rows, %d batches "
        "(%d released early), %.1f s",
        extract_id,
        progress.accepted,
        sum(progress.rejected.values()),
        len(batch_ids) + len(early_ids),
        len(early_ids),
        seconds,
    )
    return "done"


def _early_jobs(settings: Settings, extract_id: int) -> list[int]:
    """Early bucket jobs an earlier delivery of this ingest committed."""
    with session_scope(settings.database_url) as session:
        return list(
            session.scalars(
                select(Job.id).where(
                    Job.parent_id == extract_id,
                    Job.idempotency_key.like(f"ehr_batch:{extract_id}:early:%"),
                )
            ).all()
        )


def _queue_batches(
    session: Session,
    job: Claim,
    extract_id: int,
    buckets: list[tuple[int | str, str, int]],
    *,
    supersede: bool = False,
    **details: Any,
) -> list[int]:
    """Add a queued scoring job, audited, for each (bucket label, storage key, rows) of
    ``buckets``; their ids. ``supersede``: some patient of these buckets was scored from an
    early bucket on part of its rows, and these jobs' scores replace those."""
    actor = audit.current_actor("worker")
    batches = [
        Job(
            kind=JobKind.EHR_BATCH.value,
            parent_id=extract_id,
            source=job.params["path"].rsplit("/", 1)[-1][:512],
            idempotency_key=f"ehr_batch:{extract_id}:{label}",
            state=JobState.QUEUED.value,
            queued_at=utcnow(),
            params={
                "spool_file": key,
                "bucket": label,
                "models": job.params["models"],
                **({"supersede": True} if supersede else {}),
            },
            item_count=rows,
        )
        for label, key, rows in buckets
    ]
    session.add_all(batches)
    session.flush()
    for batch in batches:
        audit.append(
            session,
            actor=actor,
            action="job.queued",
            subject=f"job:{batch.id}",
            details={
                "kind": batch.kind,
                "parent": extract_id,
                "rows": batch.item_count,
                **details,
            },
        )
    return [int(b.id) for b in batches]


def _release_early(
    job: Claim,
    extract_id: int,
    early: EarlyBucket,
    storage: Storage,
    prefix: str,
    s: Settings,
) -> int:
    """Store one early bucket, commit its scoring job and publish it: scoring starts while the
    ingest goes on. The ingest keeps its own copy (``early.path``) until it ends."""
    key = f"{prefix}-early/{early.path.name}"
    storage.put_file(key, early.path)
    with session_scope(s.database_url) as session:
        (batch_id,) = _queue_batches(
            session,
            job,
            extract_id,
            [(f"early:{early.index}", key, early.rows)],
            patients=early.patients,
            early=True,
        )
    publish(batch_id, JobKind.EHR_BATCH.value)
    return batch_id


def _keep(storage: Storage, prefix: str, buckets: list[Bucket]) -> list[str]:
    """The bucket files as storage keys: where they are (local storage), or each stored in the
    shared store under ``prefix`` (emptied first: leftovers of an interrupted run). Raises
    StorageUnavailableError before any bucket job exists, so the ingest retries whole."""
    keys = [f"{prefix}/{b.path.name}" for b in buckets]
    if not storage.is_local:
        storage.delete_prefix(prefix)
        for key, bucket in zip(keys, buckets, strict=True):
            storage.put_file(key, bucket.path)
    return keys


def _commit_batches(
    job: Claim,
    extract_id: int,
    buckets: list[Bucket],
    keys: list[str],
    summary: dict[str, Any],
    s: Settings,
    supersede: bool,
) -> list[int]:
    """One transaction: a queued scoring job per bucket, the ingest done, the extract's counts.
    ``supersede``: see :func:`_queue_batches`."""
    actor = audit.current_actor("worker")
    with session_scope(s.database_url) as session:
        batch_ids = _queue_batches(
            session,
            job,
            extract_id,
            [(b.index, key, b.rows) for b, key in zip(buckets, keys, strict=True)],
            supersede=supersede,
        )
        transition(session, job.job_id, JobState.DONE, actor=actor, summary=summary)
        session.execute(
            update(Job)
            .where(Job.id == extract_id)
            .values(summary=summary, item_count=summary["accepted_rows"], updated_at=utcnow())
        )
        return batch_ids
