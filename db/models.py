"""SQLAlchemy 2.0 typed models: jobs, compounds, predictions and the append-only audit log.

The database is the source of truth; Redis only carries job ids. Every table works on SQLite
and PostgreSQL (the migrations in ``db/migrations`` create exactly these tables).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: An auto-incrementing 64-bit key that SQLite also auto-increments (it only does for INTEGER).
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSON,
    }


class JobState(enum.StrEnum):
    """A job's life: received → queued → running → done | failed | rejected | not_applicable."""

    RECEIVED = "received"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"
    NOT_APPLICABLE = "not_applicable"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset(
    {JobState.DONE, JobState.FAILED, JobState.REJECTED, JobState.NOT_APPLICABLE}
)


class JobKind(enum.StrEnum):
    CHEM_SCREEN = "chem_screen"  # one library file; parent of its chunks
    CHEM_CHUNK = "chem_chunk"  # one Triton request's worth of molecules


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(
            "state IN ('received','queued','running','done','failed','rejected','not_applicable')",
            name="ck_jobs_state",
        ),
        Index("ix_jobs_parent_state", "parent_id", "state"),
        Index("ix_jobs_state_updated", "state", "updated_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))
    parent_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("jobs.id"), nullable=True)
    source: Mapped[str] = mapped_column(String(512))
    idempotency_key: Mapped[str] = mapped_column(String(128), unique=True)
    state: Mapped[str] = mapped_column(String(16), default=JobState.RECEIVED.value)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    summary: Mapped[dict[str, Any]] = mapped_column(default=dict)
    item_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)


class Compound(Base):
    """A unique molecule (by InChIKey) across every library ever screened."""

    __tablename__ = "compounds"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    inchikey: Mapped[str] = mapped_column(String(27), unique=True)
    canonical_smiles: Mapped[str] = mapped_column(Text)
    library: Mapped[str] = mapped_column(String(512), doc="Library the compound was first seen in.")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LibraryEntry(Base):
    """One accepted row of a screened file, pointing at its (deduplicated) compound."""

    __tablename__ = "library_entries"
    __table_args__ = (
        UniqueConstraint("job_id", "line_no", name="uq_library_entries_job_line"),
        Index("ix_library_entries_job_compound", "job_id", "compound_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(BigId, ForeignKey("jobs.id"))
    line_no: Mapped[int] = mapped_column(Integer)
    record_name: Mapped[str | None] = mapped_column(String(256), nullable=True)
    compound_id: Mapped[int] = mapped_column(BigId, ForeignKey("compounds.id"))
    duplicate_of_line: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Rejection(Base):
    """A row of a submitted file that could not be used, with the reason."""

    __tablename__ = "rejections"
    __table_args__ = (UniqueConstraint("job_id", "line_no", name="uq_rejections_job_line"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(BigId, ForeignKey("jobs.id"))
    line_no: Mapped[int] = mapped_column(Integer)
    record_name: Mapped[str | None] = mapped_column(String(256), nullable=True)
    raw: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)


class ChunkItem(Base):
    """Membership of a compound in a chunk job: what the worker scores, durable across crashes."""

    __tablename__ = "chunk_items"

    job_id: Mapped[int] = mapped_column(BigId, ForeignKey("jobs.id"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    compound_id: Mapped[int] = mapped_column(BigId, ForeignKey("compounds.id"))


class Prediction(Base):
    """A model output for one compound, keyed by (job, compound, model) so reruns store once."""

    __tablename__ = "predictions"
    __table_args__ = (
        UniqueConstraint("job_id", "compound_id", "model_name", name="uq_predictions_job_item"),
        Index("ix_predictions_compound_model", "compound_id", "model_name", "model_version"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(BigId, ForeignKey("jobs.id"))
    compound_id: Mapped[int] = mapped_column(BigId, ForeignKey("compounds.id"))
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(32))
    outputs: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditHead(Base):
    """The chain's newest link. Updating this single row first serialises appenders on both
    SQLite and PostgreSQL, so two writers can never chain onto the same predecessor."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))


class AuditEvent(Base):
    """Append-only (database triggers refuse UPDATE and DELETE) and hash-chained."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_subject", "subject"),)

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    ts: Mapped[datetime] = mapped_column()
    actor: Mapped[str] = mapped_column(String(256))
    action: Mapped[str] = mapped_column(String(64))
    subject: Mapped[str] = mapped_column(String(256))
    details: Mapped[dict[str, Any]] = mapped_column()
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
