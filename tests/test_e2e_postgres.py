"""The screening flow on PostgreSQL, as in production, with two worker processes racing: chunk
transitions, the audit chain head and the parent's completion are contended for real."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from db.audit import verify_chain
from db.models import JobState, Prediction
from db.session import session_scope
from ingest.chem.submit import submit_library
from medbatch.stack.embedded import EmbeddedStack
from tests.conftest import _drop_pg_database, _fresh_pg_database, make_settings, private_stack
from tests.helpers import chunk_jobs, predictions_for, unique_valid, wait_for_job, write_smi
from workers.dispatch import publish

pytestmark = [pytest.mark.server, pytest.mark.postgres]


@pytest.fixture(scope="module")
def pg_stack(
    postgres_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EmbeddedStack]:
    url, name = _fresh_pg_database(postgres_server)
    settings = make_settings(
        tmp_path_factory.mktemp("pgstack"),
        database_url=url,
        worker_concurrency=2,
        chem_chunk_size=8,
    )
    try:
        with private_stack(settings, workers=1, beat=False) as running:
            yield running
    finally:
        _drop_pg_database(name)


def test_screening_on_postgres_with_concurrent_workers(
    pg_stack: EmbeddedStack, nci_smiles: list[tuple[str, str]], tmp_path: Path
) -> None:
    settings = pg_stack.settings
    mols = unique_valid(nci_smiles, 60, skip=2000)
    lines = [f"{s}\t{n}" for s, n, _ in mols] + ["C1CC(\tbroken", f"{mols[5][0]}\tdup"]
    res = submit_library(write_smi(tmp_path / "pg.smi", lines), settings, publish)
    assert len(res.chunk_ids) == 60 // 8 + 1
    job = wait_for_job(settings, res.job_id, timeout=180)
    assert job.state == JobState.DONE.value, job.error
    assert job.summary["rejected"] == 1 and job.summary["duplicates"] == 1
    assert all(c.state == "done" for c in chunk_jobs(settings, res.job_id))
    preds = predictions_for(settings, res.job_id)
    assert len(preds) == 60 == len({p.compound_id for p in preds})
    with session_scope(settings.database_url) as s:
        assert s.scalar(select(func.count()).select_from(Prediction)) == 60
        report = verify_chain(s)
        assert report.ok, report
        assert report.events >= 1 + 4 * len(res.chunk_ids)
