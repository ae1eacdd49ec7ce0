"""From a bucket to model inputs and stored rows (the Triton call itself is tested end to end)."""

from __future__ import annotations

import numpy as np
import pytest

from core.served_models import CVD_AUTOENCODER, DIABETES_LSTM_ATTENTION
from ingest.ehr.reader import read_extract
from ingest.ehr.spill import BucketSpill, read_bucket
from medbatch.synth.ehr import write_long_csv
from workers.ehr.scoring import build_inputs, patients, score_rows

DIABETES, CVD = DIABETES_LSTM_ATTENTION.name, CVD_AUTOENCODER.name


@pytest.fixture(scope="module")
def bucket(tmp_path_factory: pytest.TempPathFactory) -> list:
    tmp = tmp_path_factory.mktemp("scoring")
    extract = tmp / "extract.csv"
    write_long_csv(extract, 60, seed=11)
    spill = BucketSpill(tmp / "spool", 1)
    for block in read_extract(extract):
        spill.add(block)
    (only,) = spill.close()
    return list(patients(read_bucket(only.path)))


def test_patients_are_whole_and_distinct(bucket: list) -> None:
    ids = [p.patient_id for p in bucket]
    assert len(ids) == len(set(ids)) == 60
    for p in bucket:
        assert (np.diff(p.measurements.timestamp.astype(np.int64)) >= 0).all()
        assert p.rows == len(p.measurements.variable) > 0


def test_inputs_have_the_model_shapes(bucket: list) -> None:
    d = build_inputs(DIABETES, bucket)
    assert d.inputs["VALUES"].shape == (60, 20, 10)
    assert d.inputs["LENGTH"].shape == (60, 1) and d.inputs["LENGTH"].dtype == np.int32
    assert (d.inputs["LENGTH"] >= 1).all() and (d.inputs["LENGTH"] <= 20).all()
    c = build_inputs(CVD, bucket)
    assert c.inputs["VALUES"].shape == (60, 10) and c.inputs["VALUES"].dtype == np.float32


def test_rows_carry_risk_and_explanation(bucket: list) -> None:
    group = bucket[:4]
    d = build_inputs(DIABETES, group)
    lengths = d.inputs["LENGTH"][:, 0]
    attention = np.zeros((4, 20), np.float32)
    for i, n in enumerate(lengths):
        attention[i, :n] = np.arange(1, n + 1) / (n * (n + 1) / 2)  # last visit weighs most
    contribution = np.tile(np.linspace(-0.5, 0.4, 10, dtype=np.float32), (4, 1))
    out = {
        "RISK": np.array([[0.1], [0.2], [0.3], [0.9]], np.float32),
        "ATTENTION": attention,
        "CONTRIBUTION": contribution,
    }
    rows = score_rows(d, out, "1")
    assert [r["risk"] for r in rows] == pytest.approx([0.1, 0.2, 0.3, 0.9])
    for row, n, p in zip(rows, lengths, group, strict=True):
        ex = row["explanation"]
        assert len(ex["attention"]) == row["visits"] == n
        assert sum(w for _, w in ex["attention"]) == pytest.approx(1.0, abs=1e-4)
        assert ex["top_visits"][0]["day"] == ex["attention"][-1][0]
        # only variables that raise the risk are "top"; the largest first
        assert [v["variable"] for v in ex["top_variables"]] == ["egfr", "triglycerides", "hdl"]
        assert row["patient_id"] == p.patient_id and row["measurements"] == p.rows

    c = build_inputs(CVD, group)
    out = {
        "RISK": np.full((4, 1), 0.5, np.float32),
        "RECON_ERROR": np.array([[0.1], [5.0], [0.2], [0.3]], np.float32),
        "OOD": np.array([[False], [True], [False], [False]]),
        "CONTRIBUTION": contribution,
    }
    rows = score_rows(c, out, "1")
    assert [r["out_of_distribution"] for r in rows] == [False, True, False, False]
    assert rows[1]["reconstruction_error"] == pytest.approx(5.0)
    assert "attention" not in rows[0]["explanation"]


def test_a_patient_without_any_input_of_a_model_is_not_scored_with_a_reason() -> None:
    from ingest.ehr.reader import VARIABLE_CODES
    from workers.ehr.features import PatientMeasurements
    from workers.ehr.scoring import Patient, not_scored_rows

    only_flags = Patient(
        "P-FLAGS",
        PatientMeasurements(
            np.array(["2024-01-02T09:00"], dtype="datetime64[us]"),
            np.array([VARIABLE_CODES["smoker"]], dtype=np.int8),
            np.array([1.0]),
        ),
    )
    d = build_inputs(DIABETES, [only_flags])
    assert d.patients == [] and d.inputs == {}
    ((patient, reason),) = d.skipped
    assert patient is only_flags and "hba1c" in reason
    c = build_inputs(CVD, [only_flags])  # smoker is a CVD input: scored
    assert c.patients == [only_flags] and not c.skipped
    (row,) = not_scored_rows(DIABETES, "1", d.skipped)
    assert row["risk"] is None and row["not_scored"] == reason and row["visits"] == 1


def test_subset_keeps_inputs_and_explanations_aligned(bucket: list) -> None:
    d = build_inputs(DIABETES, bucket[:6])
    part = d.subset(range(2, 5))
    assert [p.patient_id for p in part.patients] == [p.patient_id for p in bucket[2:5]]
    assert (part.inputs["VALUES"] == d.inputs["VALUES"][2:5]).all()
    assert part.sequences == d.sequences[2:5]


def test_visit_counts_of_a_group_are_each_patients_distinct_days(bucket: list) -> None:
    from workers.ehr.features import PatientMeasurements
    from workers.ehr.scoring import Patient, _visit_counts

    # and days before 1970, same-day repeats, a patient of one row
    old = np.array(
        ["1950-03-01T08:00", "1950-03-01T17:00", "1969-12-31T23:59", "1970-01-01T00:00"],
        dtype="datetime64[us]",
    )
    extra = [
        Patient("OLD", PatientMeasurements(old, np.zeros(4, np.int8), np.ones(4))),
        Patient("ONE", PatientMeasurements(old[:1], np.zeros(1, np.int8), np.ones(1))),
    ]
    group = bucket + extra
    want = [int(np.unique(p.measurements.timestamp.astype("datetime64[D]")).size) for p in group]
    assert _visit_counts(group) == want
    assert want[-2:] == [3, 1] and len(set(want)) > 3
