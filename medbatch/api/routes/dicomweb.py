"""DICOMweb (PS3.18): STOW-RS into the same front door as C-STORE, QIDO-RS over the studies
medbatch holds and the objects it produced, WADO-RS retrieval of those objects. The same tokens
as the rest of the API: ``submit`` stores (in place of the AE allow-list), ``read`` searches and
retrieves."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from python_multipart.multipart import parse_options_header
from starlette.concurrency import run_in_threadpool

from medbatch.api.auth import Reader, Submitter, settings_of
from medbatch.api.multipart import Part, boundary_of, read_multipart
from medbatch.api.problems import HttpProblem
from medbatch.services import dicomweb
from medbatch.services.dicomweb import InstanceStore, Sender

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])
DICOM_JSON = "application/dicom+json"


def _base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/dicomweb"


def _json(body: Any, status: int = 200) -> Response:
    if isinstance(body, list) and not body:
        return Response(status_code=204)  # a search that matched nothing
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON)


class _PartSink:
    """One part of a STOW-RS body: gathered, then stored as C-STORE would store it."""

    def __init__(
        self,
        part: Part,
        store: InstanceStore,
        outcome: dicomweb.StowOutcome,
        sender: Sender,
        study: str | None,
    ) -> None:
        self.part, self.store, self.outcome = part, store, outcome
        self.sender, self.study = sender, study
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(data)

    def close(self) -> None:
        if self.part.content_type != "application/dicom":
            dicomweb.refuse_part(
                self.outcome,
                f"a part of type {self.part.content_type or '(none)'}; "
                "send application/dicom parts",
            )
            return
        dicomweb.stow_part(self.store, self.outcome, b"".join(self.chunks), self.sender, self.study)

    def abort(self) -> None:
        self.chunks = []


async def _stow(request: Request, token: Any, study: str | None) -> Response:
    settings = settings_of(request)
    boundary = boundary_of(request, "multipart/related")
    _, params = parse_options_header(request.headers.get("content-type", ""))
    kind = params.get(b"type", b"").decode("latin-1").strip('"').lower()
    if kind != "application/dicom":
        raise HttpProblem(
            415,
            'STOW-RS takes multipart/related; type="application/dicom" '
            f"(this body's type is {kind or 'missing'}); DICOM JSON/XML with bulk data is not "
            "accepted",
        )
    store: InstanceStore = request.app.state.instance_store
    outcome = dicomweb.StowOutcome()
    client = request.client.host if request.client else "unknown"
    sender = Sender(f"STOW:{token.name}"[:16], client)

    def open_part(part: Part) -> _PartSink:
        return _PartSink(part, store, outcome, sender, study)

    try:
        await read_multipart(request, boundary, open_part, max_body=settings.api_max_upload_bytes)
    finally:  # what was stored is stored, also when the body broke off later: say so
        if outcome.stored or outcome.failed:
            await run_in_threadpool(
                dicomweb.audit_stow, settings, token.actor, outcome, client, study
            )
    if not outcome.stored and not outcome.failed:
        raise HttpProblem(400, "the multipart body holds no part to store")
    body = dicomweb.store_response(outcome, _base_url(request), study)
    return JSONResponse(body, status_code=outcome.status, media_type=DICOM_JSON)


@router.post("/studies")
async def store_instances(request: Request, token: Submitter) -> Response:
    """STOW-RS: store the instances of the body (each part application/dicom)."""
    return await _stow(request, token, None)


@router.post("/studies/{study}")
async def store_study_instances(request: Request, study: str, token: Submitter) -> Response:
    """STOW-RS to one study: an instance of another study is refused (FailureReason 0xA901)."""
    return await _stow(request, token, study)


@router.get("/studies")
def search_for_studies(request: Request, token: Reader) -> Response:
    """QIDO-RS over the received studies: StudyInstanceUID, AccessionNumber (wildcards * ?),
    StudyDate (YYYYMMDD or a range), ModalitiesInStudy; limit, offset."""
    query = dicomweb.StudyQuery.parse(request.query_params.multi_items())
    return _json(
        dicomweb.search_studies(
            settings_of(request), query, base_url=_base_url(request), actor=token.actor
        )
    )


@router.get("/studies/{study}/series")
def search_for_series(request: Request, study: str, token: Reader) -> Response:
    """QIDO-RS: the series medbatch produced in the study (its SR, its key image)."""
    return _json(
        dicomweb.search_series(
            settings_of(request), study, base_url=_base_url(request), actor=token.actor
        )
    )


@router.get("/studies/{study}/instances")
def search_for_study_instances(request: Request, study: str, token: Reader) -> Response:
    return _json(
        dicomweb.search_instances(
            settings_of(request), study, None, base_url=_base_url(request), actor=token.actor
        )
    )


@router.get("/studies/{study}/series/{series}/instances")
def search_for_instances(request: Request, study: str, series: str, token: Reader) -> Response:
    return _json(
        dicomweb.search_instances(
            settings_of(request), study, series, base_url=_base_url(request), actor=token.actor
        )
    )


def _accepts_dicom(request: Request, single: bool) -> bool:
    """Whether the Accept header allows multipart/related DICOM (True) or, for one instance,
    a bare application/dicom (False); 406 for anything else."""
    accept = request.headers.get("accept", "*/*")
    for option in accept.split(","):
        media, params = parse_options_header(option.strip())
        media_type = media.decode("latin-1").lower()
        syntax = params.get(b"transfer-syntax", b"*").decode("latin-1")
        if syntax not in ("*", "1.2.840.10008.1.2.1"):
            continue  # stored as Explicit VR Little Endian; no transcoding
        kind = params.get(b"type", b"application/dicom").decode("latin-1").strip('"').lower()
        if (
            media_type in ("multipart/related", "*/*", "multipart/*")
            and kind == "application/dicom"
        ):
            return True
        if single and media_type == "application/dicom":
            return False
    raise HttpProblem(
        406,
        'retrieve as multipart/related; type="application/dicom" (transfer-syntax=* or '
        "1.2.840.10008.1.2.1); a single instance also as application/dicom",
    )


def _retrieve(
    request: Request, token: Any, study: str, series: str | None, instance: str | None
) -> Response:
    multipart = _accepts_dicom(request, single=instance is not None)
    files = dicomweb.retrieve(settings_of(request), study, series, instance, actor=token.actor)
    if not multipart:
        return Response(files[0].data, media_type="application/dicom")
    boundary = uuid.uuid4().hex
    return StreamingResponse(
        dicomweb.multipart_related(files, boundary),
        media_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
    )


def _metadata(
    request: Request, token: Any, study: str, series: str | None, instance: str | None
) -> Response:
    files = dicomweb.retrieve(settings_of(request), study, series, instance, actor=token.actor)
    return JSONResponse(dicomweb.metadata(files), media_type=DICOM_JSON)


@router.get("/studies/{study}")
def retrieve_study(request: Request, study: str, token: Reader) -> Response:
    """WADO-RS: every object medbatch produced in the study."""
    return _retrieve(request, token, study, None, None)


@router.get("/studies/{study}/metadata")
def retrieve_study_metadata(request: Request, study: str, token: Reader) -> Response:
    return _metadata(request, token, study, None, None)


@router.get("/studies/{study}/series/{series}")
def retrieve_series(request: Request, study: str, series: str, token: Reader) -> Response:
    return _retrieve(request, token, study, series, None)


@router.get("/studies/{study}/series/{series}/metadata")
def retrieve_series_metadata(request: Request, study: str, series: str, token: Reader) -> Response:
    return _metadata(request, token, study, series, None)


@router.get("/studies/{study}/series/{series}/instances/{instance}")
def retrieve_instance(
    request: Request, study: str, series: str, instance: str, token: Reader
) -> Response:
    return _retrieve(request, token, study, series, instance)


@router.get("/studies/{study}/series/{series}/instances/{instance}/metadata")
def retrieve_instance_metadata(
    request: Request, study: str, series: str, instance: str, token: Reader
) -> Response:
    return _metadata(request, token, study, series, instance)
