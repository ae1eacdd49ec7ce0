"""Registering extracts (``medbatch ehr`` and the drop folder) on SQLite and PostgreSQL: once per
content, whatever the name; a non-extract leaves a rejected job saying why; a file still being
copied, a sidecar or a temporary file is not taken."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from core.errors import ExtractRejectedError
from core.job_kinds import JobKind
from core.settings import Settings
from db.models import EhrDropFile, Job, JobState
from db.session import session_scope
from ingest.ehr.dropfolder import scan_drop_folder
from ingest.ehr.submit import submit_extract
from medbatch.synth.ehr import write_long_csv, write_wide_csv
from medbatch.synth.ehr_fhir import write_fhir_export


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    drop = tmp_path / "drop"
    drop.mkdir()
    return Settings(
        storage_dir=tmp_path / "var",
        database_url=db_url,
        ehr_drop_dir=drop,
        ehr_drop_settle_s=5,
    )  # type: ignore[call-arg]


def _jobs(settings: Settings, kind: JobKind) -> list[Job]:
    with session_scope(settings.database_url) as session:
        return list(session.scalars(select(Job).where(Job.kind == kind.value).order_by(Job.id)))


def test_same_content_is_registered_once(settings: Settings, tmp_path: Path) -> None:
    published: list[tuple[int, str]] = []
    first = tmp_path / "extract-monday.csv"
    write_long_csv(first, 20, seed=3)
    again = tmp_path / "extract-copy.csv"
    shutil.copy(first, again)

    a = submit_extract(first, settings, lambda i, k: published.append((i, k)))
    b = submit_extract(again, settings, lambda i, k: published.append((i, k)))
    assert not a.existing and b.existing and b.job_id == a.job_id
    assert published == [(a.ingest_id, JobKind.EHR_INGEST.value)]
    (extract,) = _jobs(settings, JobKind.EHR_EXTRACT)
    assert extract.state == JobState.QUEUED.value
    assert extract.params["format"] == "long"
    assert set(extract.params["models"]) == {"diabetes_lstm_attention", "cvd_autoencoder"}

    forced = submit_extract(again, settings, lambda i, k: published.append((i, k)), force=True)
    assert not forced.existing and forced.job_id != a.job_id


def test_not_an_extract_is_a_rejected_job(settings: Settings, tmp_path: Path) -> None:
    bogus = tmp_path / "notes.csv"
    bogus.write_text("name,comment\nx,y\n")
    with pytest.raises(ExtractRejectedError, match="not an EHR extract") as info:
        submit_extract(bogus, settings, lambda i, k: None)
    with session_scope(settings.database_url) as session:
        job = session.get_one(Job, info.value.job_id)
        assert job.state == JobState.REJECTED.value
        assert "header must be" in (job.error or "")


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_drop_folder_takes_each_settled_file_once(settings: Settings) -> None:
    drop = settings.ehr_drop_dir
    assert drop is not None
    published: list[int] = []
    publisher = lambda i, k: published.append(i)  # noqa: E731

    write_long_csv(drop / "night1.csv", 15, seed=1)  # also writes .truth.csv / .defects.csv
    write_wide_csv(drop / "night1-wide.csv", 15, seed=2)
    (drop / "partial.csv.part").write_text("patient_id,timestamp\n")
    for p in drop.iterdir():
        _age(p, 60)
    write_long_csv(drop / "copying.csv", 5, seed=9)  # modified just now: still being written

    outcomes = scan_drop_folder(settings, publisher)
    assert sorted((o.file, o.outcome) for o in outcomes) == [
        ("night1-wide.csv", "submitted"),
        ("night1.csv", "submitted"),
    ]
    assert len(published) == 2

    # the same night's file dropped again under another name: recorded, not scored again
    shutil.copy(drop / "night1.csv", drop / "night1-resent.csv")
    _age(drop / "night1-resent.csv", 60)
    _age(drop / "copying.csv", 60)
    outcomes = scan_drop_folder(settings, publisher)
    assert sorted((o.file, o.outcome) for o in outcomes) == [
        ("copying.csv", "submitted"),
        ("night1-resent.csv", "duplicate"),
    ]
    assert len(published) == 3
    assert scan_drop_folder(settings, publisher) == []  # nothing new: nothing hashed again
    with session_scope(settings.database_url) as session:
        rows = session.scalars(select(EhrDropFile)).all()
        assert len(rows) == 4
        resent = next(r for r in rows if r.path.endswith("night1-resent.csv"))
        first = next(r for r in rows if r.path.endswith("night1.csv"))
        assert resent.job_id == first.job_id and resent.sha256 == first.sha256
    assert len(_jobs(settings, JobKind.EHR_EXTRACT)) == 3


def test_a_file_changed_in_place_is_taken_again(settings: Settings) -> None:
    drop = settings.ehr_drop_dir
    assert drop is not None
    target = drop / "rolling.csv"
    write_long_csv(target, 10, seed=1)
    _age(target, 60)
    assert [o.outcome for o in scan_drop_folder(settings, lambda i, k: None)] == ["submitted"]
    write_long_csv(target, 12, seed=2)  # the warehouse replaced it with new content
    _age(target, 30)
    assert [o.outcome for o in scan_drop_folder(settings, lambda i, k: None)] == ["submitted"]
    with pytest.raises(Exception, match="does not exist"):
        scan_drop_folder(
            settings.model_copy(update={"ehr_drop_dir": drop / "missing"}), lambda i, k: None
        )


def _age_tree(path: Path, seconds: float) -> None:
    for p in [path, *path.rglob("*")]:
        _age(p, seconds)


def test_a_fhir_export_is_one_extract_as_a_folder_or_an_archive(
    settings: Settings, tmp_path: Path
) -> None:
    published: list[int] = []
    stats = write_fhir_export(tmp_path / "export", 12, seed=4)
    first = submit_extract(stats.path, settings, lambda i, k: published.append(i))
    assert not first.existing
    (extract,) = _jobs(settings, JobKind.EHR_EXTRACT)
    assert extract.params["format"] == "fhir"
    assert [f["type"] for f in extract.params["fhir"]["files"]] == ["Patient", "Observation"]
    assert extract.params["bucket_basis_bytes"] < extract.params["text_bytes"]
    archive = shutil.make_archive(str(tmp_path / "export-copy"), "zip", stats.path)
    again = submit_extract(Path(archive), settings, lambda i, k: published.append(i))
    assert again.existing and again.job_id == first.job_id and len(published) == 1


def test_drop_folder_takes_an_export_folder_once_it_has_settled(settings: Settings) -> None:
    drop = settings.ehr_drop_dir
    assert drop is not None
    published: list[int] = []
    publisher = lambda i, k: published.append(i)  # noqa: E731
    stats = write_fhir_export(drop / "bulk-2026-11-30", 10, seed=6)  # sidecars beside it
    (drop / "archive").mkdir()
    (drop / "archive" / "readme.txt").write_text("old extracts")
    _age_tree(drop, 60)
    (stats.path / "Observation-0001.ndjson").touch()  # the download is still going on
    assert [(o.file, o.outcome) for o in scan_drop_folder(settings, publisher)] == [
        ("archive", "rejected")
    ]
    _age_tree(stats.path, 60)
    (outcome,) = scan_drop_folder(settings, publisher)
    assert (outcome.file, outcome.outcome) == ("bulk-2026-11-30", "submitted")
    shutil.make_archive(str(drop / "bulk-resent"), "gztar", stats.path)
    _age(drop / "bulk-resent.tar.gz", 60)
    (resent,) = scan_drop_folder(settings, publisher)
    assert resent.outcome == "duplicate" and resent.job_id == outcome.job_id
    assert scan_drop_folder(settings, publisher) == [] and len(published) == 1
    with session_scope(settings.database_url) as session:
        rejected = session.get_one(Job, _jobs(settings, JobKind.EHR_EXTRACT)[0].id)
        assert rejected.state == JobState.REJECTED.value
        assert "FHIR" in (rejected.error or "")
