"""One FHIR resource (one NDJSON line) → what it contributes, or why it is rejected.

These per-resource checks are the reference semantics of the FHIR input, as
:func:`ingest.ehr.schema.check_long_row` is for CSV: the block reader
(:mod:`ingest.ehr.fhir_reader`) decides whole blocks with pyarrow and must accept, skip and
reject exactly as these functions do (tested); it calls them for every line it does not accept
itself, so the reason an operator reads always comes from here.

An Observation line is, in this order:

1. rejected if it is not JSON (``invalid_json``) or not an Observation (``wrong_resource_type``);
2. **skipped** (counted per status, not an error) if its status is ``entered-in-error`` or
   ``cancelled``;
3. **counted as an unknown code** (not an error: a hospital exports every vital sign and lab) if
   neither its ``code`` nor a component's names a variable of :mod:`ingest.ehr.fhir_codes`;
4. rejected without a patient (``missing_id``: no ``subject``, or not ``Patient/<id>``), without
   a usable time (``unparseable_time``: ``effectiveDateTime``, ``effectiveInstant``,
   ``effectivePeriod.start``, then ``issued``; a date without a day is too imprecise for a
   visit), or when any of its measurements has no value (``missing_value``), a value that is no
   exact number (``unparseable_value``: a string, a bound such as ``>90``), a unit the variable
   does not accept (``unknown_unit``) or a value outside the physiological range
   (``impossible_value``). One bad component rejects the whole resource, as one bad cell
   rejects a wide CSV row: a panel with a corrupted value is not trusted for the others.

Times are stored in UTC without an offset, as a CSV timestamp with an offset is. Reasons name
fields, codes and values, never an identifier.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import orjson

from ingest.ehr.fhir_codes import (
    ANSWERS,
    CODE_SYSTEMS,
    GENDER_SEX,
    PANEL_CODES,
    SKIPPED_STATUSES,
    UCUM_SYSTEM,
    UCUM_UNITS,
    code_label,
    observation_variable,
)
from ingest.ehr.schema import (
    VARIABLES,
    MissingId,
    RowRejected,
    UnknownUnit,
    UnparseableTime,
    UnparseableValue,
    convert,
)

__all__ = [
    "InvalidJson",
    "MissingValue",
    "ObservationRecord",
    "PatientRecord",
    "Skipped",
    "UnknownCode",
    "WrongResourceType",
    "check_observation",
    "check_patient",
    "load_line",
    "parse_fhir_time",
    "resolve_unit",
]

#: A reference to a Patient: relative (``Patient/123``), absolute, or versioned.
PATIENT_REFERENCE = r"^(?:.*/)?Patient/(?P<id>[A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$"
#: Python's ``$`` also matches before a final newline; RE2's (pyarrow) does not.
_PATIENT_REFERENCE = re.compile(PATIENT_REFERENCE.removesuffix("$") + r"\Z")
_FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
#: FHIR dateTime / instant (a time without an offset is read as UTC, as in the CSV path).
FHIR_DATETIME = (
    r"^(\d{4})(-(\d{2})(-(\d{2})(T(\d{2}):(\d{2})(:(\d{2})(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$"
)
_FHIR_DATETIME = re.compile(FHIR_DATETIME.removesuffix("$") + r"\Z")
TIME_FIELDS = ("effectiveDateTime", "effectiveInstant", "effectivePeriod.start", "issued")
_OTHER_VALUES = (
    "valueString",
    "valueBoolean",
    "valueInteger",
    "valueRange",
    "valueRatio",
    "valueSampledData",
    "valueTime",
    "valueDateTime",
    "valuePeriod",
    "valueCodeableConcept",
    "valueQuantity",
)


class InvalidJson(RowRejected):
    kind = "invalid_json"


class WrongResourceType(RowRejected):
    kind = "wrong_resource_type"


class MissingValue(RowRejected):
    kind = "missing_value"


@dataclass(frozen=True)
class ObservationRecord:
    """An accepted Observation: its patient, its time (UTC) and its measurements (variable,
    value in the canonical unit), the resource's own first, then its components in order."""

    patient_id: str
    timestamp: datetime
    measurements: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Skipped:
    """Not a result to score and not an error (``status entered-in-error``, …)."""

    reason: str


@dataclass(frozen=True)
class UnknownCode:
    """An Observation of something no model uses (``LOINC 8867-4``: heart rate)."""

    label: str


@dataclass(frozen=True)
class PatientRecord:
    patient_id: str
    birth_date: date | None  # None: absent, or only a year or month
    sex: float | None  # 1 male, 0 female; None: other, unknown or absent


def load_line(raw: bytes) -> Any:
    """One NDJSON line as JSON, or :class:`InvalidJson` with the parser's message."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJson(f"not valid JSON ({exc})") from None


def _resource(value: Any, expected: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise WrongResourceType(f"a JSON {type(value).__name__}, not a FHIR resource")
    kind = value.get("resourceType")
    if kind != expected:
        shown = repr(kind) if isinstance(kind, str) else "no resourceType"
        raise WrongResourceType(f"{shown} in a file of {expected} resources")
    return value


def _codings(concept: Any) -> list[tuple[str | None, str | None]]:
    """(system, code) of each well-formed coding of a CodeableConcept, in order."""
    if not isinstance(concept, dict) or not isinstance(concept.get("coding"), list):
        return []
    out = []
    for c in concept["coding"]:
        if isinstance(c, dict):
            system, code = c.get("system"), c.get("code")
            out.append(
                (
                    system if isinstance(system, str) else None,
                    code if isinstance(code, str) else None,
                )
            )
    return out


def _variable_of(concept: Any) -> str | None:
    for system, code in _codings(concept):
        name = observation_variable(system, code)
        if name is not None:
            return name
    return None


def _is_panel(concept: Any) -> bool:
    return any(
        CODE_SYSTEMS.get(s or "") == "LOINC" and c in PANEL_CODES for s, c in _codings(concept)
    )


def _unknown_label(concept: Any) -> str:
    codings = _codings(concept)
    for system, code in codings:
        if CODE_SYSTEMS.get(system or "") == "LOINC":
            return code_label(system, code)
    return code_label(*codings[0]) if codings else "(no code)"


def _parts(resource: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(variable, element holding its value) for the resource and each component naming one."""
    out = []
    name = _variable_of(resource.get("code"))
    if name is not None:
        out.append((name, resource))
    components = resource.get("component")
    if isinstance(components, list):
        for c in components:
            if isinstance(c, dict) and (name := _variable_of(c.get("code"))) is not None:
                out.append((name, c))
    return out


def _patient_id(resource: dict[str, Any]) -> str:
    subject = resource.get("subject")
    if not isinstance(subject, dict):
        raise MissingId("no subject (the patient)")
    ref = subject.get("reference")
    if not isinstance(ref, str):
        raise MissingId("subject has no reference to a Patient")
    m = _PATIENT_REFERENCE.match(ref)
    if m is None:
        kind = re.match(r"^(?:.*/)?([A-Z][A-Za-z]+)/", ref)
        if kind and kind.group(1) != "Patient":
            raise MissingId(f"subject is a {kind.group(1)}, not a Patient")
        raise MissingId("subject reference is not of the form Patient/<id>")
    return m.group("id")


def parse_fhir_time(text: Any, what: str = "time") -> datetime:
    """A FHIR dateTime or instant → a naive UTC datetime (a date alone: its midnight)."""
    if not isinstance(text, str):
        raise UnparseableTime(f"unparseable {what}: a JSON {type(text).__name__}, not a dateTime")
    m = _FHIR_DATETIME.match(text)
    if m is None:
        raise UnparseableTime(f"unparseable {what} {text!r} (expected FHIR dateTime)")
    if m.group(5) is None:
        raise UnparseableTime(f"{what} {text!r} has no day: too imprecise for a visit")
    clean = text
    if m.group(11):  # fractional seconds: at most microseconds
        clean = text.replace(m.group(11), (m.group(11) + "00000")[:7], 1)
    try:
        when = datetime.fromisoformat(clean)
        if when.tzinfo is not None:
            when = when.astimezone(UTC).replace(tzinfo=None)
    except (ValueError, OverflowError):
        raise UnparseableTime(f"unparseable {what} {text!r} (no such date or time)") from None
    return when


def _time(resource: dict[str, Any]) -> datetime:
    for key in ("effectiveDateTime", "effectiveInstant"):
        if resource.get(key) is not None:
            return parse_fhir_time(resource[key], key)
    period = resource.get("effectivePeriod")
    if isinstance(period, dict) and period.get("start") is not None:
        return parse_fhir_time(period["start"], "effectivePeriod.start")
    if resource.get("issued") is not None:
        return parse_fhir_time(resource["issued"], "issued")
    raise UnparseableTime(f"no time ({', '.join(TIME_FIELDS)} all missing)")


def resolve_unit(name: str, system: Any, code: Any, unit: Any) -> str:
    """The schema spelling of a Quantity's unit for ``name``: its UCUM ``code`` (when the system
    is UCUM or unstated), else its ``unit`` text; :class:`UnknownUnit` when neither is accepted."""
    v = VARIABLES[name]
    candidates = []
    if isinstance(code, str) and (system is None or system == UCUM_SYSTEM):
        candidates.append(UCUM_UNITS.get(code, code))
    if isinstance(unit, str):
        candidates.append(unit)
    if not candidates:
        candidates.append("")
    for candidate in candidates:
        try:
            v.conversion(candidate)
        except UnknownUnit:
            continue
        return candidate
    shown = dict.fromkeys(x for x in (code, unit) if isinstance(x, str))  # once if equal
    given = " / ".join(repr(x) for x in shown)
    accepted = ", ".join(u if u else "'' (none)" for u in v.accepted_units)
    raise UnknownUnit(f"unknown unit {given or '(none)'} for {name}; accepted: {accepted}")


def _no_value(name: str, element: dict[str, Any], wanted: str) -> MissingValue:
    note = ""
    if isinstance(element.get("dataAbsentReason"), dict):
        codes = [c for _, c in _codings(element["dataAbsentReason"]) if c]
        note = f" (dataAbsentReason {codes[0]})" if codes else " (dataAbsentReason)"
    else:
        other = [k for k in _OTHER_VALUES if k != wanted and element.get(k) is not None]
        if other:
            note = f" ({other[0]} instead)"
    return MissingValue(f"no {wanted} for {name}{note}")


def _value(name: str, element: dict[str, Any]) -> float | None:
    """The canonical value of one measurement; None for a coded answer that is no value."""
    answers = ANSWERS.get(name)
    if answers is not None:
        concept = element.get("valueCodeableConcept")
        codings = _codings(concept)
        if not codings:
            raise _no_value(name, element, "valueCodeableConcept")
        for system, code in codings:
            if (system, code) in answers:  # type: ignore[comparison-overlap]
                return answers[(system, code)]  # type: ignore[index]
        raise UnparseableValue(
            f"unknown answer {', '.join(code_label(*c) for c in codings)} for {name}"
        )
    q = element.get("valueQuantity")
    if not isinstance(q, dict) or q.get("value") is None:
        raise _no_value(name, element, "valueQuantity")
    value = q["value"]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UnparseableValue(
            f"unparseable value for {name}: a JSON {type(value).__name__}, not a number"
        )
    comparator = q.get("comparator")
    if comparator is not None:
        raise UnparseableValue(
            f"value {comparator}{value!r} for {name} is a bound, not a measurement"
        )
    unit = resolve_unit(name, q.get("system"), q.get("code"), q.get("unit"))
    try:
        number = float(value)
    except OverflowError:
        raise UnparseableValue(f"unparseable value for {name}: too large a number") from None
    return convert(name, number, unit)


def check_observation(value: Any) -> ObservationRecord | Skipped | UnknownCode:
    """One parsed Observation line → accepted, skipped or unknown; or a :class:`RowRejected`."""
    resource = _resource(value, "Observation")
    status = resource.get("status")
    if isinstance(status, str) and status in SKIPPED_STATUSES:
        return Skipped(f"status {status}")
    parts = _parts(resource)
    if not parts:
        if _is_panel(resource.get("code")):
            raise MissingValue("blood-pressure panel without systolic or diastolic component")
        return UnknownCode(_unknown_label(resource.get("code")))
    patient = _patient_id(resource)
    when = _time(resource)
    measured = [(name, _value(name, element)) for name, element in parts]
    kept = tuple((name, v) for name, v in measured if v is not None)
    if not kept:
        return Skipped(f"{measured[0][0]} answer carries no value")
    return ObservationRecord(patient, when, kept)


def check_patient(value: Any) -> PatientRecord:
    """One parsed Patient line → its id, birth date and sex; or a :class:`RowRejected`."""
    resource = _resource(value, "Patient")
    pid = resource.get("id")
    if not isinstance(pid, str) or not _FHIR_ID.fullmatch(pid):
        raise MissingId("Patient without a valid id" if pid is not None else "Patient without id")
    birth: date | None = None
    raw = resource.get("birthDate")
    if raw is not None:
        if not isinstance(raw, str) or not re.fullmatch(r"\d{4}(-\d{2}(-\d{2})?)?", raw):
            raise UnparseableTime("unparseable birthDate (expected YYYY-MM-DD)")
        if len(raw) == 10:
            try:
                birth = date.fromisoformat(raw)
            except ValueError:
                raise UnparseableTime("unparseable birthDate (no such date)") from None
    gender = resource.get("gender")
    return PatientRecord(pid, birth, GENDER_SEX.get(gender) if isinstance(gender, str) else None)
