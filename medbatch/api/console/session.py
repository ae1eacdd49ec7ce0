"""Who is using the console: the token in the session cookie, checked on every page. A page
asked for without a valid session redirects to the sign-in page, which says why."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, Request
from fastapi.responses import RedirectResponse

from core.errors import AuthenticationError
from medbatch.api.auth import SESSION_COOKIE, settings_of
from medbatch.services.tokens import TokenInfo, authenticate


class SignInRequired(Exception):
    """No session (or a session whose token is no longer valid): go to the sign-in page."""

    def redirect(self, request: Request) -> RedirectResponse:
        base = request.scope.get("root_path", "")
        target = request.url.path.removeprefix(base) or "/"
        if request.url.query:
            target += "?" + request.url.query
        return RedirectResponse(f"{base}/sign-in?next={quote(target, safe='/')}", status_code=303)


def session_token(request: Request) -> tuple[TokenInfo | None, str | None]:
    """(the signed-in token, or None with why not: None when there is no session at all)."""
    token = request.cookies.get(SESSION_COOKIE)
    if not token:
        return None, None
    try:
        info = authenticate(settings_of(request), token)
    except AuthenticationError as exc:
        return None, str(exc)
    request.state.token = info  # the access log names it
    return info, None


def operator(request: Request) -> TokenInfo:
    """The dependency of every console page with data."""
    info, _ = session_token(request)
    if info is None:
        raise SignInRequired
    return info


#: The signed-in operator: ``def page(who: Operator) -> …``.
Operator = Annotated[TokenInfo, Depends(operator)]


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a path of this console only (never another site)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
