"""The one table of job kinds: what each kind is, which Celery task runs it and on which queue.

The database model (``db.models.Job.kind``), Celery's routing (``workers.celery_app``), publishing
(``workers.dispatch``), the sweeper, the operator's retry and the front ends all read this table,
so a new kind is one enum member and one row here (plus its task).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from core.settings import Settings


class JobKind(enum.StrEnum):
    CHEM_SCREEN = "chem_screen"
    CHEM_CHUNK = "chem_chunk"
    DICOM_STUDY = "dicom_study"
    DICOM_SEND = "dicom_send"
    EHR_EXTRACT = "ehr_extract"
    EHR_INGEST = "ehr_ingest"
    EHR_BATCH = "ehr_batch"


#: The queues of the settings (``queue_<flow>``): one per flow, so a nightly EHR run cannot
#: starve PACS studies.
Flow = Literal["chem", "dicom", "ehr"]


@dataclass(frozen=True)
class JobKindSpec:
    """One kind of job.

    ``task`` is the Celery task that runs a job of this kind, ``None`` for a parent job that only
    groups its children (it finishes when they do). ``results`` says whether ``medbatch results``
    and ``report`` serve this kind (what a submission creates).
    """

    kind: JobKind
    label: str
    flow: Flow
    task: str | None = None
    results: bool = False

    @property
    def leaf(self) -> bool:
        """Run by a task itself (the others are parents of such jobs)."""
        return self.task is not None

    def queue(self, settings: Settings) -> str:
        return str(getattr(settings, f"queue_{self.flow}"))


JOB_KINDS: dict[JobKind, JobKindSpec] = {
    spec.kind: spec
    for spec in (
        JobKindSpec(JobKind.CHEM_SCREEN, "compound library", "chem", results=True),
        JobKindSpec(
            JobKind.CHEM_CHUNK,
            "chunk of molecules (one Triton request)",
            "chem",
            task="medbatch.chem.score_chunk",
        ),
        JobKindSpec(
            JobKind.DICOM_STUDY,
            "version of a received study, scored once complete",
            "dicom",
            task="medbatch.dicom.score_study",
        ),
        JobKindSpec(
            JobKind.DICOM_SEND,
            "DICOM results of a study version, C-STORE'd back",
            "dicom",
            task="medbatch.dicom.send_result",
        ),
        JobKindSpec(JobKind.EHR_EXTRACT, "EHR extract", "ehr", results=True),
        JobKindSpec(
            JobKind.EHR_INGEST,
            "stream of an extract: bad rows rejected, patients spilled into buckets",
            "ehr",
            task="medbatch.ehr.ingest_extract",
        ),
        JobKindSpec(
            JobKind.EHR_BATCH,
            "bucket of patients scored by every EHR model",
            "ehr",
            task="medbatch.ehr.score_batch",
        ),
    )
}
assert set(JOB_KINDS) == set(JobKind), "every JobKind has its row"


def job_kind(kind: str) -> JobKindSpec:
    """The row of ``kind`` (a stored ``Job.kind`` string)."""
    return JOB_KINDS[JobKind(kind)]


#: Kinds run by a task (the sweeper re-publishes these; a retry re-queues them).
LEAF_KINDS: frozenset[str] = frozenset(k.value for k, s in JOB_KINDS.items() if s.leaf)
#: Kinds whose results are exported and reported (what a submission creates).
RESULT_KINDS: frozenset[str] = frozenset(k.value for k, s in JOB_KINDS.items() if s.results)
