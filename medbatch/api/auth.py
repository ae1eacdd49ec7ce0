"""Who is calling: a bearer token (``Authorization: Bearer …``) or, for the browser console, the
same token in an HttpOnly session cookie. Every route but ``/healthz`` depends on
:func:`require`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from core.errors import AuthenticationError, PermissionDeniedError
from core.settings import Settings
from medbatch.services.tokens import Scope, TokenInfo, authenticate

SESSION_COOKIE = "medbatch_session"
#: A browser sends this header only from a script of the same origin (no CORS is offered), so a
#: state-changing request authenticated by the cookie must carry it (no cross-site forgery).
CONSOLE_HEADER = "x-medbatch-console"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _presented(request: Request) -> tuple[str | None, bool]:
    """(the token, whether it came from the session cookie)."""
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise AuthenticationError(
                "the Authorization header must be 'Bearer <token>' "
                f"(got a {scheme or 'malformed'} credential)"
            )
        return value.strip(), False
    cookie = request.cookies.get(SESSION_COOKIE)
    return (cookie, True) if cookie else (None, False)


def require(scope: Scope) -> Callable[[Request], Awaitable[TokenInfo]]:
    """A dependency: the caller's token, which must hold ``scope`` (401 without a valid token,
    403 with one that lacks the scope)."""

    async def caller(request: Request) -> TokenInfo:
        token, from_cookie = _presented(request)
        if token is None:
            raise AuthenticationError(
                "no bearer token: send 'Authorization: Bearer <token>'; an administrator creates "
                "one with `medbatch token create NAME --scope read|submit|admin`"
            )
        info = await run_in_threadpool(authenticate, settings_of(request), token)
        request.state.token = info
        if (
            from_cookie
            and request.method not in SAFE_METHODS
            and (request.headers.get(CONSOLE_HEADER) != "1")
        ):
            raise PermissionDeniedError(
                "a console session may change data only from the console's own pages"
            )
        if not info.allows(scope):
            raise PermissionDeniedError(
                f"the token {info.name!r} has the scope(s) {', '.join(sorted(info.scopes))}; "
                f"this needs {scope.value}"
            )
        return info

    return caller


#: The caller, by the scope a route needs: ``def route(token: Reader) -> …``.
Reader = Annotated[TokenInfo, Depends(require(Scope.READ))]
Submitter = Annotated[TokenInfo, Depends(require(Scope.SUBMIT))]
Admin = Annotated[TokenInfo, Depends(require(Scope.ADMIN))]
