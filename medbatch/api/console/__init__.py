"""The operator console: server-rendered pages at ``/`` over the same services the API and the
CLI call, signed in with an API token kept in an HttpOnly session cookie. Its templates and its
one stylesheet and script ship inside the package; nothing is fetched from elsewhere."""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse
from starlette.staticfiles import StaticFiles

from medbatch.api.console.session import SignInRequired


def mount(app: FastAPI) -> None:
    """Add the console's pages, its assets (public) and the sign-in redirect to ``app``."""
    from medbatch.api.console.pages import router

    app.include_router(router)
    static = files("medbatch.api.console").joinpath("static")
    app.mount("/console/static", StaticFiles(directory=str(static)), name="console-static")

    @app.exception_handler(SignInRequired)
    async def _sign_in(request: Request, exc: SignInRequired) -> RedirectResponse:
        return exc.redirect(request)
