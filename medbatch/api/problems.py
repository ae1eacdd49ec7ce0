"""Errors as RFC 9457 problem details, carrying the same actionable messages the CLI prints."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from core.errors import (
    AuthenticationError,
    ConfigurationError,
    ExtractRejectedError,
    InputError,
    MedbatchError,
    NotFoundError,
    PermissionDeniedError,
    StorageError,
    StorageUnavailableError,
    SubmissionInProgressError,
)

PROBLEM_JSON = "application/problem+json"


class HttpProblem(Exception):
    """A request refused with ``status``; ``detail`` says what to do about it."""

    def __init__(self, status: int, detail: str, **extensions: Any) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.extensions = extensions
        self.headers: dict[str, str] = {}


#: The status each kind of medbatch error is answered with (first match wins).
STATUS: tuple[tuple[type[MedbatchError], int], ...] = (
    (AuthenticationError, 401),
    (PermissionDeniedError, 403),
    (NotFoundError, 404),
    (SubmissionInProgressError, 409),
    (InputError, 422),
    (ConfigurationError, 503),
    (StorageUnavailableError, 503),  # the object store is down: retry later
    (StorageError, 502),  # it answered, but refused (credentials) or lost an object
)


def as_problem(exc: Exception) -> HttpProblem:
    """The problem a raised error is answered with (an unexpected one: 500, no internals)."""
    if isinstance(exc, HttpProblem):
        return exc
    if isinstance(exc, MedbatchError):
        status = next((code for cls, code in STATUS if isinstance(exc, cls)), 500)
        problem = HttpProblem(status, str(exc))
        if isinstance(exc, ExtractRejectedError):
            problem.extensions["job_id"] = exc.job_id
        if status == 401:
            problem.headers["WWW-Authenticate"] = 'Bearer realm="medbatch"'
        return problem
    return HttpProblem(500, "internal error; the server log has the details (no data was changed)")


def problem_response(request: Request, problem: HttpProblem) -> JSONResponse:
    body = {
        "type": "about:blank",
        "title": HTTPStatus(problem.status).phrase,
        "status": problem.status,
        "detail": problem.detail,
        "instance": request.url.path,
        **problem.extensions,
    }
    return JSONResponse(
        body, status_code=problem.status, media_type=PROBLEM_JSON, headers=problem.headers
    )
