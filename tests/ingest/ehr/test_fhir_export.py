"""Finding the files of a $export: a folder, a .zip, a .tar(.gz), gzipped members, with or without
its manifest; one identity for the same export however it arrives; entries that would leave the
export refuse it; something that is no export says why."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import orjson
import pytest

from core.errors import InputError
from ingest.ehr.fhir_export import export_sha256, fingerprint, open_export
from ingest.ehr.fhir_reader import read_fhir
from ingest.ehr.reader import detect_format
from medbatch.synth.ehr_fhir import write_fhir_export


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exp") / "export"
    write_fhir_export(out, 40, seed=5, messiness=0.05, observations_per_file=600, compress=True)
    return out


def _zip(src: Path, dest: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(src.iterdir()):
            zf.write(p, prefix + p.name)
    return dest


def _outcome(path: Path) -> tuple[int, list[tuple[int, str, str]]]:
    """Measurements, and each rejection's line, file (without the archive's folder) and reason."""
    blocks = list(read_fhir(path, block_size=1 << 14))
    rejected = []
    for r in (r for b in blocks for r in b.rejections):
        file, rest = r.reason.split(", line ", 1)
        rejected.append((r.line, file.rsplit("/", 1)[-1], rest))
    return sum(len(b) for b in blocks), rejected


def test_folder_zip_and_tar_are_the_same_export(export: Path, tmp_path: Path) -> None:
    folder = open_export(export)
    assert folder.container == "directory" and folder.manifest == "manifest.json"
    assert folder.files[0].resource_type == "Patient"  # read first
    assert all(f.name.endswith(".ndjson.gz") for f in folder.files)
    zipped = _zip(export, tmp_path / "export.zip", prefix="bulk-2026-11-30/")
    tarred = tmp_path / "export.tar.gz"
    with tarfile.open(tarred, "w:gz") as tf:
        tf.add(export, arcname="export")
    expected = _outcome(export)
    assert expected[0] > 0 and expected[1]
    identity = export_sha256(folder)
    for path, kind in ((zipped, "zip"), (tarred, "tar")):
        assert detect_format(path) == "fhir"
        opened = open_export(path)
        assert opened.container == kind
        assert export_sha256(opened) == identity
        assert _outcome(path) == expected, kind
    renamed = tmp_path / "renamed"
    shutil.copytree(export, renamed)
    manifest = orjson.loads((renamed / "manifest.json").read_bytes())
    manifest["transactionTime"] = "2030-01-01T00:00:00Z"  # another run of the same export
    (renamed / "manifest.json").write_bytes(orjson.dumps(manifest))
    assert export_sha256(open_export(renamed)) == identity
    (renamed / "Patient.ndjson.gz").write_bytes(b"")  # different content: another export
    assert export_sha256(open_export(renamed)) != identity


def test_without_a_manifest_types_come_from_the_content(export: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(export, bare)
    (bare / "manifest.json").unlink()
    (bare / "Observation-0001.ndjson.gz").rename(bare / "Obs-a.ndjson.gz")  # name: no type
    (bare / "Condition.ndjson").write_bytes(b'{"resourceType": "Condition", "id": "c1"}\n')
    (bare / "notes.txt").write_text("not part of the export")
    found = open_export(bare)
    assert found.manifest is None
    assert {f.name: f.resource_type for f in found.files}["Obs-a.ndjson.gz"] == "Observation"
    assert dict(found.ignored) == {"Condition": 1}
    assert _outcome(bare)[0] == _outcome(export)[0]
    single = bare / "Patient.ndjson.gz"
    assert detect_format(bare / "Obs-a.ndjson.gz") == "fhir"  # one NDJSON file is an export
    with pytest.raises(InputError, match="needs Observation resources"):
        detect_format(single)


def test_a_manifest_with_server_urls(export: Path, tmp_path: Path) -> None:
    copy = tmp_path / "urls"
    shutil.copytree(export, copy)
    manifest = orjson.loads((copy / "manifest.json").read_bytes())
    for item in manifest["output"]:
        item["url"] = f"https://ehr.example.org/bulk/files/{item['url']}?token=1"
    (copy / "manifest.json").write_bytes(orjson.dumps(manifest))
    assert [f.name for f in open_export(copy).files] == [f.name for f in open_export(export).files]
    manifest["output"].append({"type": "Observation", "url": "missing.ndjson"})
    (copy / "manifest.json").write_bytes(orjson.dumps(manifest))
    with pytest.raises(InputError, match=r"missing\.ndjson.*not in the export"):
        open_export(copy)


def test_entries_that_leave_the_export_refuse_it(export: Path, tmp_path: Path) -> None:
    evil_zip = _zip(export, tmp_path / "evil.zip")
    with zipfile.ZipFile(evil_zip, "a") as zf:
        zf.writestr("../../etc/cron.d/x.ndjson", b'{"resourceType": "Observation"}\n')
    with pytest.raises(InputError, match="points outside the export"):
        open_export(evil_zip)
    evil_tar = tmp_path / "evil.tar"
    with tarfile.open(evil_tar, "w") as tf:
        data = b'{"resourceType": "Observation"}\n'
        member = tarfile.TarInfo("/abs/x.ndjson")
        member.size = len(data)
        tf.addfile(member, io.BytesIO(data))
    with pytest.raises(InputError, match="points outside the export"):
        open_export(evil_tar)
    dotdot = tmp_path / "dotdot"
    shutil.copytree(export, dotdot)
    manifest = orjson.loads((dotdot / "manifest.json").read_bytes())
    manifest["output"][0]["url"] = "../outside.ndjson"
    (tmp_path / "outside.ndjson").write_bytes(b"")
    (dotdot / "manifest.json").write_bytes(orjson.dumps(manifest))
    with pytest.raises(InputError, match="points outside the export"):
        open_export(dotdot)
    linked = tmp_path / "linked"
    shutil.copytree(export, linked)
    (tmp_path / "secret.ndjson").write_bytes(b'{"resourceType": "Observation"}\n')
    os.symlink(tmp_path / "secret.ndjson", linked / "extra.ndjson")
    (linked / "manifest.json").unlink()
    with pytest.raises(InputError, match="link to outside"):
        open_export(linked)


def test_a_folder_that_is_no_export_says_why(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.csv").write_text("x,y\n1,2\n")
    with pytest.raises(InputError, match="Observation"):
        detect_format(folder)
    with pytest.raises(InputError, match=r"not a readable \.zip"):
        broken = tmp_path / "broken.zip"
        broken.write_bytes(b"PK\x03\x04" + b"\0" * 40)
        open_export(broken)


def test_a_folder_changes_when_any_file_in_it_does(export: Path, tmp_path: Path) -> None:
    copy = tmp_path / "fp"
    shutil.copytree(export, copy)
    before = fingerprint(copy)
    (copy / "late.ndjson").write_bytes(b"{}\n")
    after = fingerprint(copy)
    assert after[0] == before[0] + 3 and after[1] >= before[1]
