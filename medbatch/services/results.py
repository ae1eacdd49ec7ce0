"""Results of a job as a table: one schema and a stream of rows per kind of job, written to a
file (CSV, Parquet) or streamed (CSV, Parquet, NDJSON) in bounded memory."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from sqlalchemy.orm import Session

from core.errors import InputError
from core.job_kinds import JobKind
from core.served_models import IN_DOMAIN
from core.settings import Settings
from db import audit
from db.ehr_results import ehr_results
from db.jobs import get_job
from db.screen_results import screen_results
from db.session import read_scope, session_scope

Format = Literal["csv", "parquet", "ndjson"]
FORMATS: tuple[Format, ...] = ("csv", "parquet", "ndjson")

#: Which rows a kind of job exports (the kinds the job-kind table marks as having results).
READERS: dict[str, Callable[[Session, int, int], tuple[pa.Schema, Iterator[dict[str, Any]]]]] = {
    JobKind.CHEM_SCREEN.value: screen_results,
    JobKind.EHR_EXTRACT.value: ehr_results,
}


@dataclass
class ResultTable:
    job_id: int
    schema: pa.Schema
    rows: Iterator[dict[str, Any]]


def result_table(
    session: Session, job_id: int, page: int = 5000, *, in_domain_only: bool = False
) -> ResultTable:
    """The job's export: a screening job's, one row per line of the file; an EHR extract's,
    one row per scored patient then one per rejected line. ``in_domain_only`` keeps the rows
    whose molecule is inside the model's applicability domain (scored ones and their
    duplicates)."""
    job = get_job(session, job_id)
    reader = READERS.get(job.kind)
    if reader is None:
        raise InputError(
            f"job {job_id} is a {job.kind} job; results are exported per screening job or "
            "EHR extract job"
        )
    schema, rows = reader(session, job_id, page)
    if in_domain_only:
        if IN_DOMAIN not in schema.names:
            raise InputError(
                f"job {job_id}'s results have no {IN_DOMAIN} column: only a model with an "
                "applicability domain can be filtered by it"
            )
        rows = (row for row in rows if row[IN_DOMAIN] is True)
    return ResultTable(job_id, schema, rows)


def _batches(table: ResultTable, size: int) -> Iterator[pa.RecordBatch]:
    buffer: list[dict[str, Any]] = []
    for row in table.rows:
        buffer.append(row)
        if len(buffer) >= size:
            yield pa.RecordBatch.from_pylist(buffer, schema=table.schema)
            buffer = []
    if buffer:
        yield pa.RecordBatch.from_pylist(buffer, schema=table.schema)


class _Chunks(io.RawIOBase):
    """A write-only sink whose bytes are taken out as they come (streamed Parquet)."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.parts.append(bytes(b))
        return len(b)

    def take(self) -> bytes:
        data, self.parts = b"".join(self.parts), []
        return data


def stream_results(table: ResultTable, fmt: Format, batch: int = 5000) -> Iterator[bytes]:
    """The table encoded as ``fmt``, piece by piece: one batch of rows in memory at a time."""
    columns = table.schema.names
    if fmt == "csv":
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        for n, row in enumerate(table.rows, start=1):
            writer.writerow(row)
            if n % batch == 0:
                yield text.getvalue().encode()
                text.seek(0)
                text.truncate()
        yield text.getvalue().encode()
    elif fmt == "ndjson":
        lines: list[bytes] = []
        for row in table.rows:
            lines.append(orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE))
            if len(lines) >= batch:
                yield b"".join(lines)
                lines = []
        yield b"".join(lines)
    elif fmt == "parquet":
        sink = _Chunks()
        with pq.ParquetWriter(sink, table.schema) as writer:
            wrote = False
            for record_batch in _batches(table, batch):
                writer.write_batch(record_batch)
                wrote = True
                yield sink.take()
            if not wrote:
                writer.write_table(table.schema.empty_table())
        yield sink.take()
    else:
        raise InputError(f"unknown results format {fmt!r}: choose one of {', '.join(FORMATS)}")


def audit_export(settings: Settings, job_id: int, *, actor: str, **details: Any) -> None:
    """An export is an access to results: one audit event (its own write transaction)."""
    with session_scope(settings.database_url) as session:
        audit.append(
            session, actor=actor, action="results.export", subject=f"job:{job_id}", details=details
        )


def check_exportable(settings: Settings, job_id: int, *, in_domain_only: bool = False) -> None:
    """Raise what an export of ``job_id`` would raise (no such job, a kind without results)
    before anything is sent: an HTTP answer cannot change its status once streaming."""
    with read_scope(settings.database_url) as session:
        result_table(session, job_id, in_domain_only=in_domain_only)


def stream_job_results(
    settings: Settings,
    job_id: int,
    fmt: Format,
    *,
    batch: int = 5000,
    in_domain_only: bool = False,
) -> Iterator[bytes]:
    """The job's results encoded as ``fmt``, read in a read-only transaction (workers keep
    committing meanwhile), one page of rows in memory at a time."""
    with read_scope(settings.database_url) as session:
        table = result_table(session, job_id, page=batch, in_domain_only=in_domain_only)
        yield from stream_results(table, fmt, batch)


def export_results(
    settings: Settings,
    job_id: int,
    out: Path,
    *,
    actor: str,
    batch: int = 5000,
    in_domain_only: bool = False,
) -> int:
    """``medbatch results JOB --out FILE``: the job's results written to a .csv or .parquet
    file (``in_domain_only``: the rows inside the model's applicability domain); audited;
    returns the rows written."""
    suffix = out.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise InputError(f"{out.name}: export to .csv or .parquet")
    count = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with read_scope(settings.database_url) as session:
        table = result_table(session, job_id, page=batch, in_domain_only=in_domain_only)

        def counted(rows: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
            nonlocal count
            for row in rows:
                count += 1
                yield row

        table.rows = counted(table.rows)
        with out.open("wb") as fh:
            for piece in stream_results(table, "csv" if suffix == ".csv" else "parquet", batch):
                fh.write(piece)
    extra = {"in_domain_only": True} if in_domain_only else {}
    audit_export(
        settings, job_id, actor=actor, rows=count, format=suffix[1:], file=out.name, **extra
    )
    return count
