"""The Alembic migrations create exactly the tables the models describe, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from db.migrate import downgrade, upgrade
from db.models import Base
from db.session import get_engine


def test_migrations_match_models(db_url: str) -> None:
    with get_engine(db_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], diff


def test_upgrade_is_idempotent_and_downgrade_clean(db_url: str) -> None:
    upgrade(db_url)  # already at head: nothing to do, no error
    downgrade(db_url, "base")
    tables = set(inspect(get_engine(db_url)).get_table_names()) - {"alembic_version"}
    assert tables == set()
    upgrade(db_url)
    assert {"jobs", "compounds", "predictions", "audit_events"} <= set(
        inspect(get_engine(db_url)).get_table_names()
    )
