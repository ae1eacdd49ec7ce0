"""Results sent by STOW-RS to a DICOMweb destination: a real Orthanc with its DICOMweb plugin
(Debian's orthanc and orthanc-dicomweb) behind basic authentication receives the SR and the key
image medbatch produced; wrong credentials are a refusal, a stopped server is waited for."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest

from core.errors import DicomDestinationUnavailableError, DicomSendError
from medbatch.stack.process import free_port, port_open
from tests.helpers import wait_until
from workers.dicom.outputs import LungCtResult, build_key_slice_image, build_structured_report
from workers.dicom.sendback import WebDestination, send_dicomweb

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@dataclass
class Orthanc:
    url: str
    proc: subprocess.Popen[bytes]


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    binary = shutil.which("Orthanc")
    assert binary and PLUGIN.is_file(), (
        "Orthanc and its DICOMweb plugin are needed: apt-get install orthanc orthanc-dicomweb "
        "(scripts/install.sh does)"
    )
    http_port = free_port()
    config = {
        "Name": "medbatch-test",
        "StorageDirectory": str(tmp_path / "storage"),
        "IndexDirectory": str(tmp_path / "index"),
        "Plugins": [str(PLUGIN)],
        "DicomServerEnabled": False,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {"medbatch": "s3cret"},
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (tmp_path / "orthanc.json").write_text(json.dumps(config))
    with (tmp_path / "orthanc.log").open("wb") as log:
        proc = subprocess.Popen(
            [binary, str(tmp_path / "orthanc.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(lambda: port_open("127.0.0.1", http_port), 60, "Orthanc to listen")
        yield Orthanc(f"http://127.0.0.1:{http_port}", proc)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _results(tmp_path: Path) -> list[Path]:
    """The SR and key image medbatch makes for a small CT series."""
    from tests.dicom_data import series_datasets

    slices = series_datasets(4)
    result = LungCtResult(0.8, (0.1, 0.9, 0.2, 0.3), "lung-test", "1", 1)
    objects = [
        build_structured_report(slices, result, series_number=9901),
        build_key_slice_image(
            slices, slices[1].pixel_array.astype("float32"), result, series_number=9902
        ),
    ]
    paths = []
    for i, ds in enumerate(objects):
        path = tmp_path / f"out{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_results_reach_a_dicomweb_destination(orthanc: Orthanc, tmp_path: Path) -> None:
    paths = _results(tmp_path)
    root = f"{orthanc.url}/dicom-web"
    send_dicomweb(WebDestination(root, user="medbatch", password="s3cret"), paths)
    sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    listed = httpx.get(
        f"{orthanc.url}/instances", auth=("medbatch", "s3cret"), params={"expand": 1}
    )
    held = {i["MainDicomTags"]["SOPInstanceUID"] for i in listed.json()}
    assert sent <= held

    with pytest.raises(DicomSendError, match="HTTP 401"):
        send_dicomweb(WebDestination(root, user="medbatch", password="wrong"), paths)
    orthanc.proc.terminate()
    orthanc.proc.wait(timeout=30)
    with pytest.raises(DicomDestinationUnavailableError, match="unreachable"):
        send_dicomweb(WebDestination(root, user="medbatch", password="s3cret"), paths)
