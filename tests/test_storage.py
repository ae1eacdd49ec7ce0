"""core/storage.py against a local directory and against a real S3 service (SeaweedFS on
loopback): the same keys, the same answers; an unreachable store raises the error jobs wait on."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from core.errors import StorageError, StorageUnavailableError
from core.settings import Settings
from core.storage import LocalStorage, S3Storage, Storage, scratch, storage_for
from medbatch.stack.s3_server import S3Server


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.server)])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Storage:
    if request.param == "local":
        return LocalStorage(tmp_path / "objects")
    server: S3Server = request.getfixturevalue("s3_server")
    return S3Storage(
        server.url(f"t-{tmp_path.name}"), endpoint_url=server.endpoint_url, timeout_s=5
    )


def test_objects_round_trip(storage: Storage, tmp_path: Path) -> None:
    storage.put("dicom/1.2/3.4/5.6.dcm", b"instance")
    source = tmp_path / "extract.csv"
    source.write_bytes(b"a,b\n" * 1000)
    storage.put_file("uploads/abc/extract.csv", source)
    assert storage.get("dicom/1.2/3.4/5.6.dcm") == b"instance"
    assert storage.exists("uploads/abc/extract.csv")
    assert not storage.exists("uploads/abc/other.csv")
    assert storage.keys("dicom") == ["dicom/1.2/3.4/5.6.dcm"]
    with pytest.raises(StorageError) as missing:
        storage.get("dicom/none.dcm")
    assert not isinstance(missing.value, StorageUnavailableError)

    work = tmp_path / "scratch"
    work.mkdir()
    (fetched,) = storage.fetch_many(["uploads/abc/extract.csv"], work)
    assert fetched.read_bytes() == source.read_bytes()
    assert storage.is_local == (fetched == storage.local_path("uploads/abc/extract.csv"))

    folder = tmp_path / "export"
    (folder / "sub").mkdir(parents=True)
    (folder / "Patient.ndjson").write_bytes(b"p")
    (folder / "sub" / "Observation.ndjson").write_bytes(b"o")
    storage.put_tree("uploads/def/export", folder)
    tree = storage.fetch_tree("uploads/def/export", work)
    assert (tree / "sub" / "Observation.ndjson").read_bytes() == b"o"
    assert (tree / "Patient.ndjson").read_bytes() == b"p"

    storage.delete("uploads/abc/extract.csv")
    assert not storage.exists("uploads/abc/extract.csv")
    storage.delete_prefix("dicom")
    assert storage.keys("dicom") == []


def test_keys_cannot_leave_the_storage_root(storage: Storage) -> None:
    for bad in ("../etc/passwd", "/abs", "a//b", "a/./b", ""):
        with pytest.raises(StorageError):
            storage.put(bad, b"x")


@pytest.mark.server
def test_a_stopped_store_is_unavailable_not_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = S3Server(tmp_path / "seaweedfs")
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)
    with server:
        store = S3Storage(server.url("x"), endpoint_url=server.endpoint_url, timeout_s=3)
        store.put("a/b", b"1")
    with pytest.raises(StorageUnavailableError, match="MEDBATCH_S3_ENDPOINT_URL"):
        store.get("a/b")


def test_settings_choose_the_storage(tmp_path: Path) -> None:
    s = Settings(storage_dir=tmp_path)  # type: ignore[call-arg]
    local = storage_for(s)
    assert isinstance(local, LocalStorage) and local.root == tmp_path.resolve()
    assert s.dicom_storage_dir == tmp_path / "dicom"
    elsewhere = Settings(storage_dir=tmp_path, storage_url=str(tmp_path / "o"))  # type: ignore[call-arg]
    assert storage_for(elsewhere).local_path("k") == (tmp_path / "o" / "k").resolve()
    assert elsewhere.dicom_storage_dir == tmp_path / "o" / "dicom"
    for bad in ("gs://bucket/x", "s3://"):
        with pytest.raises(ValidationError, match="MEDBATCH_STORAGE_URL"):
            Settings(storage_dir=tmp_path, storage_url=bad)  # type: ignore[call-arg]
    with scratch(s) as tmp:
        (tmp / "f").write_bytes(b"x")
    assert not tmp.exists()


def test_scratch_left_by_a_killed_task_is_swept(tmp_path: Path) -> None:
    """A task killed with SIGKILL cannot remove its scratch folder: the next task on the host
    does; live processes' folders and other hosts' are kept."""
    s = Settings(storage_dir=tmp_path)  # type: ignore[call-arg]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    base = tmp_path / "scratch"
    left = base / f"{host}-{dead.pid}-abc"
    alive = base / f"{host}-{os.getppid()}-def"
    other_host = base / f"not-{host}-{dead.pid}-ghi"
    for folder in (left, alive, other_host):
        folder.mkdir(parents=True)
        (folder / "bucket.arrow").write_bytes(b"x" * 10)
    with scratch(s) as tmp:
        assert tmp.name.startswith(f"{host}-{os.getpid()}-")
        assert not left.exists()
        assert alive.exists() and other_host.exists()
    assert not tmp.exists()
