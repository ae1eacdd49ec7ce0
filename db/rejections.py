"""The rejected lines of a submitted file, in line order: shared by every kind of results."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Rejection


@dataclass(frozen=True)
class RejectedLine:
    line_no: int
    record_name: str | None
    raw: str
    reason: str


def iter_rejections(session: Session, job_id: int, page: int) -> Iterator[RejectedLine]:
    """The job's rejected lines in line order, ``page`` rows per query."""
    last = 0
    while True:
        rows = session.execute(
            select(Rejection.line_no, Rejection.record_name, Rejection.raw, Rejection.reason)
            .where(Rejection.job_id == job_id, Rejection.line_no > last)
            .order_by(Rejection.line_no)
            .limit(page)
        ).all()
        if not rows:
            return
        for r in rows:
            yield RejectedLine(r.line_no, r.record_name, r.raw, r.reason)
        last = rows[-1].line_no
