"""Results of a screening job, row by row in file order, for export and reports.

Every line of the submitted file appears once: scored, duplicate (pointing at the first line of
the same molecule), rejected (with RDKit's reason), or pending (its molecule is still being
scored by another job). Rows stream in pages, so exporting a million-row library is bounded.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import InputError
from core.job_kinds import JobKind
from core.model_registry import served_model
from core.served_models import FieldType, ServedModel
from db.jobs import get_job
from db.models import Compound, LibraryEntry, Prediction
from db.rejections import iter_rejections

#: How a result field of each type is exported.
ARROW_TYPES: dict[FieldType, pa.DataType] = {
    "float": pa.float64(),
    "bool": pa.bool_(),
    "str": pa.string(),
}


def screen_schema(model: ServedModel) -> pa.Schema:
    """The export's columns: the line, what became of it, the model's result fields, why not."""
    return pa.schema(
        [
            ("line_no", pa.int64()),
            ("record_name", pa.string()),
            ("status", pa.string()),
            ("canonical_smiles", pa.string()),
            ("inchikey", pa.string()),
            ("duplicate_of_line", pa.int64()),
            *((name, ARROW_TYPES[kind]) for name, kind in model.result_fields()),
            ("model_name", pa.string()),
            ("model_version", pa.string()),
            ("reason", pa.string()),
            ("input", pa.string()),
        ]
    )


def _accepted(
    session: Session, job_id: int, model: ServedModel, version: str, page: int
) -> Iterator[dict[str, Any]]:
    fields = [name for name, _ in model.result_fields()]
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
                Prediction.model_name == model.name,
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
                **{f: outputs.get(f) if outputs else None for f in fields},
                "model_name": model.name if outputs else None,
                "model_version": version if outputs else None,
                "reason": None,
                "input": None,
            }
        last = rows[-1].line_no


def _rejected(
    session: Session, job_id: int, columns: list[str], page: int
) -> Iterator[dict[str, Any]]:
    for r in iter_rejections(session, job_id, page):
        yield {
            **dict.fromkeys(columns),
            "line_no": r.line_no,
            "record_name": r.record_name,
            "status": "rejected",
            "reason": r.reason,
            "input": r.raw,
        }


def screen_results(
    session: Session, job_id: int, page: int = 5000
) -> tuple[pa.Schema, Iterator[dict[str, Any]]]:
    """The export's columns and all rows of a screening job in line order."""
    job = get_job(session, job_id)
    if job.kind != JobKind.CHEM_SCREEN.value:
        raise InputError(f"job {job_id} is a {job.kind} job, not a screening job")
    model = served_model(str(job.params["model_name"]))
    version = str(job.params["model_version"])
    schema = screen_schema(model)
    rows = heapq.merge(
        _accepted(session, job_id, model, version, page),
        _rejected(session, job_id, schema.names, page),
        key=lambda row: row["line_no"],
    )
    return schema, rows
