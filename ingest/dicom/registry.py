"""The database side of receiving: rows of instances in flight, committed together.

An instance may be answered Success only once its row (with its study's upsert and its audit
event) is committed, and a commit costs a flush of the database's log. One thread per listener
process, the :class:`GroupCommitter`, takes every row waiting at that moment (from all
associations: one waits per association) and commits them in one transaction; it also fsyncs
their files' directories, once per directory, while the senders' threads fsync the files. A row
is committed only after its file and directory entry are durable, and its sender is answered
only after the commit, so "Success means stored" holds instance by instance; a failed batch is
retried row by row, so one bad row fails alone.

Duplicates (a resent SOP Instance UID) and refusals (with their ``dicom_rejections`` row) go
through the same thread, so each gets its audit event without a transaction of its own.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Connection, Integer, Table, bindparam, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from db import audit
from db.models import DicomInstance, DicomRejection, DicomStudy, utcnow
from db.session import get_engine, get_reader_engine
from ingest.dicom.files import fsync_dir
from ingest.dicom.validate import ReceivedInstance

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NewInstance:
    """A validated instance whose file is in place: its row to commit."""

    inst: ReceivedInstance
    path: str  # relative to the DICOM storage root
    size_bytes: int
    sha256: str
    calling_ae: str


@dataclass(frozen=True)
class Duplicate:
    """A resent instance already stored: audited, not stored again."""

    sop_instance_uid: str
    sha256: str
    calling_ae: str


@dataclass(frozen=True)
class Refusal:
    """An instance answered with a failure status: its ``dicom_rejections`` row."""

    calling_ae: str
    peer_address: str
    sop_class_uid: str | None
    sop_instance_uid: str | None
    status: int
    reason: str


Item = NewInstance | Duplicate | Refusal


@dataclass(frozen=True)
class Registered:
    """Outcome of one item: its study (None for a refusal) and whether a row was added."""

    study_id: int | None
    inserted: bool


class Ticket:
    """One item waiting for the committer; a :class:`NewInstance`'s sender reports its file's
    fsync with :meth:`file_synced` and then :meth:`wait`\\ s for the commit."""

    def __init__(self, item: Item, directory: Path | None) -> None:
        self.item = item
        self.directory = directory
        self._file_done = threading.Event()
        self._file_error: BaseException | None = None
        if directory is None:
            self._file_done.set()
        self._done = threading.Event()
        self._result: Registered | None = None
        self._error: BaseException | None = None

    def file_synced(self, error: BaseException | None = None) -> None:
        self._file_error = error
        self._file_done.set()

    def _wait_file(self, timeout: float) -> BaseException | None:
        if not self._file_done.wait(timeout):
            return TimeoutError("the file's fsync did not finish in time")
        return self._file_error

    def _resolve(self, result: Registered) -> None:
        self._result = result
        self._done.set()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._done.set()

    def wait(self, timeout: float) -> Registered:
        """The committed outcome; raises what prevented the commit."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"the database commit did not finish within {timeout:g} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


_STUDIES = cast(Table, DicomStudy.__table__)
_INSTANCES = cast(Table, DicomInstance.__table__)
_REJECTIONS = cast(Table, DicomRejection.__table__)


class _Statements:
    """The commit path's statements, built once per dialect (SQLAlchemy then reuses their
    compiled form; building them per commit cost more than the commit's own flush)."""

    def __init__(self, dialect: str) -> None:
        ins = postgresql.insert if dialect == "postgresql" else sqlite.insert
        self.add_studies = ins(_STUDIES).on_conflict_do_nothing(index_elements=["study_uid"])
        # One row per statement: an expanding IN (...) is compiled again at each execution.
        self.lock_study = (
            select(_STUDIES.c.id, _STUDIES.c.version, _STUDIES.c.open)
            .where(_STUDIES.c.study_uid == bindparam("uid"))
            .with_for_update()
        )
        self.add_instances = (
            ins(_INSTANCES)
            .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
            .returning(_INSTANCES.c.sop_instance_uid)
        )
        self.bump_studies = (
            update(_STUDIES)
            .where(_STUDIES.c.id == bindparam("sid"))
            .values(
                open=True,
                last_instance_at=bindparam("now"),
                instance_count=_STUDIES.c.instance_count + bindparam("n", type_=Integer),
            )
        )
        self.stored = select(_INSTANCES.c.study_id, _INSTANCES.c.sha256).where(
            _INSTANCES.c.sop_instance_uid == bindparam("uid")
        )
        self.add_rejections = insert(_REJECTIONS)


_STATEMENTS: dict[str, _Statements] = {}


def _statements(conn: Connection) -> _Statements:
    name = conn.dialect.name
    found = _STATEMENTS.get(name)
    if found is None:
        found = _STATEMENTS[name] = _Statements(name)
    return found


#: The duplicate check (a read on the reader engine).
_STORED_STUDY = select(_INSTANCES.c.study_id).where(
    _INSTANCES.c.sop_instance_uid == bindparam("uid")
)


class GroupCommitter:
    """The committing thread of one listener process (see the module docstring)."""

    def __init__(self, database_url: str, *, max_batch: int = 64, timeout_s: float = 120.0) -> None:
        self.database_url = database_url
        self.max_batch = max_batch
        self.timeout_s = timeout_s
        self._queue: queue.SimpleQueue[Ticket | None] = queue.SimpleQueue()
        self._conn: Connection | None = None
        self._thread = threading.Thread(target=self._run, name="dicom-group-commit", daemon=True)
        self._thread.start()

    # --- for the senders' threads ----------------------------------------------------------
    def stored_study(self, sop_instance_uid: str) -> int | None:
        """The study holding ``sop_instance_uid`` if it is stored (a read that never waits for
        the committer or the write lock)."""
        with get_reader_engine(self.database_url).connect() as conn:
            found = conn.execute(_STORED_STUDY, {"uid": sop_instance_uid}).scalar()
        return None if found is None else int(found)

    def submit(self, item: Item, directory: Path | None = None) -> Ticket:
        """Queue ``item``; with ``directory`` (a new file's), the commit also waits for
        :meth:`Ticket.file_synced` and fsyncs that directory."""
        ticket = Ticket(item, directory)
        self._queue.put(ticket)
        return ticket

    def commit(self, item: Item) -> Registered:
        """Queue ``item`` (no file) and wait for its commit."""
        return self.submit(item).wait(self.timeout_s)

    def close(self) -> None:
        """Commit what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout=self.timeout_s)

    # --- the committing thread -------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        finally:
            if self._conn is not None:
                self._conn.close()

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            try:
                self._commit_batch(batch)
            except BaseException as exc:  # never leave a sender waiting
                log.exception("group commit failed")
                for t in batch:
                    if not t._done.is_set():
                        t._fail(exc)
            if stop:
                return

    def _commit_batch(self, batch: list[Ticket]) -> None:
        dir_errors: dict[Path, OSError] = {}
        for directory in sorted({t.directory for t in batch if t.directory is not None}):
            try:
                fsync_dir(directory)
            except OSError as exc:
                dir_errors[directory] = exc
        ready = []
        for t in batch:
            error = t._wait_file(self.timeout_s)
            if error is None and t.directory is not None:
                error = dir_errors.get(t.directory)
            if error is not None:
                t._fail(error)
            else:
                ready.append(t)
        if not ready:
            return
        try:
            results = self._transaction([t.item for t in ready])
        except Exception as exc:
            if len(ready) == 1:
                ready[0]._fail(exc)
                return
            log.warning(
                "a group commit of %d rows failed (%s); committing them one by one", len(ready), exc
            )
            for t in ready:
                try:
                    t._resolve(self._transaction([t.item])[0])
                except Exception as one:
                    t._fail(one)
            return
        for t, r in zip(ready, results, strict=True):
            t._resolve(r)

    def _transaction(self, items: Sequence[Item]) -> list[Registered]:
        """One transaction for ``items``; outcomes in the same order."""
        now = utcnow()
        conn = self._connection()
        try:
            with conn.begin():
                return self._write(conn, items, now)
        except Exception:
            self._conn = None  # a broken connection is not reused; a fresh one next time
            conn.invalidate()
            raise

    def _connection(self) -> Connection:
        """The committing thread keeps one connection (no pool checkout per commit)."""
        if self._conn is None or self._conn.closed:
            self._conn = get_engine(self.database_url).connect()
        return self._conn

    def _write(self, conn: Connection, items: Sequence[Item], now: datetime) -> list[Registered]:
        """The statements of one transaction: studies, instances, duplicates, refusals, audit."""
        out: list[Registered | None] = [None] * len(items)
        events: list[tuple[int, audit.EventRecord]] = []  # (item index, event)
        st = _statements(conn)
        news = [(i, it) for i, it in enumerate(items) if isinstance(it, NewInstance)]
        lost: dict[int, NewInstance | Duplicate] = {}
        if news:
            studies = self._studies(conn, st, [n for _, n in news], now)
            first: dict[str, int] = {}
            for i, n in news:
                first.setdefault(n.inst.sop_instance_uid, i)
            rows = [
                {
                    "study_id": studies[n.inst.study_uid][0],
                    "batch": studies[n.inst.study_uid][1] + 1,
                    "series_uid": n.inst.series_uid,
                    "sop_instance_uid": n.inst.sop_instance_uid,
                    "sop_class_uid": n.inst.sop_class_uid,
                    "transfer_syntax_uid": n.inst.transfer_syntax_uid,
                    "modality": n.inst.modality,
                    "path": n.path,
                    "size_bytes": n.size_bytes,
                    "sha256": n.sha256,
                    "calling_ae": n.calling_ae,
                    "received_at": now,
                }
                for i, n in news
                if first[n.inst.sop_instance_uid] == i
            ]
            inserted = set(conn.execute(st.add_instances, rows).scalars().all())
            per_study: Counter[int] = Counter()
            for i, n in news:
                study_id, version, was_open = studies[n.inst.study_uid]
                uid = n.inst.sop_instance_uid
                if first[uid] != i or uid not in inserted:
                    lost[i] = n  # resent at the same moment, or stored meanwhile elsewhere
                    continue
                details: dict[str, Any] = {
                    "batch": version + 1,
                    "modality": n.inst.modality,
                    "bytes": n.size_bytes,
                    "sha256": n.sha256,
                }
                if not was_open and not per_study[study_id]:
                    details["reopened_after_version"] = version
                per_study[study_id] += 1
                out[i] = Registered(study_id, True)
                events.append(
                    (
                        i,
                        audit.EventRecord(
                            f"ae:{n.calling_ae}",
                            "dicom.stored",
                            f"dicom-study:{study_id}",
                            details,
                        ),
                    )
                )
            if per_study:
                conn.execute(
                    st.bump_studies,
                    [{"sid": k, "now": now, "n": v} for k, v in sorted(per_study.items())],
                )
        lost.update({i: it for i, it in enumerate(items) if isinstance(it, Duplicate)})
        if lost:
            self._duplicates(conn, st, lost, out, events)
        refusals = [(i, it) for i, it in enumerate(items) if isinstance(it, Refusal)]
        if refusals:
            conn.execute(
                st.add_rejections,
                [
                    {
                        "calling_ae": r.calling_ae[:16],
                        "peer_address": r.peer_address[:64],
                        "sop_class_uid": (r.sop_class_uid or "")[:64] or None,
                        "sop_instance_uid": (r.sop_instance_uid or "")[:64] or None,
                        "status": r.status,
                        "reason": r.reason,
                        "received_at": now,
                    }
                    for _, r in refusals
                ],
            )
            for i, r in refusals:
                out[i] = Registered(None, False)
                events.append(
                    (
                        i,
                        audit.EventRecord(
                            f"ae:{r.calling_ae[:16]}",
                            "dicom.refused",
                            f"peer:{r.peer_address}",
                            {"status": r.status, "reason": r.reason},
                        ),
                    )
                )
        audit.append_many(conn, [ev for _, ev in sorted(events, key=lambda e: e[0])])
        return [r if r is not None else Registered(None, False) for r in out]

    @staticmethod
    def _studies(
        conn: Connection, st: _Statements, news: list[NewInstance], now: datetime
    ) -> dict[str, tuple[int, int, bool]]:
        """Create missing studies; lock and return ``study_uid → (id, version, open)``."""
        firsts: dict[str, NewInstance] = {}
        for n in news:
            firsts.setdefault(n.inst.study_uid, n)
        uids = sorted(firsts)  # one lock order for every process: no deadlock between them
        conn.execute(
            st.add_studies,
            [
                {
                    "study_uid": uid,
                    "patient_digest": firsts[uid].inst.patient_digest,
                    "calling_ae": firsts[uid].calling_ae,
                    "accession_number": firsts[uid].inst.accession_number or None,
                    "study_date": firsts[uid].inst.study_date or None,
                    "open": True,
                    "version": 0,
                    "instance_count": 0,
                    "first_instance_at": now,
                    "last_instance_at": now,
                }
                for uid in uids
            ],
        )
        found = {}
        for uid in uids:
            row = conn.execute(st.lock_study, {"uid": uid}).one()
            found[uid] = (int(row.id), int(row.version), bool(row.open))
        return found

    @staticmethod
    def _duplicates(
        conn: Connection,
        st: _Statements,
        lost: dict[int, NewInstance | Duplicate],
        out: list[Registered | None],
        events: list[tuple[int, audit.EventRecord]],
    ) -> None:
        def uid(it: NewInstance | Duplicate) -> str:
            return it.inst.sop_instance_uid if isinstance(it, NewInstance) else it.sop_instance_uid

        stored = {}
        for u in sorted({uid(it) for it in lost.values()}):
            row = conn.execute(st.stored, {"uid": u}).one()
            stored[u] = (int(row.study_id), str(row.sha256))
        for i, it in lost.items():
            study_id, sha = stored[uid(it)]
            out[i] = Registered(study_id, False)
            events.append(
                (
                    i,
                    audit.EventRecord(
                        f"ae:{it.calling_ae}",
                        "dicom.duplicate",
                        f"dicom-study:{study_id}",
                        {"same_content": sha == it.sha256},
                    ),
                )
            )
