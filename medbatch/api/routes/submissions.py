"""Submissions over HTTP: a compound library or an EHR extract uploaded as multipart field
``file``. The upload is streamed to disk under its content hash, then handed to the same service
the CLI calls, so the same content gives the same job."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from core.errors import InputError, SubmissionInProgressError
from core.settings import Settings
from medbatch.api.auth import Submitter, settings_of
from medbatch.api.problems import HttpProblem
from medbatch.api.uploads import Upload, receive_upload
from medbatch.services.ehr import submit_extract
from medbatch.services.jobs import job_progress
from medbatch.services.screening import ScreenOptions, submit_library

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1", tags=["submissions"])
#: Library submissions read their file after the answer went out (job id first, the rows as
#: they are canonicalised); a few at once, the rest wait their turn.
_READERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="medbatch-submit")
_RACE_WAIT_S = 30.0
_EARLY_ANSWER_S = 2.0


def _flag(fields: dict[str, str], name: str) -> bool:
    value = fields.get(name, "false").strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no", "on", "off", ""):
        raise HttpProblem(422, f"form field {name!r} must be true or false, not {value!r}")
    return value in ("true", "1", "yes", "on")


def _screen_options(fields: dict[str, str]) -> ScreenOptions:
    known = {"format", "smiles_column", "id_column", "force", "chunk_size"}
    if unknown := set(fields) - known:
        raise HttpProblem(
            422, f"unknown form field(s) {', '.join(sorted(unknown))}; known: {', '.join(known)}"
        )
    fmt = fields.get("format") or None
    if fmt is not None and fmt not in ("smi", "csv", "tsv", "sdf"):
        raise HttpProblem(422, f"format must be smi, csv, tsv or sdf, not {fmt!r}")
    chunk = fields.get("chunk_size") or None
    if chunk is not None and not (chunk.isdigit() and 1 <= int(chunk) <= 1024):
        raise HttpProblem(422, f"chunk_size must be a number from 1 to 1024, not {chunk!r}")
    return ScreenOptions(
        fmt=fmt,  # type: ignore[arg-type]
        smiles_column=fields.get("smiles_column") or "smiles",
        id_column=fields.get("id_column") or None,
        force=_flag(fields, "force"),
        chunk_size=int(chunk) if chunk else None,
    )


def _answer(settings: Settings, job_id: int, existing: bool, upload: Upload) -> JSONResponse:
    state = job_progress(settings, job_id).state
    body: dict[str, Any] = {
        "id": job_id,
        "state": state,
        "existing": existing,
        "file": {"name": upload.filename, "sha256": upload.sha256, "bytes": upload.size},
        "links": {
            "job": f"/api/v1/jobs/{job_id}",
            "results": f"/api/v1/jobs/{job_id}/results",
            "report": f"/api/v1/jobs/{job_id}/report",
        },
    }
    return JSONResponse(
        body, status_code=200 if existing else 201, headers={"Location": f"/api/v1/jobs/{job_id}"}
    )


def _retrying(submit: Callable[[], Any]) -> Any:
    """``submit()``; while the same content is being submitted by another request at this
    very moment, wait for it and return what it made (one job, not an error)."""
    deadline = time.monotonic() + _RACE_WAIT_S
    while True:
        try:
            return submit()
        except SubmissionInProgressError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@router.post("/libraries", status_code=201)
async def post_library(request: Request, token: Submitter) -> JSONResponse:
    """A compound library (.smi, .csv, .tsv or .sdf, optionally .gz) as multipart field
    ``file``; the options of `medbatch screen` as form fields (format, smiles_column,
    id_column, force, chunk_size). 201 with the new job, 200 with the job that already holds
    the same file and options. The rows are read after the answer; poll the job."""
    settings = settings_of(request)
    upload = await receive_upload(request, settings)
    try:
        options = _screen_options(upload.fields)
    except HttpProblem:
        upload.discard()
        raise
    loop = asyncio.get_running_loop()
    registered: asyncio.Future[int] = loop.create_future()

    def on_registered(job_id: int) -> None:
        def settle() -> None:
            if not registered.done():
                registered.set_result(job_id)

        loop.call_soon_threadsafe(settle)

    def run() -> Any:
        return _retrying(
            lambda: submit_library(
                settings, upload.path, options, actor=token.actor, on_registered=on_registered
            )
        )

    reading: Future[Any] = _READERS.submit(run)
    reading.add_done_callback(_log_failure)
    reading.add_done_callback(lambda _f: upload.release())
    wrapped = asyncio.wrap_future(reading)
    await asyncio.wait({wrapped, registered}, return_when=asyncio.FIRST_COMPLETED)
    if not wrapped.done():
        # A file refused at its first lines (not text, no SMILES column) fails within moments:
        # answer that with the rejected job rather than 201 and a job that is about to fail.
        await asyncio.wait({wrapped}, timeout=_EARLY_ANSWER_S)
    if wrapped.done():
        try:
            result = wrapped.result()
        except InputError as exc:
            if registered.done():
                raise HttpProblem(422, str(exc), job_id=registered.result()) from exc
            raise
        job_id, existing = result.job_id, result.existing
    else:
        job_id, existing = registered.result(), False
    return await run_in_threadpool(_answer, settings, job_id, existing, upload)


def _log_failure(future: Future[Any]) -> None:
    exc = future.exception()
    if exc is not None:  # the job says why (rejected with the reason); the log says it failed
        log.warning("a library submission ended with %s", type(exc).__name__)


@router.post("/ehr/extracts", status_code=201)
async def post_extract(request: Request, token: Submitter) -> JSONResponse:
    """An EHR extract (long or wide CSV, optionally .gz) as multipart field ``file``; form
    field ``force`` scores the same content again. 201 with the new extract job, 200 with the
    job that already holds this content; 422 (with the rejected job's id) for a file that is
    not an extract."""
    settings = settings_of(request)
    upload = await receive_upload(request, settings)
    try:
        if unknown := set(upload.fields) - {"force"}:
            raise HttpProblem(
                422, f"unknown form field(s) {', '.join(sorted(unknown))}; known: force"
            )
        force = _flag(upload.fields, "force")
    except HttpProblem:
        upload.discard()
        raise
    try:
        result = await run_in_threadpool(
            _retrying,
            lambda: submit_extract(settings, upload.path, actor=token.actor, force=force),
        )
    finally:
        upload.release()
    return await run_in_threadpool(_answer, settings, result.job_id, result.existing, upload)
