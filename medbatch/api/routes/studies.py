"""Received DICOM studies and the results medbatch produced for them."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from medbatch.api.auth import Reader, settings_of
from medbatch.services.studies import StudyInfo, key_image_png, list_studies, show_study

router = APIRouter(prefix="/api/v1/studies", tags=["studies"])


def _study(info: StudyInfo) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list):
            return [plain(v) for v in value]
        return value.isoformat() if hasattr(value, "isoformat") else value

    body: dict[str, Any] = plain(asdict(info))
    body["links"] = {"self": f"/api/v1/studies/{info.study_uid}"}
    if info.newest is not None and info.newest.sc_path:
        body["links"]["key_image"] = f"/api/v1/studies/{info.study_uid}/key-image.png"
    return body


@router.get("")
def studies(
    request: Request,
    token: Reader,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> dict[str, Any]:
    """The newest received studies with their newest result."""
    found = list_studies(settings_of(request), actor=token.actor, limit=limit)
    return {"studies": [_study(s) for s in found]}


@router.get("/{study_uid}")
def study(request: Request, study_uid: str, token: Reader) -> dict[str, Any]:
    """One study: its series, every result version with per-slice scores, the SR and the
    secondary capture it produced, its scoring jobs."""
    return _study(show_study(settings_of(request), study_uid, actor=token.actor))


@router.get(
    "/{study_uid}/key-image.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "The key slice as PNG."}},
)
def key_image(
    request: Request,
    study_uid: str,
    token: Reader,
    version: Annotated[int | None, Query(ge=1, description="A result version; newest.")] = None,
) -> Response:
    """The key-slice secondary capture medbatch made for the study (newest result, or
    ``version``), as PNG: the image the PACS received."""
    png = key_image_png(settings_of(request), study_uid, actor=token.actor, version=version)
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, no-store"})
