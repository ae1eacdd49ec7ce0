"""Real DICOM test data: pydicom's own CT test file turned into multi-slice series with new UIDs,
and DICOM peers (pynetdicom as SCU, DCMTK's command-line tools)."""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, StoragePresentationContexts

from core.settings import Settings

CT_SMALL = Path(str(get_testdata_file("CT_small.dcm")))
MR_SMALL = Path(str(get_testdata_file("MR_small.dcm")))


def dcmtk(tool: str) -> str:
    """Path of a DCMTK tool; the tests need the real peer (Debian package dcmtk)."""
    from medbatch.stack.process import native_tool

    path = native_tool(tool)
    assert path, f"DCMTK's {tool} is not installed: apt-get install dcmtk (.ci/run does)"
    return path


def series_datasets(
    n: int,
    *,
    source: Path = CT_SMALL,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str = "TEST-PATIENT-0001",
    transfer_syntax: str | None = None,
    shuffle: bool = True,
    first_z: float = -100.0,
    step_mm: float = 2.5,
) -> list[pydicom.Dataset]:
    """``n`` slices of ``source`` with new UIDs, in spatial order along z (with ``shuffle``,
    instance numbers run in reverse spatial order, as some modalities send them)."""
    template = pydicom.dcmread(source)
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    out = []
    for i in range(n):
        ds = copy.deepcopy(template)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID = patient_id
        ds.InstanceNumber = n - i if shuffle else i + 1
        if "ImagePositionPatient" in ds:
            x, y, _ = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y, first_z + step_mm * i]
            ds.SliceLocation = first_z + step_mm * i
        if transfer_syntax is not None and UID(transfer_syntax).is_compressed:
            ds.compress(transfer_syntax)  # pydicom's RLE or the pylibjpeg/pyjpegls encoders
        else:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.append(ds)
    return out


def make_series(out_dir: Path, n: int, **kw: Any) -> list[Path]:
    """:func:`series_datasets` written as files ``slice0000.dcm`` … in spatial order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(series_datasets(n, **kw)):
        path = out_dir / f"slice{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def truncate(src: Path, dst: Path, keep: float = 0.6) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def associate(settings: Settings, calling_ae: str = "MEDBATCH_TEST"):  # type: ignore[no-untyped-def]
    """A pynetdicom association to the listener proposing every storage context."""
    ae = AE(ae_title=calling_ae)
    ae.requested_contexts = StoragePresentationContexts[:120]
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae.associate("127.0.0.1", settings.dicom_port, ae_title=settings.dicom_ae_title)


def storescu(
    settings: Settings, paths: list[Path], *, aet: str = "STORESCU", options: tuple[str, ...] = ()
) -> None:
    """Send files with DCMTK's storescu (raises with its output if it fails); ``options`` such
    as ``-xv`` (propose JPEG 2000 lossless) let compressed files travel compressed."""
    cmd = [
        dcmtk("storescu"),
        *options,
        "-aet",
        aet,
        "-aec",
        settings.dicom_ae_title,
        "127.0.0.1",
        str(settings.dicom_port),
        *map(str, paths),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


@contextmanager
def pacs_receiver(settings: Settings, out_dir: Path) -> Iterator[Path]:
    """DCMTK's storescp as the PACS that results are sent back to (``dicom_destination``),
    writing into ``out_dir``; stopped on exit."""
    from medbatch.stack.process import port_open
    from tests.helpers import wait_until
    from workers.dicom.sendback import Destination

    dest = Destination.parse(settings.dicom_destination)
    proc = subprocess.Popen(
        [dcmtk("storescp"), "--aetitle", dest.ae_title, "-od", str(out_dir), str(dest.port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: port_open("127.0.0.1", dest.port), 30, "storescp to listen")
        yield out_dir
    finally:
        proc.terminate()
        proc.wait(timeout=10)
