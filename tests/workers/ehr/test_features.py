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
