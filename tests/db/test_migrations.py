"""The Alembic migrations create exactly the tables the models describe, on both databases."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from db.migrate import alembic_config, at_head, downgrade, script_head, upgrade
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


def test_script_head_is_alembics() -> None:
    """The head read from the scripts' lines (the fast path of ``upgrade``) is Alembic's."""
    scripts = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert script_head() == scripts.get_current_head()


def test_at_head_only_when_the_schema_is_current(db_url: str, tmp_path: Path) -> None:
    assert at_head(db_url)
    head = script_head()
    assert head is not None
    downgrade(db_url, f"{head}-1")
    assert not at_head(db_url)
    upgrade(db_url)  # not at head: Alembic runs the missing step
    assert at_head(db_url)
    assert not at_head(f"sqlite:///{tmp_path / 'empty.db'}")  # no schema at all
