"""The reference checks of one FHIR resource: what each Observation contributes (values through
the schema's conversions), what is skipped or counted, and the reason for everything rejected.
The resources built here are checked against the FHIR R4B models of ``fhir.resources`` first, so
"valid" below means valid FHIR, not just what this code expects."""

from __future__ import annotations

import copy
from datetime import date, datetime
from typing import Any

import orjson
import pytest
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from pydantic import ValidationError

from ingest.ehr.fhir_codes import ANSWERS, OBSERVATION_CODES, UCUM_UNITS
from ingest.ehr.fhir_resources import (
    ObservationRecord,
    PatientRecord,
    Skipped,
    UnknownCode,
    check_observation,
    check_patient,
    load_line,
    parse_fhir_time,
)
from ingest.ehr.schema import (
    GLUCOSE_FROM_MG_DL,
    HBA1C_FROM_IFCC,
    VARIABLES,
    RowRejected,
)

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
PID = "MRN00000042"


def obs(code: str = "4548-4", value: Any = 7.1, unit: str = "%", **extra: Any) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": code}]},
        "subject": {"reference": f"Patient/{PID}"},
        "effectiveDateTime": "2021-03-04T09:30:00+01:00",
    }
    if value is not None:
        resource["valueQuantity"] = {"value": value, "unit": unit, "system": UCUM, "code": unit}
    resource.update(extra)
    return resource


def bp_panel(sbp: Any = 132, dbp: Any = 84) -> dict[str, Any]:
    resource = obs("85354-9", None)
    resource["component"] = [
        {
            "code": {"coding": [{"system": LOINC, "code": c}]},
            "valueQuantity": {"value": v, "unit": "mmHg", "system": UCUM, "code": "mm[Hg]"},
        }
        for c, v in (("8480-6", sbp), ("8462-4", dbp))
    ]
    return resource


def smoking(answer: str) -> dict[str, Any]:
    resource = obs("72166-2", None)
    resource["valueCodeableConcept"] = {
        "coding": [{"system": "http://snomed.info/sct", "code": answer}]
    }
    return resource


def valid_fhir(resource: dict[str, Any]) -> dict[str, Any]:
    """The resource, after checking it against the R4B model (so the tests speak FHIR)."""
    model = Observation if resource["resourceType"] == "Observation" else Patient
    model.model_validate(resource)
    return resource


def rejected(resource: Any) -> tuple[str, str]:
    with pytest.raises(RowRejected) as info:
        check_observation(resource)
    assert PID not in info.value.reason  # reasons never carry the identifier
    return info.value.kind, info.value.reason


def test_every_variable_of_the_table_is_read_through_the_schema() -> None:
    assert {v for v in OBSERVATION_CODES.values()} == set(VARIABLES) - {"age", "sex"}
    for ucum, unit in UCUM_UNITS.items():
        assert any(unit in v.units or unit == v.canonical_unit for v in VARIABLES.values()), ucum
    assert set(ANSWERS) == {"smoker"}


def test_a_quantity_is_converted_as_a_csv_cell_is() -> None:
    record = check_observation(valid_fhir(obs()))
    assert record == ObservationRecord(PID, datetime(2021, 3, 4, 8, 30), (("hba1c", 7.1),))
    ifcc = check_observation(valid_fhir(obs("59261-8", 54, "mmol/mol")))
    assert isinstance(ifcc, ObservationRecord)
    assert ifcc.measurements == (("hba1c", HBA1C_FROM_IFCC.to_canonical(54.0)),)
    glucose = obs("2345-7", 126, "mg/dL")
    glucose["valueQuantity"] = {"value": 126, "unit": "mg/dl"}  # free text, no UCUM code
    record = check_observation(valid_fhir(glucose))
    assert isinstance(record, ObservationRecord)
    assert record.measurements == (("glucose", GLUCOSE_FROM_MG_DL.to_canonical(126.0)),)
    egfr = obs("98979-8", 71, "mL/min/{1.73_m2}")
    assert check_observation(valid_fhir(egfr)).measurements == (("egfr", 71.0),)  # type: ignore[union-attr]


def test_a_blood_pressure_panel_gives_its_components() -> None:
    record = check_observation(valid_fhir(bp_panel()))
    assert isinstance(record, ObservationRecord)
    assert record.measurements == (("sbp", 132.0), ("dbp", 84.0))
    kind, reason = rejected(valid_fhir(bp_panel(dbp=420)))  # one bad component: all rejected
    assert kind == "impossible_value" and "dbp" in reason
    empty = bp_panel()
    del empty["component"]
    assert rejected(valid_fhir(empty))[0] == "missing_value"


@pytest.mark.parametrize(
    ("answer", "value"), [("449868002", 1.0), ("8517006", 0.0), ("266919005", 0.0)]
)
def test_smoking_status_answers(answer: str, value: float) -> None:
    record = check_observation(valid_fhir(smoking(answer)))
    assert isinstance(record, ObservationRecord)
    assert record.measurements == (("smoker", value),)


def test_what_is_skipped_and_what_is_counted_is_not_an_error() -> None:
    assert check_observation(valid_fhir(smoking("266927001"))) == Skipped(
        "smoker answer carries no value"
    )
    for status in ("entered-in-error", "cancelled"):
        broken = obs(value=70.0, status=status)  # impossible, but it was withdrawn anyway
        del broken["subject"]
        assert check_observation(valid_fhir(broken)) == Skipped(f"status {status}")
    heart_rate = obs("8867-4", 72, "/min")
    del heart_rate["subject"]  # unknown codes are counted before anything else is looked at
    assert check_observation(valid_fhir(heart_rate)) == UnknownCode("LOINC 8867-4")
    local = obs()
    local["code"] = {"coding": [{"system": "urn:local", "code": "A1C"}]}
    assert check_observation(valid_fhir(local)) == UnknownCode("urn:local|A1C")


def test_times_in_order_of_preference() -> None:
    period = obs()
    del period["effectiveDateTime"]
    period["effectivePeriod"] = {"start": "2021-03-04T10:00:00Z", "end": "2021-03-04T11:00:00Z"}
    assert check_observation(valid_fhir(period)).timestamp == datetime(2021, 3, 4, 10)  # type: ignore[union-attr]
    issued = obs()
    del issued["effectiveDateTime"]
    issued["issued"] = "2021-03-05T07:00:00.123456+02:00"
    assert check_observation(valid_fhir(issued)).timestamp == datetime(2021, 3, 5, 5, 0, 0, 123456)  # type: ignore[union-attr]
    assert parse_fhir_time("2021-03-04") == datetime(2021, 3, 4)
    assert parse_fhir_time("2021-03-04T09:30:00.1234567Z") == datetime(2021, 3, 4, 9, 30, 0, 123456)


def _without(resource: dict[str, Any], *path: str) -> dict[str, Any]:
    out = copy.deepcopy(resource)
    target = out
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return out


@pytest.mark.parametrize(
    ("resource", "kind", "says"),
    [
        (_without(obs(), "subject"), "missing_id", "no subject"),
        (obs(subject={"reference": "Group/cohort-7"}), "missing_id", "a Group, not a Patient"),
        (obs(subject={"reference": "Patient/"}), "missing_id", "Patient/<id>"),
        (_without(obs(), "effectiveDateTime"), "unparseable_time", "no time"),
        (obs(effectiveDateTime="2021-03"), "unparseable_time", "no day"),
        (obs(value=None), "missing_value", "no valueQuantity for hba1c"),
        (
            obs(value=None, dataAbsentReason={"coding": [{"code": "not-performed"}]}),
            "missing_value",
            "dataAbsentReason not-performed",
        ),
        (obs(value=None, valueString="7.1"), "missing_value", "valueString instead"),
        (obs(value=70.0), "impossible_value", "physiological range"),
        (obs(unit="mg"), "unknown_unit", "unknown unit 'mg' for hba1c"),
        (smoking("65568007"), "unparseable_value", "unknown answer SNOMED 65568007"),
    ],
)
def test_each_rejection_has_its_reason(resource: dict[str, Any], kind: str, says: str) -> None:
    got_kind, reason = rejected(valid_fhir(resource))
    assert (got_kind, says in reason) == (kind, True), reason


@pytest.mark.parametrize(
    ("line", "kind", "says"),
    [
        (b'{"resourceType": "Observation", "status": ', "invalid_json", "not valid JSON"),
        (b"[1, 2]", "wrong_resource_type", "a JSON list"),
        (b'{"resourceType": "Patient", "id": "x"}', "wrong_resource_type", "'Patient' in a file"),
        (b'{"status": "final"}', "wrong_resource_type", "no resourceType"),
    ],
)
def test_lines_that_are_no_observation(line: bytes, kind: str, says: str) -> None:
    with pytest.raises(RowRejected) as info:
        check_observation(load_line(line))
    assert info.value.kind == kind and says in info.value.reason, info.value.reason


def test_invalid_fhir_is_rejected_not_guessed() -> None:
    """February 30 (the R4B model refuses it too); a decimal as a JSON string (FHIR JSON writes
    decimals as numbers; the model coerces it, the ingest does not guess)."""
    no_such_day = obs(effectiveDateTime="2021-02-30T10:00:00Z")
    with pytest.raises(ValidationError):
        Observation.model_validate(no_such_day)
    assert rejected(no_such_day)[0] == "unparseable_time"
    as_string = obs()
    as_string["valueQuantity"]["value"] = "7.1"
    kind, reason = rejected(as_string)
    assert kind == "unparseable_value" and "a JSON str, not a number" in reason
    bound = obs("62238-1", 90, "mL/min/{1.73_m2}")
    bound["valueQuantity"]["comparator"] = ">"
    kind, reason = rejected(valid_fhir(bound))  # valid FHIR, but no exact value
    assert kind == "unparseable_value" and "bound" in reason


def test_patients() -> None:
    def patient(**extra: Any) -> dict[str, Any]:
        return valid_fhir({"resourceType": "Patient", "id": PID, **extra})

    assert check_patient(patient(birthDate="1960-05-17", gender="female")) == PatientRecord(
        PID, date(1960, 5, 17), 0.0
    )
    assert check_patient(patient(birthDate="1960", gender="other")) == PatientRecord(
        PID, None, None
    )
    assert check_patient(patient(gender="male")).sex == 1.0
    for bad, kind in (
        ({"resourceType": "Patient"}, "missing_id"),
        ({"resourceType": "Patient", "id": "a b"}, "missing_id"),
        ({"resourceType": "Patient", "id": PID, "birthDate": "17/05/1960"}, "unparseable_time"),
        ({"resourceType": "Observation", "id": PID}, "wrong_resource_type"),
    ):
        with pytest.raises(RowRejected) as info:
            check_patient(orjson.loads(orjson.dumps(bad)))
        assert info.value.kind == kind
