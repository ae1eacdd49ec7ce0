"""Engines and sessions: one engine per database URL and per process (Celery forks workers).

SQLite is tuned for several writer processes: WAL journal, ``synchronous=FULL`` (a committed
result survives power loss), a long busy timeout, and ``BEGIN IMMEDIATE`` so a transaction takes
the write lock up front instead of failing mid-way with "database is locked".
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

_ENGINES: dict[tuple[str, int], Engine] = {}


def json_dumps(value: Any) -> str:
    """JSON columns' serialiser: orjson, ~20× faster than ``json.dumps`` on the per-patient
    explanations that were most of the EHR store's time. Non-string keys become strings, as
    ``json.dumps`` makes them."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


#: Serialiser and parser of JSON columns, for every dialect.
_JSON = {"json_serializer": json_dumps, "json_deserializer": orjson.loads}


def make_engine(url: str) -> Engine:
    """Create an engine with the per-dialect settings medbatch relies on."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60}, **_JSON)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None  # let the "begin" hook below issue BEGIN
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn) -> None:  # type: ignore[no-untyped-def]
            # Writers take the write lock up front (no deadlock upgrading a read); a read-only
            # session (read_scope) begins deferred: in WAL mode it never blocks a writer.
            deferred = conn.get_execution_options().get("medbatch_read_only", False)
            conn.exec_driver_sql("BEGIN" if deferred else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, **_JSON)


def get_engine(url: str) -> Engine:
    """The engine for ``url`` in this process (a forked child gets its own pool)."""
    key = (url, os.getpid())
    engine = _ENGINES.get(key)
    if engine is None:
        engine = _ENGINES[key] = make_engine(url)
    return engine


def get_reader_engine(url: str) -> Engine:
    """An engine for reads next to busy writers (the DICOM listener's duplicate check, exports):
    on SQLite its transactions begin DEFERRED, so a read runs on the WAL snapshot instead of
    queueing for the write lock that ``BEGIN IMMEDIATE`` takes. Never write through it."""
    return get_engine(url).execution_options(medbatch_read_only=True)


def dispose_all() -> None:
    """Drop every pooled connection (call at exit, or in a child right after a fork)."""
    for engine in _ENGINES.values():
        engine.dispose(close=False)
    _ENGINES.clear()


@contextmanager
def read_scope(url: str) -> Iterator[Session]:
    """A read-only transaction for long reads (exports streaming millions of rows): on SQLite it
    takes no write lock, so workers keep committing meanwhile. Write nothing in it."""
    session = sessionmaker(bind=get_reader_engine(url), expire_on_commit=False)()
    try:
        yield session
    finally:
        session.close()  # the pool rolls the connection back; loaded objects stay readable


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any exception."""
    session = sessionmaker(bind=get_engine(url), expire_on_commit=False)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
