"""EHR input as a FHIR Bulk Data $export beside the same cohort as a long CSV: Observations/s next
to CSV rows/s, for the ingest alone (in this process) and end to end to stored scores (a worker).

    python -m benchmarks.ehr_fhir                 # ~25,000 patients: ~1 M Observations
    python -m benchmarks.ehr_fhir --quick         # a smoke run (2,500 patients, 1 rep)

Both inputs come from the same generator seed (``messiness=0.002``): the CSV has one row per
measurement (~44 per patient), the export one line per Observation (~40 per patient, blood
pressure as a two-component panel, plus vital signs no model uses and corrections) and one per
Patient. Ingest alone: ``read_extract`` over each, alternating. End to end: ``submit_extract``
→ Redis → a Celery worker (ingest, spill, one scoring job per bucket) → Triton → SQLite, from
submission to the extract's ``done``, alternating, with the workers' peak memory.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import alternate, median, timed, write_record
from benchmarks.ehr import medbatch_run

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / ".bench"


def make_inputs(patients: int) -> tuple[Path, Path, dict[str, int]]:
    """The CSV and the export of the same cohort (kept across runs) and their sizes."""
    from medbatch.synth.ehr import write_long_csv
    from medbatch.synth.ehr_fhir import write_fhir_export

    csv_path = BENCH / f"ehr-fhir-{patients}.csv"
    export = BENCH / f"ehr-fhir-{patients}"
    if not csv_path.is_file():
        BENCH.mkdir(exist_ok=True)
        write_long_csv(csv_path, patients, seed=2026, messiness=0.002)
    if not (export / "manifest.json").is_file():
        write_fhir_export(export, patients, seed=2026, messiness=0.002)
    with csv_path.open("rb") as fh:
        rows = sum(1 for _ in fh) - 1
    files = [p for p in export.iterdir() if p.suffix == ".ndjson"]
    observations = sum(
        sum(1 for _ in p.open("rb")) for p in files if p.name.startswith("Observation")
    )
    return (
        csv_path,
        export,
        {
            "csv_rows": rows,
            "csv_bytes": csv_path.stat().st_size,
            "observations": observations,
            "export_bytes": sum(p.stat().st_size for p in files),
        },
    )


def _ingest(path: Path, block_size: int) -> None:
    from ingest.ehr.reader import read_extract

    for _ in read_extract(path, block_size=block_size):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--patients", type=int, default=25_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run for CI")
    parser.add_argument("--no-end-to-end", action="store_true", help="the ingest only")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from core.settings import Settings

    console = Console()
    patients = 2_500 if args.quick else args.patients
    reps = 1 if args.quick else args.reps
    csv_path, export, sizes = make_inputs(patients)
    console.print(
        f"{patients:,} patients: CSV {sizes['csv_rows']:,} rows ({sizes['csv_bytes'] / 1e6:.0f} "
        f"MB), $export {sizes['observations']:,} Observations "
        f"({sizes['export_bytes'] / 1e6:.0f} MB)"
    )
    block = Settings().ehr_block_bytes  # type: ignore[call-arg]
    _ingest(csv_path, block)  # warm: imports, page cache
    _ingest(export, block)
    ingest = alternate(
        {
            "csv": lambda: timed(lambda: _ingest(csv_path, block)),
            "fhir": lambda: timed(lambda: _ingest(export, block)),
        },
        reps,
    )
    record: dict[str, Any] = {
        "patients": patients,
        **sizes,
        "reps": reps,
        "ingest_seconds": ingest,
        "ingest_csv_rows_per_s": sizes["csv_rows"] / median(ingest["csv"]),
        "ingest_fhir_observations_per_s": sizes["observations"] / median(ingest["fhir"]),
        "ingest_csv_mb_per_s": sizes["csv_bytes"] / 1e6 / median(ingest["csv"]),
        "ingest_fhir_mb_per_s": sizes["export_bytes"] / 1e6 / median(ingest["fhir"]),
        "load_average_after_ingest": os.getloadavg(),
    }
    if not args.no_end_to_end:
        record["end_to_end"] = _end_to_end(console, csv_path, export, reps)
        e2e = record["end_to_end"]
        record["e2e_csv_rows_per_s"] = sizes["csv_rows"] / e2e["csv"]["median_seconds"]
        record["e2e_fhir_observations_per_s"] = (
            sizes["observations"] / e2e["fhir"]["median_seconds"]
        )

    table = Table(title=f"EHR input, CSV vs FHIR $export ({patients:,} patients), medians")
    for col in (
        "stage",
        "CSV rows/s",
        "FHIR Observations/s",
        "FHIR / CSV",
        "CSV MB/s",
        "FHIR MB/s",
    ):
        table.add_column(col, justify="right")
    csv_rate, fhir_rate = record["ingest_csv_rows_per_s"], record["ingest_fhir_observations_per_s"]
    table.add_row(
        "ingest",
        f"{csv_rate:,.0f}",
        f"{fhir_rate:,.0f}",
        f"{fhir_rate / csv_rate:.2f}×",
        f"{record['ingest_csv_mb_per_s']:.0f}",
        f"{record['ingest_fhir_mb_per_s']:.0f}",
    )
    if "end_to_end" in record:
        a, b = record["e2e_csv_rows_per_s"], record["e2e_fhir_observations_per_s"]
        table.add_row("end to end", f"{a:,.0f}", f"{b:,.0f}", f"{b / a:.2f}×", "", "")
    console.print(table)
    if "end_to_end" in record:
        for side in ("csv", "fhir"):
            e = record["end_to_end"][side]
            console.print(
                f"{side}: ingest {e['ingest_seconds']:.1f} s, scoring wall "
                f"{e['scoring_wall_seconds']:.1f} s, {e['batches']} batches, peak RSS "
                f"{e['peak_rss_mb']:.0f} MB"
            )
    path = write_record("ehr_fhir", record, args.out_dir)
    console.print(f"record: {path}")


def _end_to_end(console: Any, csv_path: Path, export: Path, reps: int) -> dict[str, Any]:
    from core.settings import Settings
    from db.migrate import upgrade
    from medbatch.stack.embedded import EmbeddedStack
    from medbatch.stack.process import free_port
    from medbatch.stack.worker_process import use_settings

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            storage_dir=Path(tmp),
            database_url=f"sqlite:///{tmp}/medbatch.db",
            broker_url=f"redis://127.0.0.1:{free_port()}/0",
            triton_http_port=free_port(),
            triton_grpc_port=free_port(),
            triton_metrics_port=free_port(),
            worker_concurrency=1,
        )
        use_settings(settings)
        upgrade(settings.database_url)
        runs: dict[str, list[dict[str, Any]]] = {"csv": [], "fhir": []}
        with EmbeddedStack(settings, workers=1, beat=False, report=console.log):
            medbatch_run(settings, csv_path)  # warm: models loaded, imports done
            for _ in range(reps):
                runs["csv"].append(medbatch_run(settings, csv_path))
                runs["fhir"].append(medbatch_run(settings, export))
    return {
        side: {
            "runs": r,
            "median_seconds": median([x["seconds"] for x in r]),
            "ingest_seconds": median([x["ingest_seconds"] for x in r]),
            "scoring_wall_seconds": median([x["scoring_wall_seconds"] for x in r]),
            "batches": r[0]["batches"],
            "patients": r[0]["patients"],
            "peak_rss_mb": max(max(x["ingest_peak_rss_mb"], x["batch_peak_rss_mb"]) for x in r),
        }
        for side, r in runs.items()
    }


if __name__ == "__main__":
    main()
