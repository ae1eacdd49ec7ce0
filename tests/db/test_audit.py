"""The hash-chained audit log on SQLite and PostgreSQL: it verifies, it detects tampering, the
database refuses edits, and concurrent appenders cannot fork the chain."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from db import audit
from db.session import get_engine, session_scope


def _append(url: str, n: int, actor: str = "test") -> None:
    for i in range(n):
        with session_scope(url) as s:
            audit.append(s, actor=actor, action="job.done", subject=f"job:{i}", details={"i": i})


def _disable_guard(url: str) -> None:
    """What an attacker with database rights would do first."""
    with get_engine(url).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("ALTER TABLE audit_events DISABLE TRIGGER audit_events_append_only"))
        else:
            conn.execute(text("DROP TRIGGER audit_events_no_update"))
            conn.execute(text("DROP TRIGGER audit_events_no_delete"))


def test_chain_verifies(db_url: str) -> None:
    _append(db_url, 12)
    with session_scope(db_url) as s:
        report = audit.verify_chain(s)
    assert report.ok and report.events == 12


def test_empty_chain_verifies(db_url: str) -> None:
    with session_scope(db_url) as s:
        assert audit.verify_chain(s).ok


def test_database_refuses_update_and_delete(db_url: str) -> None:
    _append(db_url, 2)
    for statement in (
        "UPDATE audit_events SET actor = 'mallory' WHERE seq = 1",
        "DELETE FROM audit_events WHERE seq = 2",
    ):
        with pytest.raises(DBAPIError, match="append-only"), get_engine(db_url).begin() as conn:
            conn.execute(text(statement))


def test_altered_row_is_named(db_url: str) -> None:
    _append(db_url, 6)
    _disable_guard(db_url)
    with get_engine(db_url).begin() as conn:
        conn.execute(text("UPDATE audit_events SET actor = 'mallory' WHERE seq = 4"))
    with session_scope(db_url) as s:
        report = audit.verify_chain(s)
    assert not report.ok and report.broken_seq == 4 and "altered" in report.reason
    assert report.events == 3


def test_deleted_row_is_named(db_url: str) -> None:
    _append(db_url, 6)
    _disable_guard(db_url)
    with get_engine(db_url).begin() as conn:
        conn.execute(text("DELETE FROM audit_events WHERE seq = 3"))
    with session_scope(db_url) as s:
        report = audit.verify_chain(s)
    assert not report.ok and report.broken_seq == 3 and "missing" in report.reason


def test_truncated_tail_is_detected(db_url: str) -> None:
    _append(db_url, 5)
    _disable_guard(db_url)
    with get_engine(db_url).begin() as conn:
        conn.execute(text("DELETE FROM audit_events WHERE seq = 5"))
    with session_scope(db_url) as s:
        report = audit.verify_chain(s)
    assert not report.ok and "head" in report.reason


def test_concurrent_appenders_keep_one_chain(db_url: str) -> None:
    threads = [threading.Thread(target=_append, args=(db_url, 15, f"w{i}")) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with session_scope(db_url) as s:
        report = audit.verify_chain(s)
    assert report.ok and report.events == 60


def test_rolled_back_transaction_leaves_no_event(db_url: str) -> None:
    _append(db_url, 1)
    with pytest.raises(RuntimeError), session_scope(db_url) as s:
        audit.append(s, actor="t", action="x", subject="s")
        raise RuntimeError("the change it described failed")
    with session_scope(db_url) as s:
        report = audit.verify_chain(s)
    assert report.ok and report.events == 1


def test_subject_digest_hides_identifier() -> None:
    digest = audit.subject_digest("PAT-000123")
    assert "PAT-000123" not in digest and digest == audit.subject_digest("PAT-000123")
    assert digest != audit.subject_digest("PAT-000124")
