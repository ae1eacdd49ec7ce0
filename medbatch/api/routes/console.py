"""The operator console at ``/`` (pages and their assets ship in the package)."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import HTMLResponse


def mount(app: FastAPI) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return "<!doctype html><title>medbatch</title><p>medbatch API: see <a href='docs'>docs</a>"
