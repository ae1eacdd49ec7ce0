"""The FastAPI application: routers, problem-details errors (each refusal audited), an access
log that names routes rather than paths (no identifier ever reaches a log line), and the
request metrics that ``/metrics`` exposes."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import MedbatchError
from core.settings import Settings
from medbatch.api.problems import HttpProblem, as_problem, problem_response
from medbatch.services.audit import record_refusal

log = logging.getLogger("medbatch.api")
access_log = logging.getLogger("medbatch.api.access")


class Metrics:
    """The API's own Prometheus registry (one per app: tests start several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "medbatch_api_requests",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "medbatch_api_request_seconds",
            "Time to the response's first byte, by route template.",
            ["route"],
            registry=self.registry,
        )


def _route(scope: Scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class AccessLog:
    """Logs method, route template, status, time and token name: never the path itself, whose
    parameters may hold a Study Instance UID or a patient identifier."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                route = _route(scope)
                self.metrics.seconds.labels(route).observe(time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = _route(scope)
            token = getattr(scope.get("state", {}).get("token"), "name", "-")
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            access_log.info(
                "%s %s %d %.1f ms token=%s",
                scope["method"],
                route,
                status,
                (time.perf_counter() - started) * 1000,
                token,
            )


def _audit_refusal(settings: Settings, request: Request, problem: HttpProblem) -> None:
    """Every refused request is an event of the audit chain (who, which route, why)."""
    token = getattr(request.state, "token", None)
    client = request.client.host if request.client else "unknown"
    actor = token.actor if token is not None else f"anonymous@{client}"
    record_refusal(
        settings,
        actor=actor,
        subject=f"{request.method} {_route(request.scope)}",
        status=problem.status,
        reason=problem.detail,
    )


def create_app(settings: Settings) -> FastAPI:
    from medbatch.api.routes import (
        console,
        dicomweb,
        jobs,
        molecules,
        studies,
        submissions,
        system,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from medbatch.services import dicomweb

        app.state.instance_store = dicomweb.open_store(settings)
        completion = dicomweb.Completion(settings)
        completion.start()
        try:
            yield
        finally:
            completion.stop()
            app.state.instance_store.close()

    app = FastAPI(
        lifespan=lifespan,
        title="medbatch",
        version="1",
        description="Batch inference for PACS, EHR extracts and compound libraries: submit, "
        "follow, fetch results. Every route but /healthz needs a bearer token "
        "(`medbatch token create NAME --scope read|submit|admin`).",
        root_path=settings.api_root_path,
        openapi_url=None,  # served below, behind a token like everything but /healthz
        docs_url=None,  # Swagger UI would load its scripts from a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    metrics = Metrics()
    app.state.metrics = metrics

    async def answer(request: Request, problem: HttpProblem) -> JSONResponse:
        if problem.status >= 500:
            log.error("%s %s failed: %s", request.method, _route(request.scope), problem.detail)
        try:
            await run_in_threadpool(_audit_refusal, settings, request, problem)
        except Exception:  # the answer must still go out; the log says the audit failed
            log.exception("could not audit a refused request")
        return problem_response(request, problem)

    @app.exception_handler(HttpProblem)
    async def _problem(request: Request, exc: HttpProblem) -> JSONResponse:
        return await answer(request, exc)

    @app.exception_handler(MedbatchError)
    async def _medbatch(request: Request, exc: MedbatchError) -> JSONResponse:
        return await answer(request, as_problem(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        reasons = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        return await answer(request, HttpProblem(422, f"invalid request: {reasons}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail: Any = exc.detail
        return await answer(request, HttpProblem(exc.status_code, str(detail)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s: unexpected error", request.method, _route(request.scope))
        return await answer(request, as_problem(exc))

    for module in (system, submissions, jobs, molecules, studies, dicomweb):
        app.include_router(module.router)
    console.mount(app)
    app.add_middleware(AccessLog, metrics=metrics)
    return app
