"""Settings come from MEDBATCH_* variables, with working single-machine defaults."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from core.settings import Settings


def test_defaults_are_a_single_machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for var in [v for v in os.environ if v.startswith("MEDBATCH_")]:
        monkeypatch.delenv(var)
    s = Settings()
    assert s.database_url == f"sqlite:///{(tmp_path / 'var' / 'medbatch.db').resolve()}"
    assert s.broker_url.startswith("redis://127.0.0.1:")
    assert s.triton_host == "127.0.0.1"
    assert (s.queue_chem, s.queue_dicom, s.queue_ehr) == ("chem", "dicom", "ehr")
    assert s.visibility_timeout_s > s.task_time_limit_s


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDBATCH_DATABASE_URL", "postgresql+psycopg://u@db/medbatch")
    monkeypatch.setenv("MEDBATCH_CHEM_CHUNK_SIZE", "256")
    monkeypatch.setenv("MEDBATCH_QUEUE_CHEM", "chem-prio")
    s = Settings()
    assert s.database_url == "postgresql+psycopg://u@db/medbatch"
    assert s.chem_chunk_size == 256 and s.queue_chem == "chem-prio"


def test_chunk_size_cannot_exceed_the_models_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDBATCH_CHEM_CHUNK_SIZE", "5000")
    with pytest.raises(ValidationError, match="chem_chunk_size"):
        Settings()


def test_backoff_budget() -> None:
    s = Settings(triton_retry_base_s=5, triton_retry_max_s=300, triton_max_retries=12)
    assert s.longest_backoff_total_s == 5 + 10 + 20 + 40 + 80 + 160 + 300 * 6
