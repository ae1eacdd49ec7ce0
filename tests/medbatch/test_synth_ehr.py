"""The synthetic EHR generator: determinism, the broken-row bookkeeping against the schema's own
row checks, the ground-truth sidecar and mechanism, and bounded memory on a 1M-row extract."""

from __future__ import annotations

import csv
import itertools
import json
import math
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ingest.ehr.schema import (
    LONG_COLUMNS,
    VARIABLES,
    RowRejected,
    check_long_row,
    check_wide_row,
    parse_wide_header,
)
from medbatch.synth.command import synth_ehr_command
from medbatch.synth.ehr import (
    BROKEN_KINDS_LONG,
    BROKEN_KINDS_WIDE,
    TRUTH_COLUMNS,
    WIDE_UNITS,
    SynthStats,
    cvd_probability,
    diabetes_complication_probability,
    synth_patients,
    write_long_csv,
    write_wide_csv,
)

REPO = Path(__file__).resolve().parents[2]


def _read_defects(stats: SynthStats) -> dict[int, str]:
    with stats.defects_path.open(newline="") as f:
        return {int(r["line"]): r["kind"] for r in csv.DictReader(f)}


def _read_truth(stats: SynthStats) -> list[dict[str, str]]:
    with stats.truth_path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    for writer in (write_long_csv, write_wide_csv):
        a = writer(tmp_path / "a.csv", 150, 5, messiness=0.05)
        b = writer(tmp_path / "b.csv", 150, 5, messiness=0.05)
        c = writer(tmp_path / "c.csv", 150, 6, messiness=0.05)
        assert a.path.read_bytes() == b.path.read_bytes()
        assert a.truth_path.read_bytes() == b.truth_path.read_bytes()
        assert a.defects_path.read_bytes() == b.defects_path.read_bytes()
        assert a.path.read_bytes() != c.path.read_bytes()
        assert (a.rows, a.broken) == (b.rows, b.broken)


def test_patients_are_deterministic_and_prefix_stable() -> None:
    a = synth_patients(40, 3)
    assert a == synth_patients(40, 3)
    assert a[:10] == synth_patients(10, 3)
    assert a != synth_patients(40, 4)
    ids = [p.patient_id for p in a]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"MRN\d{8}", i) for i in ids)


def test_visits_are_irregular_and_realistic() -> None:
    patients = synth_patients(400, 11)
    n_visits = [len(p.visits) for p in patients]
    assert min(n_visits) >= 1 and max(n_visits) <= 20
    assert len(set(n_visits)) > 8
    gaps = []
    for p in patients:
        whens = [v.when for v in p.visits]
        assert whens == sorted(whens)
        gaps += [(b - a).days for a, b in itertools.pairwise(whens)]
        for v in p.visits:
            assert "age" in v.measured
            for name, value in v.values.items():
                var = VARIABLES[name]
                assert var.low <= value <= var.high, (name, value)
        assert {"sex", "smoker"} <= set(p.visits[0].measured)
    assert min(gaps) >= 13 and max(gaps) > 365 and np.std(gaps) > 30
    # glucose tracks HbA1c; SBP rises with BMI
    rows = [v.values for p in patients for v in p.visits]
    h, g = np.array([r["hba1c"] for r in rows]), np.array([r["glucose"] for r in rows])
    assert np.corrcoef(h, g)[0, 1] > 0.8
    b, s = np.array([r["bmi"] for r in rows]), np.array([r["sbp"] for r in rows])
    assert np.corrcoef(b, s)[0, 1] > 0.1


def test_long_rows_match_stats_and_schema(tmp_path: Path) -> None:
    stats = write_long_csv(tmp_path / "long.csv", 300, 2, messiness=0.1)
    defects = _read_defects(stats)
    assert stats.rows == stats.valid_rows + stats.broken_rows
    assert Counter(defects.values()) == {k: n for k, n in stats.broken.items() if n}
    assert set(stats.broken) == set(BROKEN_KINDS_LONG)
    assert all(n > 0 for n in stats.broken.values())
    units: Counter[tuple[str, str]] = Counter()
    with stats.path.open(newline="") as f:
        reader = csv.reader(f)
        assert tuple(next(reader)) == LONG_COLUMNS  # no truth in the extract
        n = 0
        for line, fields in enumerate(reader, start=2):
            n += 1
            try:
                check_long_row(fields)
            except RowRejected as exc:
                assert defects.get(line) == exc.kind, (line, fields, exc)
            else:
                assert line not in defects, (line, fields)
                units[fields[2], fields[4]] += 1
    assert n == stats.rows
    # unit mix: valid rows in non-canonical units that had to be converted
    assert stats.converted_rows > 0
    assert units["hba1c", "mmol/mol"] > 0
    assert units["glucose", "mg/dL"] > 0


def test_wide_rows_match_stats_and_schema(tmp_path: Path) -> None:
    stats = write_wide_csv(tmp_path / "wide.csv", 300, 2, messiness=0.1)
    defects = _read_defects(stats)
    assert stats.rows == stats.visits == stats.valid_rows + stats.broken_rows
    assert set(stats.broken) == set(BROKEN_KINDS_WIDE)
    assert Counter(defects.values()) == {k: n for k, n in stats.broken.items() if n}
    measurements = 0
    with stats.path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        assert header[:2] == ["patient_id", "timestamp"]
        assert "hba1c (%)" in header and "glucose (mg/dL)" in header and "smoker" in header
        columns = [parse_wide_header(h) for h in header[2:]]
        assert dict(columns) == dict(WIDE_UNITS)
        for line, fields in enumerate(reader, start=2):
            try:
                measurements += len(check_wide_row(fields, columns))
            except RowRejected as exc:
                assert defects.get(line) == exc.kind, (line, fields, exc)
            else:
                assert line not in defects
    assert measurements == stats.measurements


def test_clean_extract_has_no_broken_rows(tmp_path: Path) -> None:
    stats = write_long_csv(tmp_path / "clean.csv", 50, 1, messiness=0.0, unit_mix=0.0)
    assert stats.broken_rows == 0 and stats.converted_rows == 0
    assert (
        stats.valid_rows
        == stats.rows
        == sum(len(v.measured) for p in synth_patients(50, 1) for v in p.visits)
    )


def test_truth_sidecar_matches_patients(tmp_path: Path) -> None:
    stats = write_long_csv(tmp_path / "x.csv", 120, 9)
    assert stats.truth_path == tmp_path / "x.csv.truth.csv"
    truth = _read_truth(stats)
    patients = synth_patients(120, 9)
    assert list(truth[0]) == list(TRUTH_COLUMNS)
    assert [r["patient_id"] for r in truth] == [p.patient_id for p in patients]
    for row, p in zip(truth, patients, strict=True):
        assert int(row["n_visits"]) == len(p.visits)
        assert int(row["diabetes_complication_label"]) == p.truth.diabetes_complication_label
        assert int(row["cvd_label"]) == p.truth.cvd_label
        assert float(row["cvd_prob"]) == pytest.approx(p.truth.cvd_prob, abs=1e-6)
    assert stats.diabetes_positives == sum(p.truth.diabetes_complication_label for p in patients)
    with stats.path.open(newline="") as f:
        ids = {r[0] for r in csv.reader(f) if r and r[0].strip()} - {"patient_id"}
    assert ids <= {p.patient_id for p in patients}
    # the wide extract describes the same patients
    wide = write_wide_csv(tmp_path / "y.csv", 120, 9)
    assert wide.truth_path.read_bytes() == stats.truth_path.read_bytes()


def test_ground_truth_mechanism() -> None:
    patients = synth_patients(3000, 21)
    dm = np.array([p.truth.diabetes_complication_label for p in patients])
    cvd = np.array([p.truth.cvd_label for p in patients])
    assert 0.15 <= dm.mean() <= 0.50
    assert 0.10 <= cvd.mean() <= 0.50
    hba1c = np.array([p.truth.features["hba1c_mean"] for p in patients])
    assert hba1c[dm == 1].mean() > hba1c[dm == 0].mean() + 0.5
    diabetic = np.array([p.diabetic for p in patients])
    assert dm[diabetic == 1].mean() > 2 * dm[diabetic == 0].mean()
    smoker = np.array([p.smoker for p in patients])
    assert cvd[smoker == 1].mean() > cvd[smoker == 0].mean()
    for p in patients[:200]:
        f = p.truth.features
        assert p.truth.diabetes_complication_prob == diabetes_complication_probability(f)
        assert p.truth.cvd_prob == cvd_probability(f)
    # labels are Bernoulli(p): calibrated in aggregate
    probs = np.array([p.truth.diabetes_complication_prob for p in patients])
    assert abs(probs.mean() - dm.mean()) < 0.03
    assert math.isclose(np.mean([p.truth.cvd_prob for p in patients]), cvd.mean(), abs_tol=0.03)


def test_synth_ehr_command(tmp_path: Path) -> None:
    stats = synth_ehr_command(tmp_path / "out" / "e.csv", 20, 1, "wide", 0.0)
    assert stats.fmt == "wide" and stats.path.exists() and stats.patients == 20
    assert synth_ehr_command(tmp_path / "l.csv", 20, 1, "long", 0.02).fmt == "long"
    fhir = synth_ehr_command(tmp_path / "export", 20, 1, "fhir", 0.02)
    assert fhir.fmt == "fhir" and (fhir.path / "manifest.json").is_file()
    with pytest.raises(ValueError, match="long, wide or fhir"):
        synth_ehr_command(tmp_path / "z.csv", 20, 1, "parquet", 0.0)
    with pytest.raises(ValueError, match="messiness"):
        synth_ehr_command(tmp_path / "z.csv", 20, 1, "long", 1.5)


def test_the_fhir_export_is_the_same_cohort_byte_for_byte(tmp_path: Path) -> None:
    from medbatch.synth.ehr_fhir import write_fhir_export

    a = write_fhir_export(tmp_path / "a", 60, 5, messiness=0.05, compress=True)
    b = write_fhir_export(tmp_path / "b", 60, 5, messiness=0.05, compress=True)
    long = write_long_csv(tmp_path / "l.csv", 60, 5)
    for name in (*a.files, "manifest.json"):
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes(), name
    assert a.truth_path.read_bytes() == long.truth_path.read_bytes()  # same patients, same truth
    assert a.rows == 60 + a.observations and a.broken_rows > 0
    assert (
        a.valid_rows + a.broken_rows + sum(a.skipped.values()) + sum(a.unknown_codes.values())
        == a.observations
    )
    assert set(a.broken) == {
        "missing_id",
        "invalid_json",
        "missing_value",
        "unparseable_time",
        "impossible_value",
        "unknown_unit",
    }


_BIG = """
import json, resource, sys, time
from pathlib import Path
from medbatch.synth.ehr import write_long_csv
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
stats = write_long_csv(Path(sys.argv[1]), 23_500, 1)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rows": stats.rows, "seconds": seconds, "delta_mb": (peak - base) / 1024,
                  "base_mb": base / 1024, "peak_mb": peak / 1024}))
"""


@pytest.mark.slow
def test_million_row_extract_bounded_memory(tmp_path: Path) -> None:
    """ru_maxrss (KiB on Linux) after the imports vs after writing: the writer streams."""
    out = subprocess.run(
        [sys.executable, "-c", _BIG, str(tmp_path / "big.csv")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rows"] >= 1_000_000
    assert result["delta_mb"] < 300
    assert result["seconds"] < 120  # ~10 s here; generous for a loaded CI machine
