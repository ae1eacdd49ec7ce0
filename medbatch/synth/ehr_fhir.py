"""The synthetic EHR cohort of :mod:`medbatch.synth.ehr` as a FHIR Bulk Data ``$export``.

Same patients, visits, values and ground truth as :func:`~medbatch.synth.ehr.write_long_csv`
for the same seed; written as a hospital's ``$export`` folder: ``manifest.json`` (output
entries with file names as urls and counts), ``Patient.ndjson`` (id = the MRN, gender,
birthDate) and ``Observation-0001.ndjson`` … (``observations_per_file`` lines each; ``.gz`` with
``compress``). Byte-identical for the same arguments.

What a real export looks like, none of it an error:

* blood pressure as a panel (LOINC 85354-9) with systolic and diastolic components, or as two
  Observations; smoking status (72166-2) with SNOMED CT answers at the first visit;
* units as the long CSV draws them (``unit_mix``, the same draws, so with ``messiness=0`` the
  measurements equal a long CSV's of ``messiness=0`` exactly): a canonical unit with its UCUM
  code (``mm[Hg]``, ``mL/min/{1.73_m2}``), a variant spelling as free ``unit`` text only;
  HbA1c in mmol/mol under its IFCC code 59261-8;
* times with the clinic's UTC offset (``Z``, ``+01:00``, ``+02:00``, ``-05:00``: never across
  midnight, so the visit's day is the CSV's);
* vital signs no model uses (heart rate 8867-4, body weight 29463-7, height 8302-2): counted
  per code by the ingest;
* corrections: an Observation with a wrong value and status ``entered-in-error`` (or
  ``cancelled``) beside the right one: skipped and counted.

Defects, one per broken Observation line at rate ``messiness``, each a rejection kind of the
ingest: ``missing_id`` (no subject, a Group as subject, ``Patient/`` without id),
``invalid_json`` (a line cut short), ``missing_value`` (a dataAbsentReason instead of a value),
``unparseable_time`` (a month without a day, a European date, no time at all),
``impossible_value`` and ``unknown_unit`` (quantities only). Sidecars beside the folder, never
in it: ``<folder>.truth.csv`` (as the CSV's) and ``<folder>.defects.csv`` (``line`` as the
rejections table numbers it — the export's Patient lines first, then its Observation files in
order —, ``file``, ``file_line``, ``kind``).
"""

from __future__ import annotations

import csv
import gzip
import math
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any

import numpy as np
import orjson

from ingest.ehr.fhir_codes import UCUM_SYSTEM
from ingest.ehr.schema import VARIABLES, normalise_unit
from medbatch.synth.ehr import (
    _ALT_UNITS,
    TRUTH_COLUMNS,
    Patient,
    SynthStats,
    _check_rates,
    _format,
    _iter_patients,
    _Mess,
    _spec,
    _truth_row,
)

__all__ = ["BROKEN_KINDS_FHIR", "FhirSynthStats", "write_fhir_export"]

BROKEN_KINDS_FHIR = (
    "missing_id",
    "invalid_json",
    "missing_value",
    "unparseable_time",
    "impossible_value",
    "unknown_unit",
)
_ANSWER_KINDS = ("missing_id", "invalid_json", "missing_value", "unparseable_time")
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
_CATEGORY_LAB = "laboratory"
_CATEGORY_VITAL = "vital-signs"
#: variable → (LOINC by unit kind, display, category); the unit decides mass vs moles codes
_CODES: dict[str, tuple[dict[str, str], str, str]] = {
    "hba1c": ({"%": "4548-4", "mmol/mol": "59261-8"}, "Hemoglobin A1c", _CATEGORY_LAB),
    "glucose": ({"mg/dl": "2345-7", "mmol/l": "14749-6"}, "Glucose", _CATEGORY_LAB),
    "sbp": ({"": "8480-6"}, "Systolic blood pressure", _CATEGORY_VITAL),
    "dbp": ({"": "8462-4"}, "Diastolic blood pressure", _CATEGORY_VITAL),
    "bmi": ({"": "39156-5"}, "Body mass index", _CATEGORY_VITAL),
    "total_cholesterol": (
        {"mg/dl": "2093-3", "mmol/l": "14647-2"},
        "Cholesterol",
        _CATEGORY_LAB,
    ),
    "ldl": ({"": "13457-7"}, "Cholesterol in LDL", _CATEGORY_LAB),
    "hdl": ({"mg/dl": "2085-9", "mmol/l": "14646-4"}, "Cholesterol in HDL", _CATEGORY_LAB),
    "triglycerides": ({"mg/dl": "2571-8", "mmol/l": "14927-8"}, "Triglyceride", _CATEGORY_LAB),
    "egfr": ({"": "62238-1"}, "eGFR (CKD-EPI)", _CATEGORY_LAB),
}
#: The schema's canonical spellings that are UCUM codes under another name.
_UCUM = {"mmHg": "mm[Hg]", "mL/min/1.73m2": "mL/min/{1.73_m2}"}
_SMOKER = {1: ("449868002", "428041000124106"), 0: ("266919005", "8517006")}
_VITALS_UNKNOWN = (
    ("8867-4", "Heart rate", "/min", 72.0, 12.0),
    ("29463-7", "Body weight", "kg", 80.0, 14.0),
    ("8302-2", "Body height", "cm", 170.0, 9.0),
)
_OFFSETS = ("Z", "+01:00", "+02:00", "-05:00")
_ENTERED_IN_ERROR_RATE = 0.01
_CANCELLED_RATE = 0.003
_PANEL_RATE = 0.7
_UNKNOWN_VITAL_RATE = 0.4


@dataclass(frozen=True)
class FhirSynthStats(SynthStats):
    """:class:`SynthStats` of an export: ``rows`` are NDJSON lines (Patients + Observations);
    ``measurements`` what the ingest accepts (Observation values, and an age and a sex per
    visit with an accepted Observation); ``skipped`` and ``unknown_codes`` as it counts them."""

    observations: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    unknown_codes: dict[str, int] = field(default_factory=dict)
    files: tuple[str, ...] = ()


def _birth_date(p: Patient) -> date:
    """A birth date giving, in completed calendar years, the CSV's age at every visit."""
    targets = [(v.when.date(), math.floor(v.values["age"])) for v in p.visits]
    first = p.visits[0]
    guess = first.when.date() - timedelta(days=round(first.values["age"] * 365.2425))
    for shift in sorted(range(-400, 401), key=abs):
        birth = guess + timedelta(days=shift)
        if all(
            day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day)) == age
            for day, age in targets
        ):
            return birth
    return guess  # not seen on the generator's cohorts (tested)


def _unit_choices(p: Patient, seed: int, unit_mix: float) -> Iterator[tuple[str, str]]:
    """(variable, unit) of each long-CSV row of ``p`` as ``write_long_csv`` draws them with
    ``messiness=0`` (the same generator, consumed the same way)."""
    mess = _Mess(seed, p.index)
    n_rows = sum(len(v.measured) for v in p.visits)
    mess.rng.random(n_rows)  # the CSV writer's defect draws (none below messiness 0)
    u_unit = mess.rng.random(n_rows)
    r = 0
    for visit in p.visits:
        for var in visit.measured:
            unit = VARIABLES[var].canonical_unit
            if u_unit[r] < unit_mix:
                unit = mess.pick(_ALT_UNITS[var])
            yield var, unit
            r += 1


def _quantity(var: str, value_text: str, unit: str) -> dict[str, Any]:
    value = float(value_text)
    canonical_spellings = {VARIABLES[var].canonical_unit, "mmol/mol", "mg/dL"}
    if unit in canonical_spellings:
        return {"value": value, "unit": unit, "system": UCUM_SYSTEM, "code": _UCUM.get(unit, unit)}
    return {"value": value, "unit": unit}  # a legacy interface's free-text unit


def _loinc(var: str, unit: str) -> dict[str, Any]:
    by_unit, display, _ = _CODES[var]
    code = by_unit.get(normalise_unit(unit), by_unit.get(""))
    if code is None:
        code = next(iter(by_unit.values()))
    return {"coding": [{"system": LOINC, "code": code, "display": display}], "text": display}


def _category(kind: str) -> list[dict[str, Any]]:
    return [
        {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                    "code": kind,
                }
            ]
        }
    ]


_CATEGORIES = {k: _category(k) for k in (_CATEGORY_LAB, _CATEGORY_VITAL, "social-history")}


class _Export:
    """The export folder: Patient and Observation files, the manifest, the sidecars."""

    def __init__(self, out: Path, n_patients: int, per_file: int, compress: bool) -> None:
        self.out = out
        self.per_file = per_file
        self.compress = compress
        self.suffix = ".ndjson.gz" if compress else ".ndjson"
        self.patient_lines = n_patients  # Patient lines precede Observations in line numbers
        self.obs_files: list[tuple[str, int]] = []  # (name, lines)
        self._fh: IO[bytes] | None = None
        self._lines_in_file = 0
        self.obs_lines = 0

    def _open(self, name: str) -> IO[bytes]:
        path = self.out / name
        if self.compress:  # mtime 0: the same bytes for the same arguments
            return gzip.GzipFile(str(path), "wb", compresslevel=6, mtime=0)  # type: ignore[return-value]
        return path.open("wb")

    def observation(self, line: bytes) -> tuple[int, str, int]:
        """Write one Observation line; its (export line, file, line in file)."""
        if self._fh is None or self._lines_in_file == self.per_file:
            self.close_file()
            name = f"Observation-{len(self.obs_files) + 1:04d}{self.suffix}"
            self.obs_files.append((name, 0))
            self._fh = self._open(name)
            self._lines_in_file = 0
        self._fh.write(line + b"\n")
        self._lines_in_file += 1
        self.obs_lines += 1
        name, _ = self.obs_files[-1]
        self.obs_files[-1] = (name, self._lines_in_file)
        return self.patient_lines + self.obs_lines, name, self._lines_in_file

    def close_file(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _dumps(resource: dict[str, Any]) -> bytes:
    return orjson.dumps(resource)


class _PatientWriter:
    """The resources of one patient with their defects and corrections."""

    def __init__(self, p: Patient, seed: int, messiness: float, unit_mix: float) -> None:
        self.p = p
        self.rng = np.random.default_rng([seed, 3, p.index])
        self.mess = _Mess(seed, p.index)
        self.mess.rng = np.random.default_rng([seed, 4, p.index])
        self.messiness = messiness
        self.offset = _OFFSETS[int(self.rng.integers(len(_OFFSETS)))]
        self.units = _unit_choices(p, seed, unit_mix)
        self.count = 0
        self._stamped: datetime | None = None
        self._times = ("", "")

    def _when(self, when: datetime) -> str:
        """The visit's wall-clock time with the clinic's offset (UTC = wall - offset)."""
        return when.strftime("%Y-%m-%dT%H:%M:%S") + self.offset

    def _base(self, code: dict[str, Any], category: str, when: datetime) -> dict[str, Any]:
        self.count += 1
        if when != self._stamped:  # once per visit
            self._stamped = when
            self._times = (
                self._when(when),
                (when + timedelta(hours=4)).strftime("%Y-%m-%dT%H:%M:%S") + self.offset,
            )
        return {
            "resourceType": "Observation",
            "id": f"{self.p.patient_id.lower()}-{self.count}",
            "status": "final",
            "category": _CATEGORIES[category],
            "code": code,
            "subject": {"reference": f"Patient/{self.p.patient_id}"},
            "effectiveDateTime": self._times[0],
            "issued": self._times[1],
        }

    def visits(self) -> Iterator[tuple[dict[str, Any], list[tuple[str, str]], bool]]:
        """(resource, its measurements as (variable, unit), can it be broken) in visit order;
        corrections and vital signs no model uses come with ``None`` measurements."""
        for visit in self.p.visits:
            chosen = {}
            for var in visit.measured:
                chosen[var] = next(self.units)[1]
            pending: list[tuple[dict[str, Any], list[tuple[str, str]], bool]] = []
            measured = [v for v in visit.measured if v not in ("age", "sex")]
            if "smoker" in measured:
                answer = _SMOKER[int(visit.values["smoker"])][int(self.rng.integers(2))]
                res = self._base(
                    {
                        "coding": [{"system": LOINC, "code": "72166-2"}],
                        "text": "Tobacco smoking status",
                    },
                    "social-history",
                    visit.when,
                )
                res["valueCodeableConcept"] = {"coding": [{"system": SNOMED, "code": answer}]}
                pending.append((res, [("smoker", "")], True))
            bp = "sbp" in measured and "dbp" in measured and self.rng.random() < _PANEL_RATE
            if bp:
                res = self._base(
                    {"coding": [{"system": LOINC, "code": "85354-9"}], "text": "Blood pressure"},
                    _CATEGORY_VITAL,
                    visit.when,
                )
                res["component"] = [
                    {
                        "code": _loinc(v, chosen[v]),
                        "valueQuantity": _quantity(
                            v, _format(v, visit.values[v], chosen[v]), chosen[v]
                        ),
                    }
                    for v in ("sbp", "dbp")
                ]
                pending.append((res, [("sbp", chosen["sbp"]), ("dbp", chosen["dbp"])], True))
            for var in measured:
                if var == "smoker" or (bp and var in ("sbp", "dbp")):
                    continue
                unit = chosen[var]
                res = self._base(_loinc(var, unit), _CODES[var][2], visit.when)
                res["valueQuantity"] = _quantity(var, _format(var, visit.values[var], unit), unit)
                pending.append((res, [(var, unit)], True))
            for code, display, unit, mean, sd in _VITALS_UNKNOWN:
                if self.rng.random() < _UNKNOWN_VITAL_RATE:
                    res = self._base(
                        {"coding": [{"system": LOINC, "code": code, "display": display}]},
                        _CATEGORY_VITAL,
                        visit.when,
                    )
                    value = round(float(mean + sd * self.rng.standard_normal()), 1)
                    res["valueQuantity"] = {
                        "value": value,
                        "unit": unit,
                        "system": UCUM_SYSTEM,
                        "code": unit,
                    }
                    pending.append((res, [], False))
            for res, parts, breakable in pending:
                u = self.rng.random()
                if parts and u < _ENTERED_IN_ERROR_RATE + _CANCELLED_RATE:
                    wrong = orjson.loads(orjson.dumps(res))
                    wrong["id"] += "-x"
                    wrong["status"] = (
                        "entered-in-error" if u < _ENTERED_IN_ERROR_RATE else "cancelled"
                    )
                    q = wrong.get("valueQuantity")
                    if isinstance(q, dict):
                        q["value"] = round(q["value"] * 1.5, 1)
                    yield wrong, [], False
                yield res, parts, breakable

    def maybe_break(
        self, res: dict[str, Any], parts: list[tuple[str, str]]
    ) -> tuple[bytes, str | None]:
        """The line, broken with one defect at rate ``messiness``."""
        if self.rng.random() >= self.messiness:
            return _dumps(res), None
        answer = parts[0][0] == "smoker"
        kind = str(self.rng.choice(_ANSWER_KINDS if answer else BROKEN_KINDS_FHIR))
        if kind == "invalid_json":
            line = _dumps(res)
            return line[: int(self.rng.integers(20, len(line) - 2))], kind
        if kind == "missing_id":
            choice = int(self.rng.integers(3))
            if choice == 0:
                del res["subject"]
            elif choice == 1:
                res["subject"] = {"reference": "Group/cohort-7"}
            else:
                res["subject"] = {"reference": "Patient/"}
        elif kind == "unparseable_time":
            when = res["effectiveDateTime"]
            choice = int(self.rng.integers(3))
            if choice == 0:
                res["effectiveDateTime"] = when[:7]  # YYYY-MM
            elif choice == 1:
                res["effectiveDateTime"] = f"{when[8:10]}/{when[5:7]}/{when[:4]}"
            else:
                del res["effectiveDateTime"], res["issued"]
        else:
            element = res if "component" not in res else res["component"][int(self.rng.integers(2))]
            var, unit = parts[0] if element is res else parts[res["component"].index(element)]
            if kind == "missing_value":
                element.pop("valueQuantity", None)
                element.pop("valueCodeableConcept", None)
                element["dataAbsentReason"] = {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/data-absent-reason",
                            "code": "not-performed",
                        }
                    ]
                }
            elif kind == "impossible_value":
                element["valueQuantity"]["value"] = float(self.mess.impossible(var, unit))
            else:  # unknown_unit
                element["valueQuantity"] = {
                    "value": element["valueQuantity"]["value"],
                    "unit": self.mess.bad_unit(var),
                }
        return _dumps(res), kind


def write_fhir_export(
    out: Path,
    n_patients: int,
    seed: int,
    *,
    messiness: float = 0.02,
    unit_mix: float = 0.25,
    observations_per_file: int = 100_000,
    compress: bool = False,
) -> FhirSynthStats:
    """Write the cohort of ``seed`` as a ``$export`` folder ``out`` (emptied first); sidecars
    ``<out>.truth.csv`` and ``<out>.defects.csv`` beside it."""
    _check_rates(n_patients, seed, messiness, unit_mix)
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    truth_path = out.with_name(f"{out.name}.truth.csv")
    defects_path = out.with_name(f"{out.name}.defects.csv")
    export = _Export(out, n_patients, observations_per_file, compress)
    broken = dict.fromkeys(BROKEN_KINDS_FHIR, 0)
    skipped: Counter[str] = Counter()
    unknown: Counter[str] = Counter()
    visits = measurements = converted = valid = dm_pos = cvd_pos = 0
    patient_file = f"Patient{export.suffix}"
    with (
        truth_path.open("w", newline="", encoding="utf-8") as truth_fh,
        defects_path.open("w", newline="", encoding="utf-8") as defects_fh,
        export._open(patient_file) as patients_fh,
    ):
        truth = csv.writer(truth_fh, lineterminator="\n")
        defects = csv.writer(defects_fh, lineterminator="\n")
        truth.writerow(TRUTH_COLUMNS)
        defects.writerow(("line", "file", "file_line", "kind"))
        for p in _iter_patients(n_patients, seed):
            truth.writerow(_truth_row(p))
            visits += len(p.visits)
            dm_pos += p.truth.diabetes_complication_label
            cvd_pos += p.truth.cvd_label
            patient = {
                "resourceType": "Patient",
                "id": p.patient_id,
                "identifier": [
                    {
                        "type": {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                    "code": "MR",
                                }
                            ]
                        },
                        "value": p.patient_id,
                    }
                ],
                "gender": "male" if p.male else "female",
                "birthDate": _birth_date(p).isoformat(),
            }
            patients_fh.write(_dumps(patient) + b"\n")
            writer = _PatientWriter(p, seed, messiness, unit_mix)
            visit_ok: set[str] = set()
            for res, parts, breakable in writer.visits():
                if breakable:
                    line, kind = writer.maybe_break(res, parts)
                else:
                    line, kind = _dumps(res), None
                number, name, file_line = export.observation(line)
                if kind is not None:
                    broken[kind] += 1
                    defects.writerow((number, name, file_line, kind))
                elif res["status"] != "final":
                    skipped[f"status {res['status']}"] += 1
                elif not parts:
                    unknown[f"LOINC {res['code']['coding'][0]['code']}"] += 1
                else:
                    valid += 1
                    measurements += len(parts)
                    converted += sum(1 for v, u in parts if u and not _spec(v, u)[0].is_identity)
                    visit_ok.add(res["effectiveDateTime"])
            measurements += 2 * len(visit_ok)  # an age and a sex per visit, from the Patient
        export.close_file()
    names = [patient_file, *(n for n, _ in export.obs_files)]
    manifest = {
        "transactionTime": f"{2026 + seed % 3}-11-30T02:00:00+00:00",
        "request": "https://ehr.example.org/fhir/Patient/$export?_type=Patient,Observation",
        "requiresAccessToken": True,
        "output": [
            *({"type": "Observation", "url": n, "count": c} for n, c in export.obs_files),
            {"type": "Patient", "url": patient_file, "count": n_patients},
        ],
        "error": [],
    }
    (out / "manifest.json").write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    return FhirSynthStats(
        path=out,
        fmt="fhir",
        patients=n_patients,
        visits=visits,
        rows=n_patients + export.obs_lines,
        valid_rows=valid,
        broken=MappingProxyType(broken),
        converted_rows=converted,
        diabetes_positives=dm_pos,
        cvd_positives=cvd_pos,
        truth_path=truth_path,
        defects_path=defects_path,
        measurements=measurements,
        observations=export.obs_lines,
        skipped=dict(skipped),
        unknown_codes=dict(unknown),
        files=tuple(names),
    )
