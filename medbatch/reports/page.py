"""What every HTML report does: render its template, inline its figures as SVG, write the page
and audit the writing (a report is an access to results)."""

from __future__ import annotations

import io
from importlib.resources import files
from pathlib import Path
from typing import Any

from jinja2 import Environment, select_autoescape
from matplotlib.figure import Figure
from sqlalchemy.orm import Session

from db import audit


def figure_svg(fig: Figure) -> str:
    """A matplotlib figure as inline SVG (no XML prologue: it goes inside the page)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    text = buf.getvalue()
    return text[text.index("<svg") :]


def write_report(
    session: Session,
    template: str,
    out: Path,
    *,
    job_id: int,
    actor: str,
    details: dict[str, Any],
    **context: Any,
) -> Path:
    """Render ``templates/<template>`` with ``context`` to ``out`` and audit it."""
    source = files("medbatch.reports").joinpath(f"templates/{template}").read_text("utf-8")
    env = Environment(autoescape=select_autoescape(default=True))
    page = env.from_string(source).render(**context)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    audit.append(
        session,
        actor=actor,
        action="results.report",
        subject=f"job:{job_id}",
        details={"file": out.name, **details},
    )
    return out
