"""An HTML report of a job's results: what its kind of job shows people."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import InputError
from core.job_kinds import JobKind
from db.jobs import get_job
from db.session import session_scope

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from core.settings import Settings
    from medbatch.reports.screening import Explainer


def write_report(
    session: Session,
    job_id: int,
    out: Path,
    *,
    actor: str,
    patients: list[str] | None = None,
    explain: Explainer | None = None,
) -> Path:
    """Render the job's report to ``out`` (audited); ``patients`` are drawn in an EHR report;
    ``explain`` gives a screening report's drawn molecules their atom contributions. The
    report modules (matplotlib, RDKit: most of a second to import) load here, when a report
    is drawn, not with the CLI or the API."""
    kind = get_job(session, job_id).kind
    if kind == JobKind.EHR_EXTRACT.value:
        from medbatch.reports.ehr import render_ehr_report

        return render_ehr_report(session, job_id, out, actor=actor, patients=patients)
    if kind == JobKind.CHEM_SCREEN.value:
        from medbatch.reports.screening import render_screening_report

        return render_screening_report(session, job_id, out, actor=actor, explain=explain)
    raise InputError(
        f"job {job_id} is a {kind} job; reports are made per screening job or EHR extract job"
    )


def render_report(
    settings: Settings,
    job_id: int,
    out: Path,
    *,
    actor: str,
    patients: list[str] | None = None,
) -> Path:
    """``medbatch report JOB --out FILE``: the job's HTML report written to ``out``."""

    def explain(smiles: Sequence[str]) -> list[list[float]]:
        from medbatch.services.explain import atom_contributions

        return atom_contributions(settings, smiles)

    with session_scope(settings.database_url) as session:
        return write_report(session, job_id, out, actor=actor, patients=patients, explain=explain)
