"""Submission on SQLite and PostgreSQL: rejections with reasons, dedup within and across files,
chunking, committed-before-published ordering, idempotent re-submission, bounded memory.

The publisher here is a plain callable that records what would go to Redis and checks the job
is committed and queued at that moment; the real broker is exercised by the server tests."""

from __future__ import annotations

import gzip
import tracemalloc
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from core.errors import InputError
from core.settings import Settings
from db.models import ChunkItem, Job, JobState, LibraryEntry, Prediction, Rejection
from db.session import session_scope
from ingest.chem.submit import ScreenOptions, submit_library
from tests.helpers import unique_valid


class Recorder:
    """Stands where the broker would: records job ids, asserting each is durable and queued."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ids: list[int] = []

    def __call__(self, job_id: int, kind: str) -> None:
        with session_scope(self.url) as s:
            job = s.get(Job, job_id)
            assert job is not None and job.state == JobState.QUEUED.value
            assert (
                s.scalar(select(func.count()).where(ChunkItem.job_id == job_id)) == job.item_count
            )
        self.ids.append(job_id)


def _settings(url: str, tmp: Path, **kw: object) -> Settings:
    return Settings(storage_dir=tmp, database_url=url, chem_chunk_size=4, chem_ingest_batch=5, **kw)


@pytest.mark.parametrize("processes", [1, 2], ids=["in-process", "2-canonicalisers"])
def test_counts_rejections_duplicates_and_chunks(
    db_url: str, tmp_path: Path, nci_smiles: list[tuple[str, str]], processes: int
) -> None:
    """Also with the RDKit work in 2 processes (3 batches of 5 rows in flight at once): same
    counts, the same RDKit reasons, duplicates resolved in file order."""
    mols = unique_valid(nci_smiles, 10)
    lines = ["smiles,id"] + [f"{s},{n}" for s, n, _ in mols]
    lines += ["C1CC(,bad1", f"{mols[0][0]},again", "c1ccccc,bad2", f"{mols[3][0]},again2"]
    lib = tmp_path / "lib.csv"
    lib.write_text("\n".join(lines) + "\n")
    rec = Recorder(db_url)
    settings = _settings(db_url, tmp_path, chem_canonicalize_processes=processes)
    res = submit_library(lib, settings, rec, ScreenOptions(id_column="id"))
    assert res.counts == {
        "rows": 14,
        "valid": 12,
        "rejected": 2,
        "duplicates": 2,
        "already_scored": 0,
        "to_score": 10,
        "chunks": 3,
    }
    assert rec.ids == res.chunk_ids and len(rec.ids) == 3
    with session_scope(db_url) as s:
        sizes = [s.get(Job, i).item_count for i in rec.ids]  # type: ignore[union-attr]
        assert sizes == [4, 4, 2]
        items = s.scalars(select(ChunkItem.compound_id).where(ChunkItem.job_id.in_(rec.ids))).all()
        assert len(items) == len(set(items)) == 10
        rej = s.execute(
            select(Rejection.line_no, Rejection.reason).order_by(Rejection.line_no)
        ).all()
        assert [r.line_no for r in rej] == [12, 14]
        assert "syntax error" in rej[0].reason and "unclosed ring" in rej[1].reason
        dups = s.execute(
            select(LibraryEntry.line_no, LibraryEntry.duplicate_of_line)
            .where(LibraryEntry.duplicate_of_line.is_not(None))
            .order_by(LibraryEntry.line_no)
        ).all()
        assert [tuple(d) for d in dups] == [(13, 2), (15, 5)]
        parent = s.get(Job, res.job_id)
        assert parent is not None and parent.state == JobState.QUEUED.value


def test_resubmission_finds_the_existing_job(db_url: str, tmp_path: Path) -> None:
    lib = tmp_path / "lib.smi"
    lib.write_text("CCO\nCCN\nCCC\n")
    settings = _settings(db_url, tmp_path)
    first = submit_library(lib, settings, Recorder(db_url))
    rec = Recorder(db_url)
    second = submit_library(lib, settings, rec)
    assert second.existing and second.job_id == first.job_id and rec.ids == []
    forced = submit_library(lib, settings, rec, ScreenOptions(force=True))
    assert not forced.existing and forced.counts["to_score"] == 3 and len(rec.ids) == 1


def test_scored_molecules_are_not_rescored_in_a_new_file(db_url: str, tmp_path: Path) -> None:
    settings = _settings(db_url, tmp_path)
    a = tmp_path / "a.smi"
    a.write_text("CCO\nCCN\n")
    first = submit_library(a, settings, Recorder(db_url))
    with session_scope(db_url) as s:  # a worker scored the chunk and closed it
        for cid in first.chunk_ids:
            for (compound_id,) in s.execute(
                select(ChunkItem.compound_id).where(ChunkItem.job_id == cid)
            ):
                s.add(
                    Prediction(
                        job_id=cid,
                        compound_id=compound_id,
                        model_name="molecule_gnn",
                        model_version="1",
                        outputs={"logS": 0.0},
                    )
                )
            s.execute(update(Job).where(Job.id == cid).values(state="done"))
    b = tmp_path / "b.smi"
    b.write_text("OCC\nCCCl\nNCC\n")  # ethanol and ethylamine again, spelled differently
    second = submit_library(b, settings, Recorder(db_url))
    assert second.counts["already_scored"] == 2 and second.counts["to_score"] == 1


def test_molecules_in_flight_elsewhere_are_not_queued_twice(db_url: str, tmp_path: Path) -> None:
    settings = _settings(db_url, tmp_path)
    (tmp_path / "a.smi").write_text("CCO\nCCN\n")
    (tmp_path / "b.smi").write_text("CCN\nCCS\n")
    submit_library(tmp_path / "a.smi", settings, Recorder(db_url))
    second = submit_library(tmp_path / "b.smi", settings, Recorder(db_url))
    assert second.counts["to_score"] == 1 and second.counts["already_scored"] == 1


def test_unreadable_file_rejects_the_job(db_url: str, tmp_path: Path) -> None:
    lib = tmp_path / "lib.csv"
    lib.write_text("name,structure\nx,CCO\n")
    with pytest.raises(InputError, match="smiles-column"):
        submit_library(lib, _settings(db_url, tmp_path), Recorder(db_url))
    with session_scope(db_url) as s:
        job = s.scalars(select(Job)).one()
        assert job.state == JobState.REJECTED.value and "structure" in (job.error or "")


def _peak_submit_bytes(tmp: Path, n: int) -> int:
    from db.migrate import upgrade

    url = f"sqlite:///{tmp / f'm{n}.db'}"
    upgrade(url)
    lib = tmp / f"big{n}.smi.gz"
    with gzip.open(lib, "wt") as fh:
        for i in range(n):
            fh.write(f"{'C' * (1 + i % 40)}{'O' * (i // 40)} m{i}\n")
    settings = Settings(
        storage_dir=tmp, database_url=url, chem_ingest_batch=500, chem_chunk_size=512
    )
    tracemalloc.start()
    res = submit_library(lib, settings, Recorder(url))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert res.counts["valid"] == n
    return peak


@pytest.mark.slow
def test_submission_memory_does_not_grow_with_the_file(tmp_path: Path) -> None:
    _peak_submit_bytes(tmp_path, 200)  # warm imports and caches so they do not count
    small, large = _peak_submit_bytes(tmp_path, 1500), _peak_submit_bytes(tmp_path, 9000)
    # Six times the rows, same batch size: the peak must stay (nearly) where it was.
    assert large < small * 1.5, f"peak {small} bytes for 1,500 rows, {large} for 9,000"


def test_first_batch_is_one_chunk_so_workers_start_early() -> None:
    from ingest.chem.readers import RawRecord
    from ingest.chem.submit import _batches

    records = [RawRecord(line_no=i, name=None, text="C", molblock=False) for i in range(11)]
    sizes = [len(b) for b in _batches(records, 4, first=2)]
    assert sizes == [2, 4, 4, 1]
    assert [len(b) for b in _batches(records, 4, first=9)] == [4, 4, 3]
    assert [len(b) for b in _batches(records, 4)] == [4, 4, 3]
