"""Health, readiness, metrics, the audit chain and the caller's own session."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from medbatch.api.auth import SESSION_COOKIE, Reader, settings_of
from medbatch.services.audit import verify_audit
from medbatch.services.health import stack_status
from medbatch.services.tokens import TokenInfo, authenticate

router = APIRouter()
_STARTED = time.time()


@router.get("/healthz", tags=["health"])
def healthz() -> dict[str, Any]:
    """The process is alive (no token needed; says nothing about the parts it uses)."""
    return {"status": "alive", "uptime_s": round(time.time() - _STARTED, 1)}


@router.get("/readyz", tags=["health"])
def readyz(request: Request, _: Reader) -> JSONResponse:
    """The database, Redis, Triton and (where a PACS may send) the listener each answer (503
    naming those that do not); every part with, where ``medbatch up`` supervises it, its pid, up
    since, restarts and last exit; the queue depths and the workers answering a ping."""
    st = stack_status(settings_of(request))
    body = {
        "ready": st.ready,
        "failing": st.failing,
        "components": [p.model_dump(mode="json") for p in st.parts],
        "queues": st.queues,
        "workers": st.workers,
        "supervision": st.model_dump(
            mode="json",
            include={"supervision", "supervisor_pid", "supervising_since", "stopped_at", "outcome"},
        ),
        "notes": st.notes,
    }
    return JSONResponse(body, status_code=200 if st.ready else 503)


@router.get("/metrics", tags=["health"])
def metrics(request: Request, _: Reader) -> Response:
    """The API's request counts and latencies, in Prometheus' text format."""
    return Response(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )


@router.get("/openapi.json", include_in_schema=False)
def openapi(request: Request, _: Reader) -> dict[str, Any]:
    """The OpenAPI schema of this API."""
    schema: dict[str, Any] = request.app.openapi()
    return schema


@router.get("/api/v1/audit/verify", tags=["audit"])
def audit_verify(request: Request, _: Reader) -> dict[str, Any]:
    """Walk the audit hash chain: ``ok``, or the first broken link and why."""
    report = verify_audit(settings_of(request))
    return asdict(report)


class SessionRequest(BaseModel):
    token: str


def _whoami(info: TokenInfo) -> dict[str, Any]:
    return {"name": info.name, "scopes": sorted(info.scopes)}


@router.get("/api/v1/session", tags=["session"])
def whoami(info: Reader) -> dict[str, Any]:
    """The calling token's name and scopes."""
    return _whoami(info)


@router.post("/api/v1/session", tags=["session"])
async def sign_in(request: Request, body: SessionRequest) -> JSONResponse:
    """The console's sign-in: the token, checked, is kept in an HttpOnly, same-site cookie."""
    settings = settings_of(request)
    info = await run_in_threadpool(authenticate, settings, body.token.strip())
    request.state.token = info
    response = JSONResponse(_whoami(info))
    response.set_cookie(
        SESSION_COOKIE,
        body.token.strip(),
        httponly=True,
        samesite="strict",
        # HTTPS here, or at a trusted proxy (X-Forwarded-Proto): the cookie never travels in clear
        secure=settings.api_tls_cert is not None or request.url.scheme == "https",
        path="/",
    )
    return response


@router.delete("/api/v1/session", tags=["session"])
def sign_out() -> JSONResponse:
    response = JSONResponse({"signed_out": True})
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
