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


class DicomStudy(Base):
    """A study received from a PACS or modality.

    ``version`` counts completions: instances received while it is ``n`` belong to result
    version ``n + 1``; when the quiet period passes, version ``n + 1`` is closed and scored over
    every instance with ``batch <= n + 1``. Late instances therefore re-open the study and produce
    a new, complete result version instead of mixing into one already being scored.
    """

    __tablename__ = "dicom_studies"
    __table_args__ = (Index("ix_dicom_studies_open_last", "open", "last_instance_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_digest: Mapped[str] = mapped_column(String(48), doc="Pseudonym of the Patient ID.")
    calling_ae: Mapped[str] = mapped_column(String(16), doc="AE that sent the first instance.")
    accession_number: Mapped[str | None] = mapped_column(String(16), nullable=True)
    study_date: Mapped[str | None] = mapped_column(String(8), nullable=True, doc="YYYYMMDD")
    open: Mapped[bool] = mapped_column(default=True, doc="Instances arrived since last closing.")
    version: Mapped[int] = mapped_column(Integer, default=0, doc="Completed result versions.")
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_instance_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_instance_at: Mapped[datetime] = mapped_column(default=utcnow)


class DicomInstance(Base):
    """One stored SOP instance; the row exists only once its file is durably on disk."""

    __tablename__ = "dicom_instances"
    __table_args__ = (Index("ix_dicom_instances_study_batch", "study_id", "batch"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(BigId, ForeignKey("dicom_studies.id"))
    batch: Mapped[int] = mapped_column(Integer, doc="First result version that includes it.")
    series_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(String(512), doc="Relative to the DICOM storage root.")
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class DicomRejection(Base):
    """A C-STORE that was refused, with the status sent back and the reason."""

    __tablename__ = "dicom_rejections"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    calling_ae: Mapped[str] = mapped_column(String(16))
    peer_address: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    status: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)


class DicomResult(Base):
    """The model's answer for one version of a study, and the DICOM objects made from it."""

    __tablename__ = "dicom_results"
    __table_args__ = (
        UniqueConstraint("study_id", "version", "model_name", name="uq_dicom_results_version"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(BigId, ForeignKey("dicom_studies.id"))
    version: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[int] = mapped_column(BigId, ForeignKey("jobs.id"))
    series_uid: Mapped[str] = mapped_column(String(64))
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(32))
    study_probability: Mapped[float] = mapped_column()
    slice_scores: Mapped[dict[str, Any]] = mapped_column(doc="SOP instance UID → score.")
    most_suspicious_sop_uid: Mapped[str] = mapped_column(String(64))
    instance_count: Mapped[int] = mapped_column(Integer)
    sr_path: Mapped[str | None] = mapped_column(String(512), nullable=True)
    sc_path: Mapped[str | None] = mapped_column(String(512), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DicomOutput(Base):
    """A DICOM instance medbatch produced for a result (the SR, the key-image secondary
    capture): what DICOMweb clients search for (QIDO-RS) and retrieve (WADO-RS)."""

    __tablename__ = "dicom_outputs"
    __table_args__ = (Index("ix_dicom_outputs_study_series", "study_id", "series_uid"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    study_id: Mapped[int] = mapped_column(BigId, ForeignKey("dicom_studies.id"))
    result_id: Mapped[int] = mapped_column(BigId, ForeignKey("dicom_results.id"))
    series_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str] = mapped_column(String(16))
    series_number: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(512), doc="Relative to the storage directory.")
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EhrScore(Base):
    """One model's answer for one patient of one extract, with its explanation.

    ``patient_id`` is the warehouse's identifier: the hospital needs it to act on the score, so it
    is stored (and exported) here, never logged. ``explanation`` holds the attention over the
    visits (day and weight), the top visits and the variables' contributions.
    """

    __tablename__ = "ehr_scores"
    __table_args__ = (
        UniqueConstraint("extract_id", "patient_id", "model_name", name="uq_ehr_scores_patient"),
        Index("ix_ehr_scores_job", "job_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    extract_id: Mapped[int] = mapped_column(BigId, ForeignKey("jobs.id"))
    job_id: Mapped[int] = mapped_column(BigId, ForeignKey("jobs.id"))
    patient_id: Mapped[str] = mapped_column(String(128))
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(32))
    risk: Mapped[float | None] = mapped_column(nullable=True, doc="None: see not_scored.")
    not_scored: Mapped[str | None] = mapped_column(
        Text, nullable=True, doc="Why this model could not score this patient (then no risk)."
    )
    out_of_distribution: Mapped[bool | None] = mapped_column(nullable=True)
    reconstruction_error: Mapped[float | None] = mapped_column(nullable=True)
    visits: Mapped[int] = mapped_column(Integer, doc="Visits the model saw (<= its window).")
    measurements: Mapped[int] = mapped_column(Integer, doc="Accepted rows of this patient.")
    explanation: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EhrDropFile(Base):
    """A file seen in the drop folder, so a scan hashes each (path, size, mtime) only once."""

    __tablename__ = "ehr_drop_files"
    __table_args__ = (
        UniqueConstraint("path", "size_bytes", "mtime_ns", name="uq_ehr_drop_files_version"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[int | None] = mapped_column(BigId, ForeignKey("jobs.id"), nullable=True)
    outcome: Mapped[str] = mapped_column(String(32), doc="submitted | duplicate | rejected")
    seen_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiToken(Base):
    """A bearer token of the HTTP API. Only the SHA-256 of the token is kept (tokens are 256
    random bits, so a fast hash is enough); the token itself is shown once, when created."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[str] = mapped_column(String(64), doc="Comma-separated: read, submit, admin.")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by: Mapped[str] = mapped_column(String(256))
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(nullable=True)


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
