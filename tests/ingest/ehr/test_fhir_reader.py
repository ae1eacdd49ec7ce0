"""The FHIR block reader: decided on columns, it agrees line for line with the reference checks
(also on lines built to be awkward); every defect of the synthetic export is rejected at its line
with its kind; ages and sexes come from the Patient file wherever it is; and the same cohort read
from a long CSV and from a $export gives the models exactly the same inputs."""

from __future__ import annotations

import csv
import math
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient

from ingest.ehr import fhir_reader
from ingest.ehr.fhir_reader import PatientIndex, read_fhir
from ingest.ehr.fhir_resources import PatientRecord
from ingest.ehr.reader import VARIABLE_CODES, read_extract
from ingest.ehr.schema import model_schema
from medbatch.synth.ehr import synth_patients, write_long_csv
from medbatch.synth.ehr_fhir import FhirSynthStats, write_fhir_export
from workers.ehr.features import PatientMeasurements, latest_profiles, visit_sequences

NAMES = {code: name for name, code in VARIABLE_CODES.items()}
LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"


def _obs(pid: str, code: str = "4548-4", value: Any = 7.1, unit: str = "%", **kw: Any) -> dict:
    r: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{pid}"},
        "effectiveDateTime": "2020-06-01T10:00:00+02:00",
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
    }
    r.update(kw)
    return r


def _awkward(pid: str) -> bytes:
    """Lines a column-wise reader could get wrong; the reference says what each is."""
    j = orjson.dumps
    panel = _obs(pid, "85354-9", status="amended")
    del panel["valueQuantity"]
    panel["component"] = [
        None,
        {
            "code": {"coding": [None, {"system": LOINC, "code": "8480-6"}]},
            "valueQuantity": {"value": 141, "unit": "mm[Hg]"},
        },
        {
            "code": {"coding": [{"system": LOINC, "code": "8462-4"}]},
            "valueQuantity": {"value": 88, "unit": "mmHg"},
        },
        {"code": {"coding": [{"system": LOINC, "code": "8478-0"}]}, "valueQuantity": {"value": 99}},
    ]
    bad_panel = orjson.loads(j(panel))
    bad_panel["component"][2]["valueQuantity"]["value"] = 5
    lines = [
        j(_obs(pid)),
        b"",
        b"   \t",
        j(_obs(pid, "2339-0", 99, "mg/dL")) + b"\r",  # CRLF
        j(_obs(pid)) + b" " + j(_obs(pid)),  # two objects on a line
        b'{"resourceType": "Observation",',  # an object across lines
        b'"status": "final"}',
        j(_obs(pid, value=float("nan"))).replace(b"null", b"NaN"),
        j(_obs(pid, value=True)),
        j(_obs(pid, value="7.1")),
        j(_obs(pid, value=1)).replace(b'"value":1', b'"value":1e400'),
        j(_obs(pid, subject="Patient/x")),  # a string where an object belongs
        j(_obs(pid, subject={"reference": f"https://ehr.example/fhir/Patient/{pid}/_history/3"})),
        j(_obs(pid, subject={"reference": f"Patient/{pid}\n"})),
        j(_obs(pid, effectiveDateTime=None, effectivePeriod={"start": "2020-06-02T08:00:00Z"})),
        j(
            _obs(
                pid,
                effectiveDateTime=None,
                effectivePeriod={"end": "2020-06-02"},
                issued="2020-06-03T08:00:00.25-03:00",
            )
        ),
        j(_obs(pid, effectiveDateTime="2020-06-01T10:00:00+14:00")),
        j(_obs(pid, effectiveDateTime="2020-06-01T10:00:00+15:00")),
        j(_obs(pid, effectiveDateTime="2020-06-01")),
        j(_obs(pid, effectiveDateTime="2020-06-01T10:00")),
        j(_obs(pid, effectiveDateTime="0001-01-01T00:10:00+01:00")),
        j(_obs(pid, effectiveDateTime="2020-06-31T10:00:00Z")),
        j(_obs(pid, code="17856-6", value=6.4, unit="%", valueCodeableConcept={"coding": []})),
        j(_obs(pid, status="entered-in-error", subject=None)),
        j(_obs(pid, status="preliminary")),
        j(_obs(pid, code="8867-4", value=60, unit="/min")),
        j(
            {
                **_obs(pid),
                "code": {
                    "coding": [
                        None,
                        {"system": "urn:x", "code": "1"},
                        {"system": LOINC, "code": "9999-9"},
                    ]
                },
            }
        ),
        j({**_obs(pid), "code": {"text": "HbA1c, no coding"}}),
        j(
            {
                **_obs(pid),
                "code": {"coding": [{"system": "urn:oid:2.16.840.1.113883.6.1", "code": "4548-4"}]},
            }
        ),
        j(_obs(pid, valueQuantity={"value": 150, "comparator": "<", "unit": "mg/dL"})),
        j(
            _obs(
                pid,
                code="2345-7",
                valueQuantity={
                    "value": 150,
                    "unit": "mg/dL",
                    "system": "urn:other",
                    "code": "MGDL",
                },
            )
        ),
        j(_obs(pid, code="2345-7", valueQuantity={"value": 150, "code": "mg/dL"})),
        j(_obs(pid, code="2345-7", valueQuantity={"value": 150})),
        j(panel),
        j(bad_panel),
        j(
            {
                **_obs(pid, "72166-2"),
                "valueQuantity": None,
                "valueCodeableConcept": {
                    "coding": [
                        {"system": "http://snomed.info/sct", "code": "266927001"},
                        {"system": "http://snomed.info/sct", "code": "449868002"},
                    ]
                },
            }
        ),
        j(
            {
                **_obs(pid, "72166-2"),
                "valueQuantity": None,
                "valueCodeableConcept": {
                    "coding": [
                        {"system": "urn:x", "code": "y"},
                        {"system": "http://snomed.info/sct", "code": "8517006"},
                    ]
                },
            }
        ),
        j({"resourceType": "Patient", "id": pid}),
        j([1, 2]),
        j(_obs(pid, status=["final"])),
        j(_obs(pid, note=[{"text": "Zürich – 血糖 \u2028"}])),
        j(_obs(pid, value=7.1)),
    ]
    return b"\n".join(lines)  # no newline after the last line


@pytest.fixture(scope="module")
def messy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FhirSynthStats]:
    out = tmp_path_factory.mktemp("fhir") / "export"
    stats = write_fhir_export(out, 250, seed=7, messiness=0.06, observations_per_file=4000)
    return out, stats


@pytest.fixture(scope="module")
def awkward(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The messy export plus a file of awkward lines (no manifest: types from the content)."""
    out = tmp_path_factory.mktemp("fhir") / "awkward"
    write_fhir_export(out, 30, seed=8, messiness=0.1)
    (out / "manifest.json").unlink()
    pid = next(iter(p.patient_id for p in synth_patients(1, 8)))
    (out / "zz-odd.ndjson").write_bytes(_awkward(pid))
    return out


def _read(path: Path, **kw: Any) -> dict[str, Any]:
    accepted: dict[int, list[tuple[str, int, str, float]]] = {}
    rejected: dict[int, tuple[str, str]] = {}
    totals: dict[str, Counter[str]] = {
        "skipped": Counter(),
        "unknown": Counter(),
        "counts": Counter(),
    }
    for block in read_fhir(path, **kw):
        assert (np.diff(block.lines) >= 0).all()
        pids = block.patient_id.to_pylist()
        for i, line in enumerate(block.lines.tolist()):
            accepted.setdefault(line, []).append(
                (
                    pids[i],
                    int(block.timestamp[i].astype(np.int64)),
                    NAMES[int(block.variable[i])],
                    float(block.value[i]),
                )
            )
        for r in block.rejections:
            assert r.line not in rejected, r
            rejected[r.line] = (r.kind, r.reason)
        totals["skipped"].update(block.skipped)
        totals["unknown"].update(block.unknown_codes)
        totals["counts"].update(block.counts)
    return {"accepted": accepted, "rejected": rejected, **totals}


@pytest.mark.parametrize("block_size", [1 << 12, 1 << 16, 8 << 20])
def test_columns_agree_with_the_reference_checks(
    messy: tuple[Path, FhirSynthStats],
    awkward: Path,
    block_size: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    one_by_one = fhir_reader._observation_lines
    by_reference: list[int] = []

    def counted(*args: Any) -> None:
        by_reference.append(len(args[-1]))
        one_by_one(*args)

    for path in (messy[0], awkward):
        want = _read(path, vectorised=False)
        by_reference.clear()
        monkeypatch.setattr(fhir_reader, "_observation_lines", counted)
        got = _read(path, block_size=block_size)
        monkeypatch.setattr(fhir_reader, "_observation_lines", one_by_one)
        for key in want:
            assert got[key] == want[key], (path.name, key)
        # most lines were decided on columns, not one by one
        assert sum(by_reference) < 0.2 * got["counts"]["resources"], (path.name, by_reference)
    odd = _read(awkward)
    reasons = [reason for _, reason in odd["rejected"].values() if reason.startswith("zz-odd")]
    assert len(reasons) > 15  # the awkward lines were rejected, each with the file and line
    assert odd["skipped"]["blank line"] == 2
    assert odd["unknown"]["LOINC 9999-9"] == 1 and odd["unknown"]["(no code)"] == 1


def test_every_defect_is_rejected_at_its_line_with_its_kind(
    messy: tuple[Path, FhirSynthStats],
) -> None:
    path, stats = messy
    got = _read(path, block_size=1 << 16)
    with stats.defects_path.open() as fh:
        defects = {int(r["line"]): r for r in csv.DictReader(fh)}
    assert {line: kind for line, (kind, _) in got["rejected"].items()} == {
        line: r["kind"] for line, r in defects.items()
    }
    for line, (_, reason) in got["rejected"].items():
        d = defects[line]
        assert reason.startswith(f"{d['file']}, line {int(d['file_line']):,}: "), reason
    assert sum(len(v) for v in got["accepted"].values()) == stats.measurements
    assert dict(got["skipped"]) == stats.skipped
    assert dict(got["unknown"]) == stats.unknown_codes
    assert got["counts"]["observations_accepted"] == stats.valid_rows
    assert got["counts"]["patients"] == stats.patients
    assert got["counts"]["resources"] == stats.rows
    assert len(stats.files) == 1 + math.ceil(stats.observations / 4000)  # several files


def test_the_synthetic_export_is_valid_fhir(tmp_path: Path) -> None:
    stats = write_fhir_export(tmp_path / "x", 40, seed=3, messiness=0.0)
    for name in stats.files:
        model = Patient if name.startswith("Patient") else Observation
        for line in (tmp_path / "x" / name).read_bytes().splitlines():
            model.model_validate_json(line)


def _per_patient(path: Path) -> dict[str, PatientMeasurements]:
    rows: dict[str, list[tuple[Any, int, float]]] = {}
    for block in read_extract(path):
        for pid, t, v, x in zip(
            block.patient_id.to_pylist(), block.timestamp, block.variable, block.value, strict=True
        ):
            rows.setdefault(pid, []).append((t, int(v), float(x)))
    return {
        pid: PatientMeasurements(
            np.array([t for t, _, _ in r], dtype="datetime64[us]"),
            np.array([v for _, v, _ in r], dtype=np.int8),
            np.array([x for _, _, x in r]),
        )
        for pid, r in rows.items()
    }


def test_the_same_cohort_gives_the_models_the_same_inputs_from_csv_and_fhir(
    tmp_path: Path,
) -> None:
    n, seed = 300, 11
    write_long_csv(tmp_path / "c.csv", n, seed, messiness=0.0)
    write_fhir_export(tmp_path / "f", n, seed, messiness=0.0)
    # a visit that recorded nothing but the age has no Observation (FHIR has no "age" result)
    only_age = {
        p.patient_id
        for p in synth_patients(n, seed)
        if any(v.measured == ("age",) for v in p.visits)
    }
    from_csv, from_fhir = _per_patient(tmp_path / "c.csv"), _per_patient(tmp_path / "f")
    assert set(from_csv) == set(from_fhir)
    ids = sorted(set(from_csv) - only_age)
    assert len(ids) >= n - 3
    for schema in (model_schema(m) for m in ("diabetes_lstm_attention", "cvd_autoencoder")):
        a = [from_csv[i] for i in ids]
        b = [from_fhir[i] for i in ids]
        if schema.sequence:
            for x, y in zip(visit_sequences(a, schema), visit_sequences(b, schema), strict=True):
                assert np.array_equal(x.values, y.values) and np.array_equal(x.observed, y.observed)
                assert np.array_equal(x.dt_years, y.dt_years) and x.length == y.length
        else:
            for x, y in zip(latest_profiles(a, schema), latest_profiles(b, schema), strict=True):
                assert np.array_equal(x, y)


def _export(tmp_path: Path, files: dict[str, list[dict]], manifest: list[tuple[str, str]]) -> Path:
    out = tmp_path / "exp"
    out.mkdir()
    for name, resources in files.items():
        (out / name).write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in resources))
    (out / "manifest.json").write_bytes(
        orjson.dumps(
            {
                "transactionTime": "2026-01-01T00:00:00Z",
                "request": "x",
                "output": [{"type": t, "url": u} for t, u in manifest],
            }
        )
    )
    return out


def test_age_and_sex_come_from_the_patient_file_wherever_it_is(tmp_path: Path) -> None:
    def patient(pid: str, **kw: Any) -> dict:
        return {"resourceType": "Patient", "id": pid, **kw}

    out = _export(
        tmp_path,
        {
            "Observation.ndjson": [
                _obs("A", effectiveDateTime="2020-06-01T10:00:00+02:00"),  # the day before 60
                _obs("A", "39156-5", 27.5, "kg/m2", effectiveDateTime="2020-06-01T10:00:00+02:00"),
                _obs("A", effectiveDateTime="2020-06-02T23:30:00-05:00"),  # 60 (UTC: June 3)
                _obs("B"),
                _obs("C"),
                _obs("D", effectiveDateTime="1950-01-01T00:00:00Z"),
                _obs("E"),
            ],
            "Patient-1.ndjson": [patient("A", birthDate="1960-06-02", gender="female")],
            "Patient-2.ndjson": [
                patient("B", birthDate="1970-01-01", gender="male"),
                patient("C", birthDate="1955", gender="unknown"),
                patient("D", birthDate="1960-01-01", gender="male"),
                patient("B", birthDate="1971-01-01", gender="female"),  # sent twice: the last
            ],
        },
        [
            ("Observation", "Observation.ndjson"),
            ("Patient", "Patient-1.ndjson"),
            ("Patient", "Patient-2.ndjson"),
        ],
    )
    got = _read(out)
    by_patient: dict[str, list[tuple[str, float]]] = {}
    for rows in got["accepted"].values():
        for pid, _, name, value in rows:
            by_patient.setdefault(pid, []).append((name, value))
    assert sorted(by_patient["A"]) == sorted(
        [
            ("hba1c", 7.1),
            ("bmi", 27.5),
            ("age", 59.0),
            ("sex", 0.0),
            ("hba1c", 7.1),
            ("age", 60.0),
            ("sex", 0.0),
        ]
    )  # one age and one sex per visit, not per Observation
    assert sorted(by_patient["B"]) == [("age", 49.0), ("hba1c", 7.1), ("sex", 0.0)]
    assert sorted(by_patient["C"]) == [("hba1c", 7.1)]  # birth year only, gender unknown
    assert sorted(by_patient["D"]) == [("hba1c", 7.1), ("sex", 1.0)]  # before birth: no age
    assert sorted(by_patient["E"]) == [("hba1c", 7.1)]  # no Patient resource
    counts = got["counts"]
    assert counts["patients"] == 5 and counts["patients_without_birth_date"] == 1
    assert counts["patients_without_sex"] == 1 and counts["ages_out_of_range"] == 1
    assert counts["measurements_without_patient"] == 1
    first_obs_line = 6  # five Patient lines come first in the export's numbering
    assert min(got["accepted"]) == first_obs_line


def test_the_patient_index_is_exact_even_when_every_hash_collides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fhir_reader, "_hash", lambda _: 42)
    index = PatientIndex()
    index.add([PatientRecord(f"P{i}", None, float(i % 2)) for i in range(50)])
    index.add([PatientRecord("P7", None, 0.0)])  # P7 again: the last version wins
    index.freeze()
    assert len(index) == 50
    found = index.lookup(["P3", "P7", "nobody", "P49"])
    assert found[2] == -1
    assert [int(index.sex[k]) for k in found[[0, 1, 3]]] == [1, 0, 1]
    assert [index.ids[int(k)].as_py() for k in found[[0, 1, 3]]] == ["P3", "P7", "P49"]


def test_unchanged_export_copied_elsewhere_reads_the_same(
    messy: tuple[Path, FhirSynthStats], tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(messy[0], copy)
    assert _read(copy)["rejected"] == _read(messy[0])["rejected"]


def test_training_reads_an_export_through_the_same_entry_point(tmp_path: Path) -> None:
    from medbatch.training.ehr import load_cohort

    long = load_cohort(60, 21, tmp_path, "cvd")
    fhir = load_cohort(60, 21, tmp_path, "cvd", fmt="fhir")
    assert fhir.patient_ids == long.patient_ids
    assert np.array_equal(fhir.label, long.label) and np.array_equal(fhir.prob, long.prob)
    assert fhir.accepted > 0.9 * long.accepted
