"""The drop folder the data warehouse writes its nightly extracts into, scanned on a schedule.

A file is taken once it has been unchanged for ``ehr_drop_settle_s`` (a copy still in progress
is left for the next scan), and each version of a file (path, size, modification time) is hashed
only once. Its content hash decides the rest: an extract already submitted, under this name or
another, is recorded as a duplicate and not scored again.

A folder (a FHIR Bulk Data ``$export`` as a client downloads it) is a candidate too; it is
settled when none of the files in it has changed for the settle time, and its version is its
total size and newest modification time. A .zip or .tar of an export is a file like any other.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from core.errors import ExtractRejectedError, InputError
from core.settings import Settings
from db.insert_ignore import insert_ignore
from db.models import EhrDropFile
from db.session import session_scope
from ingest.ehr.fhir_export import fingerprint
from ingest.ehr.submit import Publisher, extract_sha256, submit_extract

log = logging.getLogger(__name__)

#: Names that are never extracts: partial copies and the synthetic generator's sidecars (which
#: hold ground truth and must not be scored).
_IGNORED_SUFFIXES = (".part", ".tmp", ".partial", "~", ".truth.csv", ".defects.csv")
ACTOR = "scheduler:ehr-drop-folder"


@dataclass(frozen=True)
class DropOutcome:
    file: str  # the file's name (not its full path: a log line may carry it)
    outcome: str  # submitted | duplicate | rejected
    job_id: int | None


def _candidates(folder: Path, settle_s: float, now: float) -> list[tuple[Path, int, int]]:
    found = []
    for path in sorted(folder.iterdir()):
        name = path.name.lower()
        if name.startswith(".") or name.endswith(_IGNORED_SUFFIXES):
            continue
        if not (path.is_file() or path.is_dir()):
            continue
        size, mtime_ns = fingerprint(path)  # a folder: everything in it
        if now - mtime_ns / 1e9 < settle_s:
            continue  # still being written (or just finished): next scan
        found.append((path.resolve(), size, mtime_ns))
    return found


def scan_drop_folder(
    settings: Settings, publisher: Publisher, *, now: float | None = None
) -> list[DropOutcome]:
    """Submit every settled file of the drop folder not seen before; what happened to each."""
    folder = settings.ehr_drop_dir
    if folder is None:
        return []
    if not folder.is_dir():
        raise InputError(f"the EHR drop folder {folder} does not exist (MEDBATCH_EHR_DROP_DIR)")
    outcomes = []
    for path, size, mtime_ns in _candidates(folder, settings.ehr_drop_settle_s, now or time.time()):
        with session_scope(settings.database_url) as session:
            seen = session.scalar(
                select(EhrDropFile.id).where(
                    EhrDropFile.path == str(path),
                    EhrDropFile.size_bytes == size,
                    EhrDropFile.mtime_ns == mtime_ns,
                )
            )
        if seen is not None:
            continue
        sha = extract_sha256(path)
        job_id: int | None
        try:
            result = submit_extract(path, settings, publisher, sha256=sha, actor=ACTOR)
            outcome, job_id = ("duplicate" if result.existing else "submitted"), result.job_id
        except ExtractRejectedError as exc:
            outcome, job_id = "rejected", exc.job_id
        with session_scope(settings.database_url) as session:
            insert_ignore(
                session,
                EhrDropFile,
                [
                    {
                        "path": str(path),
                        "size_bytes": size,
                        "mtime_ns": mtime_ns,
                        "sha256": sha,
                        "job_id": job_id,
                        "outcome": outcome,
                    }
                ],
                ("path", "size_bytes", "mtime_ns"),
            )
        log.info("drop folder: %s %s (job %s)", path.name, outcome, job_id)
        outcomes.append(DropOutcome(path.name, outcome, job_id))
    return outcomes
