"""Results of a screening job, row by row in file order, for CSV or Parquet export.

Every line of the submitted file appears once: scored, duplicate (pointing at the first line of
the same molecule), rejected (with RDKit's reason), or pending (its molecule is still being
scored by another job). Rows stream in pages, so exporting a million-row library is bounded.
"""

from __future__ import annotations

import csv
import heapq
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy import select
from sqlalchemy.orm import Session

from db import audit, ehr_exports
from db.jobs import get_job
from db.models import Compound, JobKind, LibraryEntry, Prediction, Rejection
from medbatch.errors import InputError

COLUMNS = [
    "line_no",
    "record_name",
    "status",
    "canonical_smiles",
    "inchikey",
    "duplicate_of_line",
    "logS",
    "model_name",
    "model_version",
    "reason",
    "input",
]
_SCHEMA = pa.schema(
    [
        ("line_no", pa.int64()),
        ("record_name", pa.string()),
        ("status", pa.string()),
        ("canonical_smiles", pa.string()),
        ("inchikey", pa.string()),
        ("duplicate_of_line", pa.int64()),
        ("logS", pa.float64()),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("reason", pa.string()),
        ("input", pa.string()),
    ]
)


def _accepted(
    session: Session, job_id: int, model: str, version: str, page: int
) -> Iterator[dict[str, Any]]:
    last = 0
    while True:
        rows = session.execute(
            select(
                LibraryEntry.line_no,
                LibraryEntry.record_name,
                LibraryEntry.duplicate_of_line,
                Compound.id,
                Compound.canonical_smiles,
                Compound.inchikey,
            )
            .join(Compound, Compound.id == LibraryEntry.compound_id)
            .where(LibraryEntry.job_id == job_id, LibraryEntry.line_no > last)
            .order_by(LibraryEntry.line_no)
            .limit(page)
        ).all()
        if not rows:
            return
        ids = list({r.id for r in rows})
        latest: dict[int, dict[str, Any]] = {}
        for cid, outputs in session.execute(
            select(Prediction.compound_id, Prediction.outputs)
            .where(
                Prediction.compound_id.in_(ids),
                Prediction.model_name == model,
                Prediction.model_version == version,
            )
            .order_by(Prediction.id)
        ):
            latest[int(cid)] = outputs
        for r in rows:
            outputs = latest.get(int(r.id))
            status = (
                "duplicate"
                if r.duplicate_of_line is not None
                else "scored"
                if outputs
                else "pending"
            )
            yield {
                "line_no": r.line_no,
                "record_name": r.record_name,
                "status": status,
                "canonical_smiles": r.canonical_smiles,
                "inchikey": r.inchikey,
                "duplicate_of_line": r.duplicate_of_line,
                "logS": outputs.get("logS") if outputs else None,
                "model_name": model if outputs else None,
                "model_version": version if outputs else None,
                "reason": None,
                "input": None,
            }
        last = rows[-1].line_no


@dataclass(frozen=True)
class RejectedLine:
    line_no: int
    record_name: str | None
    raw: str
    reason: str


def iter_rejections(session: Session, job_id: int, page: int) -> Iterator[RejectedLine]:
    """The job's rejected lines in line order, paged."""
    last = 0
    while True:
        rows = session.execute(
            select(Rejection.line_no, Rejection.record_name, Rejection.raw, Rejection.reason)
            .where(Rejection.job_id == job_id, Rejection.line_no > last)
            .order_by(Rejection.line_no)
            .limit(page)
        ).all()
        if not rows:
            return
        for r in rows:
            yield RejectedLine(r.line_no, r.record_name, r.raw, r.reason)
        last = rows[-1].line_no


def _rejected(session: Session, job_id: int, page: int) -> Iterator[dict[str, Any]]:
    for r in iter_rejections(session, job_id, page):
        yield {
            **dict.fromkeys(COLUMNS),
            "line_no": r.line_no,
            "record_name": r.record_name,
            "status": "rejected",
            "reason": r.reason,
            "input": r.raw,
        }


def iter_screen_results(
    session: Session, job_id: int, page: int = 5000
) -> Iterator[dict[str, Any]]:
    """All rows of a screening job in line order."""
    job = get_job(session, job_id)
    if job.kind != JobKind.CHEM_SCREEN.value:
        raise InputError(
            f"job {job_id} is a {job.kind} job; results are exported per screening job or "
            "EHR extract job"
        )
    model, version = str(job.params["model_name"]), str(job.params["model_version"])
    yield from heapq.merge(
        _accepted(session, job_id, model, version, page),
        _rejected(session, job_id, page),
        key=lambda row: row["line_no"],
    )


def export_results(
    session: Session, job_id: int, out: Path, *, actor: str, batch: int = 5000
) -> int:
    """Write the job's results to ``out`` (.csv or .parquet); audited; returns rows written."""
    suffix = out.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise InputError(f"{out.name}: export to .csv or .parquet")
    job = get_job(session, job_id)
    if job.kind == JobKind.EHR_EXTRACT.value:
        columns, schema = ehr_exports.COLUMNS, ehr_exports.SCHEMA
        rows = ehr_exports.iter_ehr_results(session, job_id, page=batch)
    else:
        columns, schema = COLUMNS, _SCHEMA
        rows = iter_screen_results(session, job_id, page=batch)
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    if suffix == ".csv":
        with out.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow(row)
                count += 1
    else:
        with pq.ParquetWriter(out, schema) as writer:
            buffer: list[dict[str, Any]] = []
            for row in rows:
                buffer.append(row)
                if len(buffer) >= batch:
                    writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
                    count += len(buffer)
                    buffer = []
            if buffer or count == 0:
                writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
                count += len(buffer)
    audit.append(
        session,
        actor=actor,
        action="results.export",
        subject=f"job:{job_id}",
        details={"rows": count, "format": suffix.lstrip("."), "file": out.name},
    )
    return count
