"""Apply the Alembic migrations from code (``medbatch db upgrade``, ``medbatch up``, tests).

Every submission makes sure the schema is at head (``prepare_submission``), once per process,
and ``medbatch ehr FILE`` is a new process each time: importing Alembic and loading its scripts
to learn that there is nothing to do cost ~0.6 s of each command. :func:`upgrade` to head first
compares the database's ``alembic_version`` with the newest revision read from the scripts'
``revision``/``down_revision`` lines; anything it cannot read plainly is left to Alembic.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

_REVISION = re.compile(r"""^revision(?:\s*:[^=\n]*)?\s*=\s*["']([^"'\n]+)["']\s*$""", re.M)
_DOWN_REVISION = re.compile(
    r"""^down_revision(?:\s*:[^=\n]*)?\s*=\s*(?:None|["']([^"'\n]+)["'])\s*$""", re.M
)


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def script_head() -> str | None:
    """The newest revision of ``versions/``, read from its scripts without Alembic; None unless
    every script names its revision and one parent plainly and they form one chain (a merge, a
    branch: Alembic decides)."""
    scripts = [p for p in (MIGRATIONS_DIR / "versions").glob("*.py") if p.name != "__init__.py"]
    revisions: set[str] = set()
    parents: set[str] = set()
    for script in scripts:
        source = script.read_text(encoding="utf-8")
        revision, parent = _REVISION.findall(source), _DOWN_REVISION.findall(source)
        if len(revision) != 1 or len(parent) != 1:
            return None
        revisions.add(revision[0])
        if parent[0]:
            parents.add(parent[0])
    heads = revisions - parents
    if len(revisions) != len(scripts) or len(heads) != 1 or not parents <= revisions:
        return None
    return heads.pop()


def at_head(url: str) -> bool:
    """Whether the database at ``url`` is at :func:`script_head` (one read-only query; False
    when it cannot tell: no schema yet, no database, scripts it cannot read plainly)."""
    head = script_head()
    if head is None:
        return False
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    from db.session import get_reader_engine

    try:
        with get_reader_engine(url).connect() as conn:
            found = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    except SQLAlchemyError:
        return False
    return list(found) == [head]


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (idempotent; at head already, without
    loading Alembic)."""
    if revision == "head" and at_head(url):
        return
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)
