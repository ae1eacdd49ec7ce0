"""Visit sequences and latest profiles, by hand and on generated extracts read by the reader."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from ingest.ehr.reader import VARIABLE_CODES, read_long
from ingest.ehr.schema import model_schema
from medbatch.synth.ehr import write_long_csv
from workers.ehr.features import (
    PatientMeasurements,
    latest_profile,
    stack_sequences,
    visit_sequence,
)

DIABETES = model_schema("diabetes_lstm_attention")
CVD = model_schema("cvd_autoencoder")


def _patient(rows: list[tuple[str, str, float]]) -> PatientMeasurements:
    return PatientMeasurements(
        timestamp=np.array([np.datetime64(t, "us") for t, _, _ in rows]),
        variable=np.array([VARIABLE_CODES[v] for _, v, _ in rows], dtype=np.int8),
        value=np.array([x for _, _, x in rows]),
    )


def test_visits_by_day_with_gaps_and_age_carried_forward() -> None:
    p = _patient(
        [
            ("2021-07-01T09:00", "hba1c", 8.1),
            ("2020-01-01T08:00", "age", 60.0),
            ("2020-01-01T08:05", "hba1c", 7.0),
            ("2020-01-01T10:00", "hba1c", 7.2),  # same day, later: wins
            ("2020-07-01T09:00", "sbp", 140.0),
            ("2020-07-01T09:00", "glucose", 9.0),
        ]
    )
    seq = visit_sequence(p, DIABETES)
    j = DIABETES.variables.index
    assert seq.length == 3
    assert seq.values[0, j("hba1c")] == pytest.approx(7.2)
    assert seq.observed[1, j("hba1c")] == 0 and seq.observed[1, j("sbp")] == 1
    assert seq.dt_years[0] == 0 and seq.dt_years[1] == pytest.approx(182 / 365.25)
    assert seq.values[2, j("age")] == pytest.approx(60 + 547 / 365.25, abs=1e-4)
    assert seq.values[3:].sum() == 0 and seq.observed[3:].sum() == 0  # padding


def test_only_the_most_recent_visits_are_kept() -> None:
    days = np.arange(np.datetime64("2015-01-01"), np.datetime64("2015-01-31"))
    p = _patient([(str(d), "hba1c", 6.0 + i / 10) for i, d in enumerate(days)])
    seq = visit_sequence(p, DIABETES)
    assert seq.length == 20 and seq.visit_days[0] == days[10]
    assert seq.values[19, DIABETES.variables.index("hba1c")] == pytest.approx(8.9)


def test_latest_profile_takes_the_newest_value_and_ages_the_patient() -> None:
    p = _patient(
        [
            ("2020-01-01", "age", 50.0),
            ("2020-01-01", "sbp", 150.0),
            ("2022-01-01", "sbp", 130.0),
            ("2020-01-01", "smoker", 1.0),
        ]
    )
    values, observed = latest_profile(p, CVD)
    j = CVD.variables.index
    assert values[j("sbp")] == 130.0 and values[j("smoker")] == 1.0
    assert values[j("age")] == pytest.approx(52.0, abs=0.01)
    assert observed[j("hdl")] == 0 and values[j("hdl")] == 0


def test_generated_patients_have_their_visits(tmp_path: Path) -> None:
    path = tmp_path / "clean.csv"
    write_long_csv(path, 60, seed=3, messiness=0.0)
    by_patient: dict[str, list[tuple[np.datetime64, int, float]]] = defaultdict(list)
    for block in read_long(path):
        for pid, t, v, x in zip(
            block.patient_id.to_pylist(), block.timestamp, block.variable, block.value, strict=True
        ):
            by_patient[pid].append((t, int(v), float(x)))
    truth = {
        r["patient_id"]: int(r["n_visits"])
        for r in csv.DictReader(path.with_name(path.name + ".truth.csv").open())
    }
    assert by_patient.keys() == truth.keys()
    seqs = []
    for pid, rows in by_patient.items():
        p = PatientMeasurements(
            np.array([r[0] for r in rows]),
            np.array([r[1] for r in rows], dtype=np.int8),
            np.array([r[2] for r in rows]),
        )
        seq = visit_sequence(p, DIABETES)
        assert seq.length == min(truth[pid], 20), pid
        assert (seq.dt_years[: seq.length] >= 0).all()
        assert seq.observed[: seq.length, DIABETES.variables.index("age")].all()
        seqs.append(seq)
    batch = stack_sequences(seqs)
    assert batch["VALUES"].shape == (60, 20, len(DIABETES.variables))
    assert batch["LENGTH"].dtype == np.int32 and batch["VALUES"].dtype == np.float32


# --- the whole-group versions agree exactly with the per-patient reference --------------------
def _group_from_extract(tmp_path, writer, n, seed):  # type: ignore[no-untyped-def]
    from ingest.ehr.reader import read_extract

    path = tmp_path / f"group-{seed}.csv"
    writer(path, n, seed)
    rows: dict[str, list[tuple[object, int, float]]] = {}
    for block in read_extract(path):
        for pid, t, v, x in zip(
            block.patient_id.to_pylist(), block.timestamp, block.variable, block.value, strict=True
        ):
            rows.setdefault(pid, []).append((t, v, x))
    out = []
    for items in rows.values():
        out.append(
            PatientMeasurements(
                np.array([t for t, _, _ in items], dtype="datetime64[us]"),
                np.array([v for _, v, _ in items], dtype=np.int8),
                np.array([x for _, _, x in items]),
            )
        )
    return out


def _shuffled_with_ties(p: PatientMeasurements, rng: np.random.Generator) -> PatientMeasurements:
    """Rows in a random order, plus a same-time duplicate of some rows with another value."""
    order = rng.permutation(len(p.value))
    dup = order[: max(1, len(order) // 7)]
    return PatientMeasurements(
        np.concatenate([p.timestamp[order], p.timestamp[dup]]),
        np.concatenate([p.variable[order], p.variable[dup]]),
        np.concatenate([p.value[order], p.value[dup] * 1.01]),
    )


@pytest.mark.parametrize("fmt", ["long", "wide"])
def test_group_features_equal_the_per_patient_reference(tmp_path, fmt: str) -> None:  # type: ignore[no-untyped-def]
    from medbatch.synth.ehr import write_long_csv, write_wide_csv
    from workers.ehr.features import latest_profiles, visit_sequences

    writer = write_long_csv if fmt == "long" else write_wide_csv
    group = _group_from_extract(tmp_path, writer, 400, seed=17)
    rng = np.random.default_rng(3)
    group += [_shuffled_with_ties(p, rng) for p in group[:100]]
    # long follow-up: two patients' histories end to end (more visits than the model's window)
    ten_years = np.timedelta64(3653, "D")
    group += [
        PatientMeasurements(
            np.concatenate([a.timestamp, b.timestamp + ten_years]),
            np.concatenate([a.variable, b.variable]),
            np.concatenate([a.value, b.value]),
        )
        for a, b in zip(group[:40], group[40:80], strict=True)
    ]
    assert max(len(np.unique(p.timestamp.astype("datetime64[D]"))) for p in group) > 20
    for name in ("diabetes_lstm_attention",):
        schema = model_schema(name)
        fast = visit_sequences(group, schema)
        for p, f in zip(group, fast, strict=True):
            ref = visit_sequence(p, schema)
            assert f.length == ref.length
            np.testing.assert_array_equal(f.values, ref.values)
            np.testing.assert_array_equal(f.observed, ref.observed)
            np.testing.assert_array_equal(f.dt_years, ref.dt_years)
            np.testing.assert_array_equal(f.visit_days, ref.visit_days)
    for name in ("cvd_autoencoder", "diabetes_lstm_attention"):
        schema = model_schema(name)
        values, observed = latest_profiles(group, schema)
        for i, p in enumerate(group):
            ref_v, ref_o = latest_profile(p, schema)
            np.testing.assert_array_equal(values[i], ref_v)
            np.testing.assert_array_equal(observed[i], ref_o)
