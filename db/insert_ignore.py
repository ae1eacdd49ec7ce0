"""``INSERT ... ON CONFLICT DO NOTHING`` for SQLite and PostgreSQL: how a redelivered task
stores its rows once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import Base


def insert_ignore(
    session: Session, model: type[Base], rows: Sequence[dict[str, Any]], conflict: Sequence[str]
) -> int:
    """Insert ``rows``, skipping those colliding on the ``conflict`` columns; returns inserted."""
    if not rows:
        return 0
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    # RETURNING counts what was inserted on both dialects (an executemany's rowcount is -1 or 0
    # on PostgreSQL); SQLAlchemy batches the rows into multi-row VALUES either way.
    key = next(iter(inspect(model).primary_key))
    stmt = insert(model).on_conflict_do_nothing(index_elements=list(conflict)).returning(key)
    result = session.connection().execute(stmt, list(rows))
    return len(result.all())
