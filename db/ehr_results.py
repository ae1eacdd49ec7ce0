"""Results of an EHR extract for export and reports: one row per scored patient (every model's
risk and explanation side by side), then one row per rejected line of the file with its reason.

The columns follow from the models the extract was scored with (their registry entries): each
model adds ``<prefix>_risk``, ``_model_version``, ``_top_visits`` (models with attention),
``_out_of_distribution`` and ``_reconstruction_error`` (models with those outputs),
``_top_variables`` and ``_not_scored``. Patients stream in pages of ``page`` identifiers, so
exporting a large extract stays bounded.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.errors import InputError
from core.job_kinds import JobKind
from core.model_registry import served_model
from core.served_models import ServedModel
from db.jobs import get_job
from db.models import EhrScore
from db.rejections import iter_rejections

#: The columns a scoring job writes, in the order of the driver-level statements below.
SCORE_COLUMNS = (
    "extract_id",
    "job_id",
    "patient_id",
    "model_name",
    "model_version",
    "risk",
    "not_scored",
    "out_of_distribution",
    "reconstruction_error",
    "visits",
    "measurements",
    "explanation",
    "created_at",
)
#: One score per (extract, patient, model): the unique key every insert conflicts on.
_KEY = ("extract_id", "patient_id", "model_name")
_CONFLICT = f"({', '.join(_KEY)})"
_REPLACE = "DO UPDATE SET " + ", ".join(
    f"{c} = excluded.{c}" for c in SCORE_COLUMNS if c not in _KEY
)


def insert_scores(
    session: Session, rows: Sequence[dict[str, Any]], *, replace: bool = False
) -> int:
    """Store scoring rows (dicts keyed by :data:`SCORE_COLUMNS`) once each: a row whose
    (extract, patient, model) is already stored is skipped, so a redelivered batch writes
    nothing twice. Returns the rows inserted (or replaced).

    ``replace``: a stored row is overwritten instead (a patient scored early on part of its rows,
    ``ingest.ehr.release``, is scored again on all of them).

    The rows go to the driver as columns converted once per column by the columns' own
    SQLAlchemy types (JSON by the engine's serialiser, timestamps as the dialect stores them),
    not through a per-row compiled statement: on PostgreSQL by ``COPY`` (:func:`_copy_scores`),
    on SQLite by one ``executemany`` of ``INSERT … ON CONFLICT DO NOTHING``. Measured on 22,000
    rows against the SQLAlchemy multi-row ``VALUES … RETURNING`` it replaces: PostgreSQL 192 →
    42 µs a row, SQLite 26 → 13.
    """
    if not rows:
        return 0
    connection = session.connection()
    dialect = connection.dialect
    table = EhrScore.__table__
    columns: list[list[Any]] = []
    for name in SCORE_COLUMNS:
        values = [row[name] for row in rows]
        process = table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
        columns.append([process(v) for v in values] if process is not None else values)
    records = list(zip(*columns, strict=True))
    names = ", ".join(SCORE_COLUMNS)
    raw = connection.connection.dbapi_connection
    assert raw is not None
    on_conflict = f"ON CONFLICT {_CONFLICT} " + (_REPLACE if replace else "DO NOTHING")
    if dialect.name == "postgresql":
        return _copy_scores(raw, records, on_conflict)
    marks = ", ".join("?" * len(SCORE_COLUMNS))
    before = raw.total_changes  # type: ignore[attr-defined]
    cursor = raw.cursor()
    try:
        cursor.executemany(
            f"INSERT INTO ehr_scores ({names}) VALUES ({marks}) {on_conflict}", records
        )
    finally:
        cursor.close()
    return int(raw.total_changes - before)  # type: ignore[attr-defined]


def _copy_scores(raw: Any, records: list[tuple[Any, ...]], on_conflict: str) -> int:
    """PostgreSQL: ``COPY`` straight into ``ehr_scores`` (a first delivery, nearly always);
    if some row is already stored (a redelivered batch), undo that under a savepoint and go
    through a temporary table and ``INSERT … ON CONFLICT DO NOTHING`` instead."""
    import psycopg

    names = ", ".join(SCORE_COLUMNS)
    with raw.cursor() as cur:
        cur.execute("SAVEPOINT ehr_scores_copy")
        try:
            with cur.copy(f"COPY ehr_scores ({names}) FROM STDIN") as copy:
                for record in records:
                    copy.write_row(record)
        except psycopg.errors.UniqueViolation:
            cur.execute("ROLLBACK TO SAVEPOINT ehr_scores_copy")
        else:
            cur.execute("RELEASE SAVEPOINT ehr_scores_copy")
            return len(records)
        cur.execute(
            "CREATE TEMP TABLE IF NOT EXISTS ehr_scores_incoming ON COMMIT DELETE ROWS AS "
            f"SELECT {names} FROM ehr_scores WITH NO DATA"
        )
        cur.execute("DELETE FROM ehr_scores_incoming")
        with cur.copy(f"COPY ehr_scores_incoming ({names}) FROM STDIN") as copy:
            for record in records:
                copy.write_row(record)
        cur.execute(
            f"INSERT INTO ehr_scores ({names}) SELECT {names} FROM ehr_scores_incoming "
            f"{on_conflict}"
        )
        return int(cur.rowcount)


def extract_models(session: Session, extract_id: int) -> list[ServedModel]:
    """The models an extract was scored with, in the order it was submitted with."""
    job = get_job(session, extract_id)
    if job.kind != JobKind.EHR_EXTRACT.value:
        raise InputError(f"job {extract_id} is a {job.kind} job, not an EHR extract")
    return [served_model(name) for name in dict(job.params.get("models", {}))]


def prefix(model: ServedModel) -> str:
    return model.column_prefix or model.name


def visits_model(models: list[ServedModel]) -> ServedModel | None:
    """The model whose visit count the ``visits`` column shows: the first sequence model."""
    return next((m for m in models if m.max_visits is not None), models[0] if models else None)


def ehr_schema(models: list[ServedModel]) -> pa.Schema:
    fields: list[tuple[str, pa.DataType]] = [("patient_id", pa.string()), ("status", pa.string())]
    for m in models:
        p = prefix(m)
        fields += [(f"{p}_risk", pa.float64()), (f"{p}_model_version", pa.string())]
        if m.has("ATTENTION"):
            fields.append((f"{p}_top_visits", pa.string()))
        if m.has("OOD"):
            fields.append((f"{p}_out_of_distribution", pa.bool_()))
        if m.has("RECON_ERROR"):
            fields.append((f"{p}_reconstruction_error", pa.float64()))
        fields += [(f"{p}_top_variables", pa.string()), (f"{p}_not_scored", pa.string())]
    fields += [
        ("visits", pa.int64()),
        ("measurements", pa.int64()),
        ("line_no", pa.int64()),
        ("reason", pa.string()),
    ]
    return pa.schema(fields)


def _variables(explanation: dict[str, Any]) -> str:
    return "; ".join(
        f"{v['variable']} {v['contribution']:+.3f}" for v in explanation.get("top_variables", [])
    )


def _visits(explanation: dict[str, Any]) -> str:
    return "; ".join(f"{v['day']} {v['weight']:.2f}" for v in explanation.get("top_visits", []))


def _patient_row(
    columns: list[str], models: dict[str, ServedModel], patient_id: str, scores: list[EhrScore]
) -> dict[str, Any]:
    row: dict[str, Any] = {**dict.fromkeys(columns), "patient_id": patient_id, "status": "scored"}
    shows_visits = visits_model(list(models.values()))
    for s in scores:
        m = models.get(s.model_name)
        if m is None:
            continue
        p = prefix(m)
        row[f"{p}_risk"] = s.risk
        row[f"{p}_model_version"] = s.model_version
        if m.has("ATTENTION"):
            row[f"{p}_top_visits"] = _visits(s.explanation)
        if m.has("OOD"):
            row[f"{p}_out_of_distribution"] = s.out_of_distribution
        if m.has("RECON_ERROR"):
            row[f"{p}_reconstruction_error"] = s.reconstruction_error
        row[f"{p}_top_variables"] = _variables(s.explanation)
        row[f"{p}_not_scored"] = s.not_scored
        if m is shows_visits:
            row["visits"] = s.visits
        row["measurements"] = s.measurements
    return row


def iter_patient_scores(
    session: Session, extract_id: int, page: int = 2000
) -> Iterator[tuple[str, list[EhrScore]]]:
    """(patient id, that patient's scores) in identifier order."""
    last = ""
    while True:
        ids = list(
            session.scalars(
                select(EhrScore.patient_id)
                .where(EhrScore.extract_id == extract_id, EhrScore.patient_id > last)
                .group_by(EhrScore.patient_id)
                .order_by(EhrScore.patient_id)
                .limit(page)
            )
        )
        if not ids:
            return
        by_patient: dict[str, list[EhrScore]] = {i: [] for i in ids}
        for score in session.scalars(
            select(EhrScore)
            .where(EhrScore.extract_id == extract_id, EhrScore.patient_id.in_(ids))
            .order_by(EhrScore.patient_id, EhrScore.model_name)
        ):
            by_patient[score.patient_id].append(score)
        yield from by_patient.items()
        last = ids[-1]


def ehr_results(
    session: Session, extract_id: int, page: int = 2000
) -> tuple[pa.Schema, Iterator[dict[str, Any]]]:
    """The export's columns and its rows: patients in identifier order, then rejected lines."""
    models = extract_models(session, extract_id)
    schema = ehr_schema(models)
    columns = schema.names
    by_name = {m.name: m for m in models}

    def rows() -> Iterator[dict[str, Any]]:
        for patient_id, scores in iter_patient_scores(session, extract_id, page):
            yield _patient_row(columns, by_name, patient_id, scores)
        for r in iter_rejections(session, extract_id, page):
            yield {
                **dict.fromkeys(columns),
                "status": "rejected",
                "line_no": r.line_no,
                "reason": r.reason,
            }

    return schema, rows()
