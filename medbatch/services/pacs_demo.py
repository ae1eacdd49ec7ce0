"""``medbatch demo-pacs``: the PACS-push path end to end on the embedded stack.

A demo PACS (a pynetdicom storage SCP in this process) receives our results; two synthetic chest
CT studies (one with nodule-like lesions, one without, from :mod:`medbatch.synth.lung_ct`) are
pushed to the listener over a real association; after the quiet period each is scored once,
and its Structured Report and key-slice image arrive at the demo PACS. The key images are also
written as PNG files to look at.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE, AllStoragePresentationContexts, StoragePresentationContexts, evt

from core.errors import MedbatchError
from core.settings import Settings
from db.models import JobState
from medbatch.services.studies import study_job_outcome
from medbatch.stack.process import free_port

DEMO_SCU = "MEDBATCH_DEMO"
DEMO_PACS = "DEMO_PACS"
#: (seed, lesions, label shown) of the two demo studies.
STUDIES = ((11, 2, "with lesions"), (12, 0, "without lesion"))


@dataclass
class DemoStudy:
    label: str
    study_uid: str
    paths: list[Path]
    state: str = ""
    probability: float | None = None
    key_png: Path | None = None
    received: int = 0


def demo_settings(settings: Settings) -> Settings:
    """The user's settings with a demo PACS destination and a short quiet period."""
    allowed = ", ".join(a for a in (settings.dicom_allowed_aes, DEMO_SCU) if a)
    return settings.model_copy(
        update={
            "dicom_allowed_aes": allowed,
            "dicom_destination": f"{DEMO_PACS}@127.0.0.1:{free_port()}",
            "dicom_quiet_period_s": min(settings.dicom_quiet_period_s, 5.0),
        }
    )


def start_demo_pacs(settings: Settings, inbox: Path) -> Any:
    """A storage SCP standing in for the hospital PACS; files land in ``inbox``."""
    inbox.mkdir(parents=True, exist_ok=True)

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        ds.save_as(inbox / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        return 0x0000

    ae = AE(ae_title=DEMO_PACS)
    ae.supported_contexts = AllStoragePresentationContexts
    port = int(settings.dicom_destination.rsplit(":", 1)[1])
    return ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )


def make_studies(outbox: Path) -> list[DemoStudy]:
    from medbatch.synth.lung_ct import synth_volume, write_series

    studies = []
    for i, (seed, lesions, label) in enumerate(STUDIES):
        ct = synth_volume(seed, 80, nodules=lesions)
        paths = write_series(
            ct,
            outbox / f"study{i + 1}",
            patient_id=f"DEMO{i + 1:04d}",
            patient_name=f"Demo^{i + 1}",
        )
        uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        studies.append(DemoStudy(label, uid, paths))
    return studies


def push(settings: Settings, paths: list[Path]) -> None:
    ae = AE(ae_title=DEMO_SCU)
    ae.requested_contexts = StoragePresentationContexts[:120]
    assoc = ae.associate("127.0.0.1", settings.dicom_port, ae_title=settings.dicom_ae_title)
    if not assoc.is_established:
        raise MedbatchError("the listener refused the demo association")
    try:
        for p in paths:
            status = assoc.send_c_store(p)
            if not status or status.Status != 0x0000:
                raise MedbatchError(f"the listener refused {p.name}: {status}")
    finally:
        assoc.release()


def _poll(settings: Settings, study: DemoStudy) -> bool:
    outcome = study_job_outcome(settings, study.study_uid)
    if outcome is None:
        return False
    study.state, study.probability = outcome
    return True


def write_key_png(sc_path: Path, png: Path) -> Path:
    """The key-slice secondary capture as a PNG (what a radiologist would see in the viewer)."""
    from matplotlib.figure import Figure

    image = pydicom.dcmread(sc_path).pixel_array
    fig = Figure(figsize=(5, 5), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(image)
    ax.set_axis_off()
    fig.savefig(png)
    return png


def run(
    settings: Settings, work: Path, report: Callable[[str], None], timeout_s: float = 600
) -> list[DemoStudy]:
    """Push the demo studies into a running stack (listener included) and wait for results."""
    studies = make_studies(work / "outbox")
    report(f"generated {len(studies)} synthetic chest CT studies ({work / 'outbox'})")
    for study in studies:
        push(settings, study.paths)
        report(f"pushed {len(study.paths)} instances ({study.label}) over one association")
    deadline = time.monotonic() + timeout_s
    while not all(_poll(settings, s) for s in studies):
        if time.monotonic() > deadline:
            raise MedbatchError("the demo studies were not scored in time; see var/ logs")
        time.sleep(0.5)
    inbox = work / "pacs"
    while time.monotonic() < deadline:
        received = [pydicom.dcmread(p, stop_before_pixels=True) for p in inbox.glob("*.dcm")]
        for study in studies:
            study.received = sum(1 for d in received if d.StudyInstanceUID == study.study_uid)
        if all(s.received >= 2 or s.state != JobState.DONE.value for s in studies):
            break
        time.sleep(0.5)
    for i, study in enumerate(studies):
        for p in inbox.glob("*.dcm"):
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            if ds.StudyInstanceUID == study.study_uid and ds.Modality != "SR":
                study.key_png = write_key_png(p, work / f"study{i + 1}-key-slice.png")
    return studies
