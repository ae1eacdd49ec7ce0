"""The console's pages rendered from the package's Jinja2 templates, every value escaped, with
the console's Content-Security-Policy."""

from __future__ import annotations

from datetime import UTC, datetime
from functools import cache
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from core.job_kinds import RESULT_KINDS, JobKind, job_kind
from medbatch.api.security import console_headers
from medbatch.services.jobs import JobState
from medbatch.services.tokens import Scope, TokenInfo

TERMINAL = sorted(s.value for s in JobState if s.terminal)


def _when(value: datetime | None) -> str:
    if value is None:
        return "–"
    if value.tzinfo is None:  # SQLite hands naive datetimes back; they are UTC
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _seconds(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return "–"
    s = (end - start).total_seconds()
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _num(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


#: Short names for tables (the job-kind table's labels are sentences; they show on hover).
SHORT = {
    JobKind.CHEM_SCREEN: "library",
    JobKind.CHEM_CHUNK: "chunk",
    JobKind.DICOM_STUDY: "study",
    JobKind.DICOM_SEND: "send to PACS",
    JobKind.EHR_EXTRACT: "EHR extract",
    JobKind.EHR_INGEST: "extract ingest",
    JobKind.EHR_BATCH: "patient batch",
}


def _short(kind: str) -> str:
    return SHORT.get(JobKind(kind), kind) if kind in JobKind._value2member_map_ else kind


def _label(kind: str) -> str:
    return job_kind(kind).label if kind in JobKind._value2member_map_ else kind


def _has_results(kind: str) -> bool:
    return kind in RESULT_KINDS


@cache
def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("medbatch.api.console", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=_when, num=_num, label=_label, short=_short)
    env.globals.update(seconds=_seconds, has_results=_has_results, terminal=TERMINAL)
    return env


def page(
    request: Request,
    template: str,
    *,
    who: TokenInfo | None,
    active: str = "",
    status: int = 200,
    **context: Any,
) -> HTMLResponse:
    """``templates/<template>`` with the context every page has: the path prefix (behind a
    proxy), the operator and what their token may do."""
    html = (
        environment()
        .get_template(template)
        .render(
            base=request.scope.get("root_path", ""),
            who=who,
            can_submit=who is not None and who.allows(Scope.SUBMIT),
            can_admin=who is not None and who.allows(Scope.ADMIN),
            active=active,
            **context,
        )
    )
    return HTMLResponse(html, status_code=status, headers=console_headers())
