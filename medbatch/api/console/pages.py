"""The console's pages. Each one asks the services for its data (the same functions the CLI and
the API call; every read is audited under the signed-in token) and renders a template; actions
(submit, retry, sign in and out) are the API's own routes, called by the console's script."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from core.errors import NotFoundError
from core.job_kinds import JobKind
from medbatch.api.auth import SESSION_COOKIE, Reader, settings_of
from medbatch.api.console.render import page
from medbatch.api.console.session import Operator, safe_next, session_token
from medbatch.services.ehr import extract_progress, extract_summary, list_extracts
from medbatch.services.health import stack_status
from medbatch.services.jobs import JobState, list_jobs, progress_of, show_job
from medbatch.services.screening import screening_summary
from medbatch.services.studies import list_studies

router = APIRouter(include_in_schema=False)
PAGE = 50


@router.get("/sign-in", response_class=HTMLResponse)
def sign_in(request: Request, after: Annotated[str | None, Query(alias="next")] = None) -> Response:
    """The sign-in page (public): a token, checked by ``POST /api/v1/session``."""
    target = safe_next(after)
    who, problem = session_token(request)
    if who is not None:
        return RedirectResponse(request.scope.get("root_path", "") + target, status_code=303)
    response = page(request, "sign_in.html.j2", who=None, next=target, problem=problem)
    if problem is not None:  # a revoked or unknown token: forget it
        response.delete_cookie(SESSION_COOKIE, path="/")
    return response


@router.get("/", response_class=HTMLResponse)
def overview(request: Request, who: Operator) -> Response:
    """The health of each part, queue depths, the newest jobs with their progress."""
    s = settings_of(request)
    jobs = list_jobs(s, actor=who.actor, limit=12)
    failed = list_jobs(s, actor=who.actor, state=JobState.FAILED.value, top_level=False, limit=100)
    return page(
        request,
        "overview.html.j2",
        who=who,
        active="overview",
        health=stack_status(s),
        jobs=jobs,
        progress=progress_of(s, [j.id for j in jobs]),
        failed=len(failed),
    )


@router.get("/jobs", response_class=HTMLResponse)
def jobs(
    request: Request,
    who: Operator,
    kind: Annotated[JobKind | None, Query()] = None,
    state: Annotated[JobState | None, Query()] = None,
    before: Annotated[int | None, Query(ge=1)] = None,
    all_levels: Annotated[bool, Query()] = False,
) -> Response:
    """Submitted jobs (or every job), newest first, filtered by kind and state, paged."""
    s = settings_of(request)
    found = list_jobs(
        s,
        actor=who.actor,
        kind=kind.value if kind else None,
        state=state.value if state else None,
        limit=PAGE,
        before_id=before,
        top_level=not all_levels,
    )
    return page(
        request,
        "jobs.html.j2",
        who=who,
        active="jobs",
        jobs=found,
        progress=progress_of(s, [j.id for j in found]),
        kinds=[k.value for k in JobKind],
        states=[st.value for st in JobState],
        kind=kind.value if kind else "",
        state=state.value if state else "",
        all_levels=all_levels,
        next_before=found[-1].id if len(found) == PAGE else None,
    )


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job(request: Request, job_id: int, who: Operator) -> Response:
    """One job: state and progress, counts, error, results and report, retry."""
    s = settings_of(request)
    try:
        info = show_job(s, job_id, actor=who.actor)
    except NotFoundError as exc:
        return page(request, "not_found.html.j2", who=who, status=404, problem=str(exc))
    screening = extract = ingest = None
    if info.kind == JobKind.CHEM_SCREEN.value:
        screening = screening_summary(s, job_id)
    elif info.kind == JobKind.EHR_EXTRACT.value:
        extract = extract_summary(s, job_id)
        ingest = extract_progress(s, job_id)
    return page(
        request,
        "job.html.j2",
        who=who,
        active="jobs",
        job=info,
        progress=progress_of(s, [job_id]).get(job_id),
        failed_children=info.children.get(JobState.FAILED.value, 0),
        screening=screening,
        extract=extract,
        ingest=ingest,
    )


@router.get("/studies", response_class=HTMLResponse)
def studies(request: Request, who: Operator) -> Response:
    """Received DICOM studies with their newest result and key image."""
    found = list_studies(settings_of(request), actor=who.actor, limit=PAGE)
    return page(request, "studies.html.j2", who=who, active="studies", studies=found)


@router.get("/extracts", response_class=HTMLResponse)
def extracts(
    request: Request, who: Operator, before: Annotated[int | None, Query(ge=1)] = None
) -> Response:
    """EHR extracts with rows accepted and rejected, patients scored, out-of-distribution."""
    s = settings_of(request)
    found = list_extracts(s, actor=who.actor, limit=PAGE, before_id=before)
    return page(
        request,
        "extracts.html.j2",
        who=who,
        active="extracts",
        extracts=found,
        progress=progress_of(s, [e.job_id for e in found]),
        next_before=found[-1].job_id if len(found) == PAGE else None,
    )


@router.get("/failures", response_class=HTMLResponse)
def failures(request: Request, who: Operator) -> Response:
    """Failed jobs of every level with their reason (retry: admin), and refused submissions."""
    s = settings_of(request)
    failed = list_jobs(s, actor=who.actor, state=JobState.FAILED.value, top_level=False, limit=100)
    rejected = list_jobs(s, actor=who.actor, state=JobState.REJECTED.value, limit=PAGE)
    return page(
        request, "failures.html.j2", who=who, active="failures", failed=failed, rejected=rejected
    )


@router.get("/submit", response_class=HTMLResponse)
def submit(request: Request, who: Operator) -> Response:
    """Upload a compound library or an EHR extract (submit scope)."""
    s = settings_of(request)
    return page(
        request,
        "submit.html.j2",
        who=who,
        active="submit",
        max_upload=s.api_max_upload_bytes,
        chunk_size=s.chem_chunk_size,
    )


@router.get("/console/progress")
def progress(
    request: Request,
    token: Reader,
    job: Annotated[list[int], Query(max_length=200, description="Job ids.")],
) -> dict[str, dict[str, object]]:
    """State and children finished/total of each job, polled by the console's live progress
    (not an access to results: not audited)."""
    found = progress_of(settings_of(request), job)
    return {
        str(i): {
            "state": p.state,
            "terminal": p.terminal,
            "total": p.children_total,
            "finished": p.children_finished,
        }
        for i, p in found.items()
    }
