"""Turn a compound library file into durable, deduplicated, chunked scoring jobs.

The file streams through in batches: each batch is canonicalised, its bad rows recorded with
RDKit's reason, its molecules deduplicated by InChIKey (within the file through the database,
so memory stays bounded; across runs through stored predictions), and committed before any
chunk that refers to it is published. Re-submitting a file finds the job that already exists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.orm import Session

from core.errors import InputError
from core.job_kinds import JobKind
from core.settings import Settings
from db import audit
from db.insert_ignore import insert_ignore
from db.jobs import (
    add_submission,
    finish_parent_if_complete,
    live_job_for_key,
    next_key,
    transition,
)
from db.models import (
    ChunkItem,
    Compound,
    Job,
    JobState,
    LibraryEntry,
    Prediction,
    Rejection,
    utcnow,
)
from db.session import session_scope
from ingest.chem.canonicalize import Canonical, InchiKeyMemo, Invalid, canonicalize_all
from ingest.chem.readers import Format, LibraryReader, RawRecord
from ingest.files import file_sha256

log = logging.getLogger(__name__)

Publisher = Callable[[int, str], None]
ProgressFn = Callable[[int, int], None]  # (bytes consumed, rows read)

OPEN_CHUNK_STATES = (JobState.RECEIVED.value, JobState.QUEUED.value, JobState.RUNNING.value)


@dataclass
class ScreenOptions:
    fmt: Format | None = None
    smiles_column: str = "smiles"
    id_column: str | None = None
    force: bool = False
    chunk_size: int | None = None


@dataclass
class SubmitResult:
    job_id: int
    existing: bool
    counts: dict[str, int] = field(default_factory=dict)
    chunk_ids: list[int] = field(default_factory=list)
    #: Seconds spent canonicalising and in the database (benchmarks report where time goes).
    seconds: dict[str, float] = field(default_factory=dict)


def _base_key(sha: str, options: ScreenOptions, settings: Settings) -> str:
    salient = {
        "sha256": sha,
        "smiles_column": options.smiles_column.lower(),
        "id_column": options.id_column,
        "fmt": options.fmt,
        "model": settings.chem_model_name,
        "version": settings.chem_model_version,
    }
    return (
        "chem_screen:"
        + hashlib.sha256(json.dumps(salient, sort_keys=True).encode()).hexdigest()[:40]
    )


class _Submission:
    """State of one library being submitted: counters, the pending chunk, published chunk ids."""

    def __init__(
        self,
        job_id: int,
        key: str,
        library: str,
        settings: Settings,
        options: ScreenOptions,
        actor: str,
    ) -> None:
        self.job_id = job_id
        self.key = key
        self.library = library
        self.settings = settings
        self.options = options
        self.chunk_size = options.chunk_size or settings.chem_chunk_size
        self.counts = {
            "rows": 0,
            "valid": 0,
            "rejected": 0,
            "duplicates": 0,
            "already_scored": 0,
            "to_score": 0,
            "chunks": 0,
        }
        self.seconds = {"canonicalize": 0.0}
        self.pending: list[int] = []
        self.chunk_ids: list[int] = []
        self.actor = actor

    # -- one batch of rows ---------------------------------------------------------------------
    def add_batch(
        self, session: Session, records: list[RawRecord], results: list[Canonical | Invalid]
    ) -> None:
        rejections: list[dict[str, Any]] = []
        valid: list[tuple[RawRecord, Canonical]] = []
        for rec, result in zip(records, results, strict=True):
            if isinstance(result, Canonical):
                valid.append((rec, result))
            else:
                rejections.append(
                    {
                        "job_id": self.job_id,
                        "line_no": rec.line_no,
                        "record_name": rec.name[:256] if rec.name else None,
                        "raw": rec.text[:500],
                        "reason": result.reason,
                    }
                )
        self.counts["rows"] += len(records)
        self.counts["rejected"] += len(rejections)
        self.counts["valid"] += len(valid)
        insert_ignore(session, Rejection, rejections, ("job_id", "line_no"))
        if not valid:
            return

        ids = self._compound_ids(session, valid)
        compound_of = [ids[can.inchikey] for _, can in valid]
        unique = sorted(set(compound_of))
        seen_before = dict(
            session.execute(
                select(LibraryEntry.compound_id, func.min(LibraryEntry.line_no))
                .where(LibraryEntry.job_id == self.job_id, LibraryEntry.compound_id.in_(unique))
                .group_by(LibraryEntry.compound_id)
            ).all()
        )
        entries, first_new = [], []
        for (rec, _), cid in zip(valid, compound_of, strict=True):
            first_line = seen_before.get(cid)
            if first_line is None:
                seen_before[cid] = rec.line_no
                first_new.append(cid)
            else:
                self.counts["duplicates"] += 1
            entries.append(
                {
                    "job_id": self.job_id,
                    "line_no": rec.line_no,
                    "record_name": (rec.name or None) and rec.name[:256],
                    "compound_id": cid,
                    "duplicate_of_line": first_line,
                }
            )
        insert_ignore(session, LibraryEntry, entries, ("job_id", "line_no"))
        to_score = first_new if self.options.force else self._not_yet_scored(session, first_new)
        self.counts["already_scored"] += len(first_new) - len(to_score)
        self.counts["to_score"] += len(to_score)
        self.pending.extend(to_score)

    def _compound_ids(
        self, session: Session, valid: list[tuple[RawRecord, Canonical]]
    ) -> dict[str, int]:
        by_key = {can.inchikey: can.smiles for _, can in valid}
        keys = list(by_key)
        found = dict(
            session.execute(
                select(Compound.inchikey, Compound.id).where(Compound.inchikey.in_(keys))
            ).all()
        )
        missing = [k for k in keys if k not in found]
        if missing:
            now = utcnow()
            insert_ignore(
                session,
                Compound,
                [
                    {
                        "inchikey": k,
                        "canonical_smiles": by_key[k],
                        "library": self.library[:512],
                        "created_at": now,
                    }
                    for k in missing
                ],
                ("inchikey",),
            )
            found.update(
                session.execute(
                    select(Compound.inchikey, Compound.id).where(Compound.inchikey.in_(missing))
                ).all()
            )
        return {k: int(v) for k, v in found.items()}

    def _not_yet_scored(self, session: Session, compound_ids: list[int]) -> list[int]:
        if not compound_ids:
            return []
        scored = set(
            session.scalars(
                select(Prediction.compound_id).where(
                    Prediction.compound_id.in_(compound_ids),
                    Prediction.model_name == self.settings.chem_model_name,
                    Prediction.model_version == self.settings.chem_model_version,
                )
            ).all()
        )
        in_flight = set(
            session.scalars(
                select(ChunkItem.compound_id)
                .join(Job, Job.id == ChunkItem.job_id)
                .where(
                    ChunkItem.compound_id.in_(compound_ids),
                    Job.kind == JobKind.CHEM_CHUNK.value,
                    Job.state.in_(OPEN_CHUNK_STATES),
                )
            ).all()
        )
        return [c for c in compound_ids if c not in scored and c not in in_flight]

    # -- chunks --------------------------------------------------------------------------------
    def make_chunks(self, session: Session, final: bool) -> list[int]:
        """Create chunk jobs (state received) for full chunks, or everything if ``final``."""
        created: list[int] = []
        while len(self.pending) >= self.chunk_size or (final and self.pending):
            members, self.pending = self.pending[: self.chunk_size], self.pending[self.chunk_size :]
            index = len(self.chunk_ids) + len(created)
            digest = hashlib.sha256(f"{self.key}|{index}|{members}".encode()).hexdigest()[:40]
            chunk = Job(
                kind=JobKind.CHEM_CHUNK.value,
                parent_id=self.job_id,
                source=self.library[:512],
                idempotency_key=f"chem_chunk:{digest}",
                state=JobState.RECEIVED.value,
                params={
                    "model_name": self.settings.chem_model_name,
                    "model_version": self.settings.chem_model_version,
                    "index": index,
                },
                item_count=len(members),
            )
            session.add(chunk)
            session.flush()
            session.execute(
                insert(ChunkItem),
                [
                    {"job_id": chunk.id, "position": i, "compound_id": c}
                    for i, c in enumerate(members)
                ],
            )
            audit.append(
                session,
                actor=self.actor,
                action="job.received",
                subject=f"job:{chunk.id}",
                details={"kind": chunk.kind, "parent": self.job_id, "items": len(members)},
            )
            created.append(int(chunk.id))
        return created

    def publish(self, chunk_ids: list[int], publisher: Publisher) -> None:
        """Mark committed chunks queued (committed first), then hand their ids to the broker."""
        if not chunk_ids:
            return
        with session_scope(self.settings.database_url) as session:
            for cid in chunk_ids:
                transition(session, cid, JobState.QUEUED, actor=self.actor)
        for cid in chunk_ids:
            publisher(cid, JobKind.CHEM_CHUNK.value)
        self.chunk_ids.extend(chunk_ids)
        self.counts["chunks"] = len(self.chunk_ids)


def _canonicalised(
    batches: Iterable[list[RawRecord]],
    processes: int,
    seconds: dict[str, float],
    memo_limit: int = 2048,
) -> Iterator[tuple[list[RawRecord], list[Canonical | Invalid]]]:
    """Each batch with its canonicalisation results, in file order.

    With ``processes`` > 1 the RDKit work (parse, canonical SMILES, InChIKey: nearly all of a
    submitter's CPU) runs in that many processes, at most two batches per process in flight so
    a library of millions of rows never sits in memory; the database work stays here, in order.
    ``seconds["canonicalize"]`` accumulates the time this process spent on it or waiting for it.
    """
    if processes <= 1:
        # Across batches too, bounded to one batch's worth of molecules so memory stays flat
        # whatever the file's length: a molecule repeated nearby gets one InChIKey.
        memo = InchiKeyMemo(limit=memo_limit)
        for batch in batches:
            started = time.perf_counter()
            results = memo.canonicalize_all([(r.text, r.molblock) for r in batch])
            seconds["canonicalize"] += time.perf_counter() - started
            yield batch, results
        return
    window: deque[tuple[list[RawRecord], Future[list[Canonical | Invalid]]]] = deque()

    def oldest() -> tuple[list[RawRecord], list[Canonical | Invalid]]:
        started = time.perf_counter()
        batch, future = window.popleft()
        results = future.result()
        seconds["canonicalize"] += time.perf_counter() - started
        return batch, results

    # spawn: the children import RDKit afresh instead of inheriting this process's database
    # connections and threads.
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        for batch in batches:
            items = [(r.text, r.molblock) for r in batch]
            window.append((batch, pool.submit(canonicalize_all, items)))
            if len(window) >= 2 * processes:
                yield oldest()
        while window:
            yield oldest()


def _batches(
    records: Iterable[RawRecord], size: int, first: int | None = None
) -> Iterable[list[RawRecord]]:
    """Batches of ``size`` rows; the first of ``first`` rows (one chunk's worth) so that the
    first chunk reaches the workers after one chunk is canonicalised, not a whole batch: the
    workers and Triton start while the submitter still reads."""
    batch: list[RawRecord] = []
    limit = min(size, first or size)
    for rec in records:
        batch.append(rec)
        if len(batch) >= limit:
            yield batch
            batch = []
            limit = size
    if batch:
        yield batch


def submit_library(
    path: Path,
    settings: Settings,
    publisher: Publisher,
    options: ScreenOptions | None = None,
    progress: ProgressFn | None = None,
    *,
    actor: str | None = None,
    on_registered: Callable[[int], None] | None = None,
) -> SubmitResult:
    """Validate, deduplicate and chunk ``path``; publish each chunk as soon as it is committed.
    ``actor`` is who submits (audited; default: the user at this terminal);
    ``on_registered(job_id)`` is called once the new job is committed, before the file is read
    (an HTTP answer can name the job while its rows are still being read)."""
    options = options or ScreenOptions()
    path = Path(path)
    reader = LibraryReader(
        path, fmt=options.fmt, smiles_column=options.smiles_column, id_column=options.id_column
    )
    sha = file_sha256(path)
    base_key = _base_key(sha, options, settings)
    actor = actor or audit.current_actor("user")
    with session_scope(settings.database_url) as session:
        existing = None if options.force else live_job_for_key(session, base_key)
        if existing is not None:
            audit.append(
                session,
                actor=actor,
                action="job.resubmitted",
                subject=f"job:{existing.id}",
                details={"file_sha256": sha, "note": "same file and options; not rescored"},
            )
            return SubmitResult(int(existing.id), True, dict(existing.summary or {}))
        key = next_key(session, base_key, options.force)
        parent = Job(
            kind=JobKind.CHEM_SCREEN.value,
            source=path.name[:512],
            idempotency_key=key,
            state=JobState.RECEIVED.value,
            params={
                "file_sha256": sha,
                "format": reader.fmt,
                "smiles_column": options.smiles_column,
                "id_column": options.id_column,
                "force": options.force,
                "model_name": settings.chem_model_name,
                "model_version": settings.chem_model_version,
            },
        )
        add_submission(session, parent, path.name)
        audit.append(
            session,
            actor=actor,
            action="job.received",
            subject=f"job:{parent.id}",
            details={"kind": parent.kind, "file_sha256": sha, "library": path.name},
        )
        job_id = int(parent.id)
    if on_registered is not None:
        on_registered(job_id)

    sub = _Submission(job_id, key, path.name, settings, options, actor)
    try:
        with reader:
            batches = _batches(reader, settings.chem_ingest_batch, first=sub.chunk_size)
            processes = settings.chem_canonicalize_processes
            canonicalised = _canonicalised(
                batches, processes, sub.seconds, memo_limit=settings.chem_ingest_batch
            )
            for batch, results in canonicalised:
                with session_scope(settings.database_url) as session:
                    sub.add_batch(session, batch, results)
                    created = sub.make_chunks(session, final=False)
                    session.execute(
                        update(Job)
                        .where(Job.id == job_id)
                        .values(updated_at=utcnow(), summary=dict(sub.counts))
                    )
                sub.publish(created, publisher)
                if progress:
                    progress(reader.progress(), sub.counts["rows"])
    except InputError as exc:
        with session_scope(settings.database_url) as session:
            transition(
                session, job_id, JobState.REJECTED, actor=actor, error=str(exc), summary=sub.counts
            )
        raise
    with session_scope(settings.database_url) as session:
        created = sub.make_chunks(session, final=True)
    sub.publish(created, publisher)
    with session_scope(settings.database_url) as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(item_count=sub.counts["valid"], summary=dict(sub.counts))
        )
        transition(session, job_id, JobState.QUEUED, actor=actor, summary=dict(sub.counts))
    with session_scope(settings.database_url) as session:
        finish_parent_if_complete(session, job_id, actor=actor)
    log.info("job %s: %s", job_id, sub.counts)
    return SubmitResult(job_id, False, dict(sub.counts), list(sub.chunk_ids), dict(sub.seconds))
