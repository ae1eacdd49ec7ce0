"""Register an EHR extract as a job, once per content: the entry point of ``medbatch ehr`` and
of the drop-folder scan.

Registering is cheap (hash the file, two rows, one message); the streaming itself runs in a
worker (``workers/ehr/partition.py``), so a 5-GB extract never ties up the caller and a killed
ingest is redelivered like any other task. Submitting the same bytes again, under any name,
finds the job that already exists and scores nothing twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from core.errors import ExtractRejectedError, InputError
from core.job_kinds import JobKind
from core.model_registry import ehr_models
from core.settings import Settings
from core.storage import storage_for
from db import audit
from db.jobs import add_submission, live_job_for_key, next_key
from db.models import Job, JobState
from db.session import session_scope
from ingest.ehr.fhir_export import (
    NDJSON_BYTES_PER_CSV_BYTE,
    export_sha256,
    fingerprint,
    looks_like_export,
    open_export,
)
from ingest.ehr.formats import detect_format
from ingest.files import file_sha256
from ingest.text import text_size

log = logging.getLogger(__name__)

Publisher = Callable[[int, str], None]


@dataclass(frozen=True)
class ExtractSubmission:
    job_id: int  # the extract (parent) job
    existing: bool  # the same content was submitted before: nothing new was queued
    ingest_id: int | None = None


def model_versions(settings: Settings) -> dict[str, str]:
    """The EHR models and versions an extract is scored with (part of its identity)."""
    return {m.name: m.version(settings) for m in ehr_models(settings)}


def extract_sha256(path: Path) -> str:
    """The content identity of an extract: the file's SHA-256, or for a FHIR export the hash of
    its Patient and Observation files (:func:`ingest.ehr.fhir_export.export_sha256`: the same
    export as a folder, a .zip or a .tar is one extract). Something that is neither (it will be
    a rejected job) is known by its bytes, or a folder by its listing."""
    path = Path(path)
    if looks_like_export(path):
        try:
            return export_sha256(open_export(path))
        except InputError:
            pass
    if path.is_file():
        return file_sha256(path)
    listing = hashlib.sha256(b"medbatch folder listing\n")
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = item.stat()
        listing.update(f"{item.relative_to(path)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return listing.hexdigest()


def store_extract(path: Path, sha: str, settings: Settings) -> str:
    """Put the extract (a file, or an export folder's files) in storage once per content, under
    ``uploads/<sha256>/<name>``; its key. Raises StorageUnavailableError: nothing is queued."""
    storage = storage_for(settings)
    key = f"uploads/{sha}/{path.name}"
    if not (path.is_file() and storage.exists(key)):
        storage.put_tree(key, path)
    return key


def _base_key(sha: str, settings: Settings) -> str:
    salient = json.dumps({"sha256": sha, "models": model_versions(settings)}, sort_keys=True)
    return "ehr_extract:" + hashlib.sha256(salient.encode()).hexdigest()[:40]


def _record_rejected(
    path: Path, sha: str, base_key: str, error: str, settings: Settings, actor: str
) -> int:
    """A file that is not an extract still leaves a job saying why (the drop folder's owner
    looks at `medbatch jobs`, not at a terminal)."""
    with session_scope(settings.database_url) as session:
        job = Job(
            kind=JobKind.EHR_EXTRACT.value,
            source=path.name[:512],
            idempotency_key=next_key(session, base_key, force=False),
            state=JobState.REJECTED.value,
            error=error,
            params={"path": str(path), "file_sha256": sha},
        )
        session.add(job)
        session.flush()
        audit.append(
            session,
            actor=actor,
            action="job.rejected",
            subject=f"job:{job.id}",
            details={"kind": job.kind, "file_sha256": sha, "error": error},
        )
        return int(job.id)


def submit_extract(
    path: Path,
    settings: Settings,
    publisher: Publisher,
    *,
    force: bool = False,
    sha256: str | None = None,
    actor: str | None = None,
) -> ExtractSubmission:
    """Create the extract job and its ingest job and publish the ingest; or find the job that
    already holds this content. Raises :class:`InputError` for a file that is not an extract."""
    path = Path(path).resolve()
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    size_bytes, mtime_ns = fingerprint(path)
    sha = sha256 or extract_sha256(path)
    base_key = _base_key(sha, settings)
    actor = actor or audit.current_actor("user")
    try:
        fmt = detect_format(path)
    except InputError as exc:
        job_id = _record_rejected(path, sha, base_key, str(exc), settings, actor)
        raise ExtractRejectedError(f"{exc} (recorded as job {job_id})", job_id) from exc
    with session_scope(settings.database_url) as session:
        existing = None if force else live_job_for_key(session, base_key)
        if existing is not None:
            audit.append(
                session,
                actor=actor,
                action="job.resubmitted",
                subject=f"job:{existing.id}",
                details={"file_sha256": sha, "note": "same extract content; not rescored"},
            )
            return ExtractSubmission(int(existing.id), True)
        params: dict[str, object] = {
            "path": str(path),
            "file_sha256": sha,
            "size_bytes": size_bytes,
            "mtime_ns": mtime_ns,
            "format": fmt,
            "models": model_versions(settings),
        }
        if settings.storage_is_remote:  # workers on other hosts read it from the shared store
            params["object"] = store_extract(path, sha, settings)
        if fmt == "fhir":
            export = open_export(path)
            text_bytes = export.text_bytes()
            params["text_bytes"] = text_bytes
            params["bucket_basis_bytes"] = text_bytes // NDJSON_BYTES_PER_CSV_BYTE
            params["fhir"] = export.describe()
        else:
            params["text_bytes"] = text_size(path)
        parent = Job(
            kind=JobKind.EHR_EXTRACT.value,
            source=path.name[:512],
            idempotency_key=next_key(session, base_key, force),
            state=JobState.QUEUED.value,
            params=params,
        )
        add_submission(session, parent, path.name)
        ingest = Job(
            kind=JobKind.EHR_INGEST.value,
            parent_id=parent.id,
            source=path.name[:512],
            idempotency_key=f"ehr_ingest:{parent.id}",
            state=JobState.QUEUED.value,
            params=params,
        )
        session.add(ingest)
        session.flush()
        for job in (parent, ingest):
            audit.append(
                session,
                actor=actor,
                action="job.queued",
                subject=f"job:{job.id}",
                details={"kind": job.kind, "file_sha256": sha, "file": path.name},
            )
        parent_id, ingest_id = int(parent.id), int(ingest.id)
    # Committed first, then published: a message lost here is re-sent by the sweeper.
    publisher(ingest_id, JobKind.EHR_INGEST.value)
    log.info("extract job %s registered (%s format, %d bytes)", parent_id, fmt, size_bytes)
    return ExtractSubmission(parent_id, False, ingest_id)
