"""One molecule on request: its prediction, interval, applicability domain and atom
contributions (`medbatch explain`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response

from medbatch.api.auth import Reader, settings_of
from medbatch.reports.molecules import data_uri
from medbatch.services.explain import explain_molecule

router = APIRouter(prefix="/api/v1/molecules", tags=["molecules"])


@router.get("/explain", response_model=None)
def explain(
    request: Request,
    token: Reader,
    smiles: Annotated[str, Query(min_length=1, max_length=2000, description="The molecule.")],
    fmt: Annotated[
        Literal["json", "png"],
        Query(alias="format", description="json (with the map as a data URI) or png (the map)"),
    ] = "json",
) -> dict[str, Any] | Response:
    """logS, its spread and calibrated interval, whether the molecule is inside the model's
    applicability domain (and why not), and each atom's contribution, drawn as an RDKit
    similarity map (green raises logS, pink lowers it)."""
    found = explain_molecule(settings_of(request), smiles, actor=token.actor)
    if fmt == "png":
        return Response(found.png, media_type="image/png")
    return {**found.as_json(), "similarity_map": data_uri(found.png)}
