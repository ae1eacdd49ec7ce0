"""Jobs: lists, one job, its results (streamed), its HTML report, and the operator's retry."""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, StreamingResponse

from core.job_kinds import JobKind
from medbatch.api.auth import Admin, Reader, settings_of
from medbatch.api.security import report_headers
from medbatch.services import jobs as job_service
from medbatch.services.jobs import JobState
from medbatch.services.reports import render_report
from medbatch.services.results import (
    FORMATS,
    Format,
    audit_export,
    check_exportable,
    stream_job_results,
)

router = APIRouter(prefix="/api/v1/jobs", tags=["jobs"])

MEDIA_TYPES: dict[str, str] = {
    "csv": "text/csv; charset=utf-8",
    "parquet": "application/vnd.apache.parquet",
    "ndjson": "application/x-ndjson",
}


def _job(info: job_service.JobInfo, progress: job_service.Progress | None = None) -> dict[str, Any]:
    body = asdict(info)
    for key in ("created_at", "updated_at", "queued_at", "started_at", "finished_at"):
        body[key] = body[key].isoformat() if body[key] is not None else None
    if progress is not None:  # a list: the children counted for the whole page at once
        total, finished = progress.children_total, progress.children_finished
    else:
        total = sum(info.children.values())
        finished = sum(n for s, n in info.children.items() if JobState(s).terminal)
    body["progress"] = {"children": total, "finished": finished}
    body["links"] = {
        "self": f"/api/v1/jobs/{info.id}",
        "results": f"/api/v1/jobs/{info.id}/results",
        "report": f"/api/v1/jobs/{info.id}/report",
    }
    return body


@router.get("")
def list_jobs(
    request: Request,
    token: Reader,
    kind: Annotated[JobKind | None, Query(description="Only jobs of this kind.")] = None,
    state: Annotated[JobState | None, Query(description="Only jobs in this state.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    before: Annotated[int | None, Query(description="Jobs with smaller ids (next page).")] = None,
    all_levels: Annotated[bool, Query(description="Chunks and batches too.")] = False,
) -> dict[str, Any]:
    """The newest jobs first; ``next`` links the following page."""
    found = job_service.list_jobs(
        settings_of(request),
        actor=token.actor,
        kind=kind.value if kind else None,
        state=state.value if state else None,
        limit=limit,
        before_id=before,
        top_level=not all_levels,
    )
    progress = job_service.progress_of(settings_of(request), [j.id for j in found])
    page = [_job(j, progress.get(j.id)) for j in found]
    following = None
    if len(found) == limit:
        params = dict(request.query_params) | {"before": str(found[-1].id)}
        following = (
            str(request.url.replace_query_params(**params).path)
            + "?"
            + "&".join(f"{k}={v}" for k, v in params.items())
        )
    return {"jobs": page, "next": following}


@router.get("/{job_id}")
def show_job(request: Request, job_id: int, token: Reader) -> dict[str, Any]:
    """State, progress (children finished of all), counts and error of one job."""
    return _job(job_service.show_job(settings_of(request), job_id, actor=token.actor))


@router.get("/{job_id}/results")
def results(
    request: Request,
    job_id: int,
    token: Reader,
    fmt: Annotated[Format, Query(alias="format", description=", ".join(FORMATS))] = "csv",
    in_domain_only: Annotated[
        bool, Query(description="Screening: only molecules inside the model's domain.")
    ] = False,
) -> StreamingResponse:
    """The same rows and columns as `medbatch results`, streamed: the server holds one page of
    rows at a time, whatever the job's size."""
    settings = settings_of(request)
    check_exportable(settings, job_id, in_domain_only=in_domain_only)
    extra = {"in_domain_only": True} if in_domain_only else {}
    audit_export(settings, job_id, actor=token.actor, format=fmt, to="http", **extra)
    return StreamingResponse(
        stream_job_results(settings, job_id, fmt, in_domain_only=in_domain_only),
        media_type=MEDIA_TYPES[fmt],
        headers={"Content-Disposition": f'attachment; filename="job-{job_id}.{fmt}"'},
    )


@router.get("/{job_id}/report", response_class=HTMLResponse)
def report(
    request: Request,
    job_id: int,
    token: Reader,
    patient: Annotated[list[str] | None, Query(description="EHR: draw these patients.")] = None,
) -> HTMLResponse:
    """The job's HTML report (screening or EHR), as `medbatch report` writes it."""
    with tempfile.TemporaryDirectory(prefix="medbatch-report-") as tmp:
        page = render_report(
            settings_of(request),
            job_id,
            Path(tmp) / "report.html",
            actor=token.actor,
            patients=patient,
        )
        html = page.read_text(encoding="utf-8")
    return HTMLResponse(html, headers=report_headers(html))


@router.post("/{job_id}/retry")
def retry(request: Request, job_id: int, token: Admin) -> dict[str, Any]:
    """Re-queue a failed job, or a parent's failed children (after fixing the cause)."""
    requeued = job_service.retry_job(settings_of(request), job_id, actor=token.actor)
    return {"job": job_id, "requeued": requeued}
