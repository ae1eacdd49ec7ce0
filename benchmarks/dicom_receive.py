"""Workload 2, DICOM receive: 300 CT instances of 512×512 pushed into medbatch's listener (durable:
written through a temporary file, fsync'd and registered in the database before Success)
against DCMTK's ``storescp --max-pdu 131072`` writing the same instances to the same disk.

    python -m benchmarks.dicom_receive            # 3 alternating repetitions
    python -m benchmarks.dicom_receive --quick    # a smoke run (60 instances, 1 repetition)

Senders: pynetdicom (this process) and DCMTK ``storescu``, over one association and over four
concurrent associations (a quarter of the instances each). Every repetition sends fresh copies
with new UIDs, so medbatch's de-duplication by SOP Instance UID never short-cuts a store. The
clock runs from the first association request until the last sender has its last response:
instances per second, medians, and medbatch's rate over storescp's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import median, write_record

REPO = Path(__file__).resolve().parents[1]
BASE_DIR = REPO / ".bench" / "ct-512"
SERIES = 5


def dcmtk(tool: str) -> str:
    found = shutil.which(tool)
    if not found:
        raise SystemExit(f"DCMTK's {tool} is not installed (Debian package dcmtk)")
    return found


def make_base(n: int) -> list[Path]:
    """``n`` synthetic chest-CT slices of 512×512 (``SERIES`` series), generated once."""
    from medbatch.synth.lung_ct import synth_volume, write_series

    existing = sorted(BASE_DIR.rglob("*.dcm"))
    if len(existing) >= n:
        return existing[:n]
    shutil.rmtree(BASE_DIR, ignore_errors=True)
    per = -(-n // SERIES)
    for s in range(SERIES):
        ct = synth_volume(700 + s, per, rows=512, cols=512)
        write_series(ct, BASE_DIR / f"series{s}", patient_id=f"BENCH-{s}", patient_name="Bench^CT")
    return sorted(BASE_DIR.rglob("*.dcm"))[:n]


def fresh_copies(base: list[Path], out: Path) -> list[Path]:
    """The instances again with new study/series/instance UIDs (same pixels, same size)."""
    import pydicom
    from pydicom.uid import generate_uid

    out.mkdir(parents=True)
    studies: dict[str, str] = {}
    series: dict[str, str] = {}
    paths = []
    for i, path in enumerate(base):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = studies.setdefault(ds.StudyInstanceUID, generate_uid())
        ds.SeriesInstanceUID = series.setdefault(ds.SeriesInstanceUID, generate_uid())
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        target = out / f"{i:04d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        paths.append(target)
    return paths


def _split(paths: list[Path], parts: int) -> list[list[Path]]:
    return [paths[i::parts] for i in range(parts)]


def send_pynetdicom(port: int, called: str, paths: list[Path], associations: int) -> float:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    errors: list[str] = []

    def one(part: list[Path]) -> None:
        ae = AE(ae_title="BENCH")
        ae.add_requested_context(CTImageStorage)
        ae.maximum_pdu_size = 131072
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        if not assoc.is_established:
            errors.append("association rejected")
            return
        for path in part:
            status = assoc.send_c_store(path)
            if not status or status.Status != 0:
                errors.append(f"status {getattr(status, 'Status', None)}")
        assoc.release()

    threads = [threading.Thread(target=one, args=(p,)) for p in _split(paths, associations)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"pynetdicom sender: {errors[:3]}")
    return seconds


def send_storescu(port: int, called: str, paths: list[Path], associations: int) -> float:
    cmds = [
        [
            dcmtk("storescu"),
            "-aet",
            "STORESCU",
            "-aec",
            called,
            "--max-pdu",
            "131072",
            "127.0.0.1",
            str(port),
            *map(str, part),
        ]
        for part in _split(paths, associations)
    ]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for c in cmds]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    seconds = time.perf_counter() - t0
    for p, out in zip(procs, outputs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {out.decode(errors='replace')[-500:]}")
    return seconds


class StoreSCP:
    """DCMTK's storescp writing to ``out`` (one association at a time, as it runs by default).

    ``nodelay``: this Debian build leaves Nagle's algorithm on unless ``TCP_NODELAY=1`` is in
    the environment, and then each small C-STORE response waits for the peer's delayed ACK
    (measured: ~20 instances/s either sender, 114–165 with ``TCP_NODELAY=1``). Both are
    measured; the tuned one is the fair peer."""

    def __init__(self, port: int, out: Path, *, nodelay: bool) -> None:
        out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TCP_NODELAY": "1" if nodelay else "0"}
        self.proc = subprocess.Popen(
            [
                dcmtk("storescp"),
                "--max-pdu",
                "131072",
                "-aet",
                "STORESCP",
                "-od",
                str(out),
                str(port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        from medbatch.stack.process import port_open

        deadline = time.monotonic() + 30
        while not port_open("127.0.0.1", port):
            if time.monotonic() > deadline:
                raise RuntimeError("storescp did not start listening")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=300)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run for CI")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from core.settings import Settings
    from medbatch.stack.embedded import EmbeddedStack
    from medbatch.stack.process import free_port

    console = Console()
    n = 60 if args.quick else args.instances
    reps = 1 if args.quick else args.reps
    base = make_base(n)
    size_mb = sum(p.stat().st_size for p in base) / 1e6
    console.print(f"{n} CT instances of 512×512, {size_mb:.0f} MB")
    senders = {"pynetdicom": send_pynetdicom, "storescu": send_storescu}
    cases = [(s, a) for s in senders for a in (1, 4)]
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(dir=REPO / ".bench") as tmp:
        work = Path(tmp)
        settings = Settings(
            storage_dir=work / "medbatch",
            database_url=f"sqlite:///{work}/medbatch.db",
            broker_url=f"redis://127.0.0.1:{free_port()}/0",
            dicom_port=free_port(),
            dicom_allowed_aes="BENCH, STORESCU",
            dicom_quiet_period_s=3600,  # no study closes (and no scoring runs) while measuring
            dicom_max_pdu=131072,
        )
        scp_port = free_port()
        with EmbeddedStack(
            settings, workers=0, beat=False, start_triton=False, listener=True, report=console.log
        ):
            for rep in range(reps):
                copies = fresh_copies(base, work / f"in-{rep}")
                for sender, assocs in cases:
                    # alternating receivers, same instances
                    key = f"{sender}/{assocs}"
                    secs = senders[sender](
                        settings.dicom_port, settings.dicom_ae_title, copies, assocs
                    )
                    times.setdefault(f"medbatch/{key}", []).append(secs)
                    for peer, nodelay in (("storescp", False), ("storescp_nodelay", True)):
                        out = work / f"scp-{rep}-{sender}-{assocs}-{peer}"
                        scp = StoreSCP(scp_port, out, nodelay=nodelay)
                        try:
                            secs = senders[sender](scp_port, "STORESCP", copies, assocs)
                        finally:
                            scp.stop()
                        times.setdefault(f"{peer}/{key}", []).append(secs)
                        shutil.rmtree(out)
                    # the next case sends the same instances: new UIDs so nothing is a duplicate
                    shutil.rmtree(copies[0].parent)
                    copies = fresh_copies(base, work / f"in-{rep}-{sender}-{assocs}")
            stored = len(list((settings.storage_dir / "dicom").rglob("*.dcm")))

    rows = []
    for sender, assocs in cases:
        key = f"{sender}/{assocs}"
        m, s = median(times[f"medbatch/{key}"]), median(times[f"storescp/{key}"])
        t = median(times[f"storescp_nodelay/{key}"])
        rows.append(
            {
                "sender": sender,
                "associations": assocs,
                "medbatch_instances_per_s": n / m,
                "storescp_instances_per_s": n / s,
                "storescp_nodelay_instances_per_s": n / t,
                "ratio": s / m,
                "ratio_vs_nodelay": t / m,
                "medbatch_seconds": times[f"medbatch/{key}"],
                "storescp_seconds": times[f"storescp/{key}"],
                "storescp_nodelay_seconds": times[f"storescp_nodelay/{key}"],
            }
        )
    table = Table(title=f"DICOM receive: {n} CT instances 512×512, medians of {reps}")
    for col in (
        "sender",
        "assocs",
        "medbatch inst/s",
        "storescp inst/s",
        "ratio",
        "storescp TCP_NODELAY=1",
        "ratio",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["sender"],
            str(r["associations"]),
            f"{r['medbatch_instances_per_s']:.0f}",
            f"{r['storescp_instances_per_s']:.0f}",
            f"{r['ratio']:.2f}×",
            f"{r['storescp_nodelay_instances_per_s']:.0f}",
            f"{r['ratio_vs_nodelay']:.2f}×",
        )
    console.print(table)
    path = write_record(
        "dicom_receive",
        {
            "instances": n,
            "megabytes": round(size_mb, 1),
            "reps": reps,
            "stored_by_medbatch": stored,
            "cases": rows,
            "load_average": os.getloadavg(),
            "targets": {"ratio": ">= 1.0, more with concurrent associations"},
        },
        args.out_dir,
    )
    console.print(f"record: {path}")


if __name__ == "__main__":
    main()
