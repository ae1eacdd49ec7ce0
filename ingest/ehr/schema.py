"""The one declaration of the EHR variables the models use: units, conversions, hard ranges.

Every variable has a *canonical* unit (what the models see) and a table of accepted unit
spellings, each with the linear conversion to the canonical unit. Unit spellings match
case-insensitively and ignoring blanks (:func:`normalise_unit`: ``"mg/dl"``, ``"MG / DL"`` and
``"mg/dL"`` are the same unit; ``"kg/m²"`` is ``"kg/m2"``). A unit that is not in the table is
rejected, never guessed: ``"mg"`` for glucose could be anything.

``low``/``high`` are *physiological* hard limits in the canonical unit, not reference ranges: a
value outside them is a unit slip or a typo (HbA1c 70 %, BMI 250), so the row is rejected as an
"impossible value". Flags (``sex``, ``smoker``) take exactly 0 or 1.

Extract formats (the generator in :mod:`medbatch.synth.ehr` writes both):

* long: ``patient_id,timestamp,variable,value,unit`` — one measurement per row;
* wide: ``patient_id,timestamp`` then one column per variable, the unit in the header as
  ``<variable> (<unit>)``, e.g. ``hba1c (%)``, ``glucose (mg/dL)``; flags have no unit:
  ``smoker``. :func:`parse_wide_header` reads such a name, :func:`wide_header` writes one. An
  empty wide cell means "not measured at this visit", not an error.

Row checks (:func:`check_long_row`, :func:`check_wide_row`) raise :class:`RowRejected`
subclasses whose ``kind`` names the reason class and whose ``reason`` is the sentence shown to
the operator; a caller that knows the row number adds it with :meth:`RowRejected.at_row`.
Values must be plain decimals (``7.2``, ``-1``, ``1e3``): ``7,2`` is rejected, not read as a
European decimal comma, because ``7,200`` would be ambiguous. Timestamps must be ISO 8601
(``2024-03-05``, ``2024-03-05T08:42:00``, optionally with a UTC offset); ``05/03/2024`` is
rejected because day/month order cannot be known.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from types import MappingProxyType
from typing import TYPE_CHECKING

from core.errors import ConfigurationError
from core.model_registry import served_model
from core.served_models import ServedModel

if TYPE_CHECKING:
    from core.settings import Settings

__all__ = [
    "VARIABLES",
    "BlankRow",
    "ImpossibleValue",
    "Linear",
    "Measurement",
    "MissingId",
    "ModelSchema",
    "RowRejected",
    "UnknownUnit",
    "UnknownVariable",
    "UnparseableTime",
    "UnparseableValue",
    "Variable",
    "WrongFieldCount",
    "check_long_row",
    "check_wide_row",
    "convert",
    "model_schema",
    "normalise_unit",
    "parse_patient_id",
    "parse_timestamp",
    "parse_value",
    "parse_wide_header",
    "variable",
    "wide_header",
]

LONG_COLUMNS = ("patient_id", "timestamp", "variable", "value", "unit")
WIDE_KEY_COLUMNS = ("patient_id", "timestamp")


# ------------------------------------------------------------------------------- rejections
class RowRejected(ValueError):
    """A row that cannot be used; ``reason`` is for the operator, ``kind`` for counting."""

    kind = "rejected"

    def __init__(self, reason: str, *, row: int | None = None) -> None:
        super().__init__(reason if row is None else f"row {row}: {reason}")
        self.reason = reason
        self.row = row

    def at_row(self, row: int) -> RowRejected:
        """The same rejection with the row (line) number, for the per-row error report."""
        return type(self)(self.reason, row=row)


class BlankRow(RowRejected):
    kind = "blank_line"


class WrongFieldCount(RowRejected):
    kind = "wrong_field_count"


class MissingId(RowRejected):
    kind = "missing_id"


class UnparseableTime(RowRejected):
    kind = "unparseable_time"


class UnparseableValue(RowRejected):
    kind = "unparseable_value"


class UnknownVariable(RowRejected):
    kind = "unknown_variable"


class UnknownUnit(RowRejected):
    kind = "unknown_unit"


class ImpossibleValue(RowRejected):
    kind = "impossible_value"


# ------------------------------------------------------------------------------- variables
@dataclass(frozen=True)
class Linear:
    """``canonical = value * scale + offset``; linear so that it can be inverted exactly (the
    synthetic generator writes canonical values in other units)."""

    scale: float = 1.0
    offset: float = 0.0

    def to_canonical(self, value: float) -> float:
        return value * self.scale + self.offset

    def from_canonical(self, value: float) -> float:
        return (value - self.offset) / self.scale

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.offset == 0.0


IDENTITY = Linear()
#: IFCC ↔ NGSP master equation: mmol/mol = 10.929 × (% − 2.15), so % = mmol/mol / 10.929 + 2.15.
HBA1C_FROM_IFCC = Linear(1 / 10.929, 2.15)
GLUCOSE_FROM_MG_DL = Linear(1 / 18.016)  # molar mass of glucose 180.16 g/mol
CHOLESTEROL_FROM_MG_DL = Linear(1 / 38.67)  # total, LDL and HDL cholesterol
TRIGLYCERIDES_FROM_MG_DL = Linear(1 / 88.57)


def normalise_unit(text: str) -> str:
    """Unit spelling for matching: lower case, no blanks, ``²``/``^2`` as ``2``, ``µ`` as ``u``."""
    out = "".join(text.split()).lower()
    return out.replace("²", "2").replace("^2", "2").replace("µ", "u").replace("μ", "u")


def _name_key(text: str) -> str:
    return "_".join(text.strip().lower().replace("-", " ").split())


def _fmt(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Variable:
    """One measured quantity; ``units`` maps accepted spellings to the conversion into
    ``canonical_unit``; ``low``/``high`` are hard physiological limits in the canonical unit."""

    name: str
    canonical_unit: str
    units: Mapping[str, Linear] = field(hash=False)
    low: float
    high: float
    description: str
    aliases: tuple[str, ...] = ()
    flag: bool = False  # values are exactly 0 or 1
    _lookup: Mapping[str, Linear] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        lookup = {normalise_unit(u): conv for u, conv in self.units.items()}
        if normalise_unit(self.canonical_unit) not in lookup:
            raise ValueError(f"{self.name}: canonical unit {self.canonical_unit!r} not in units")
        object.__setattr__(self, "units", MappingProxyType(dict(self.units)))
        object.__setattr__(self, "_lookup", MappingProxyType(lookup))

    @property
    def accepted_units(self) -> tuple[str, ...]:
        """The accepted spellings, for messages (one per normalised unit, sorted)."""
        seen: dict[str, str] = {}
        for u in self.units:
            seen.setdefault(normalise_unit(u), u)
        return tuple(sorted(seen.values(), key=str.lower))

    def conversion(self, unit: str) -> Linear:
        """The conversion of ``unit`` into the canonical unit, or :class:`UnknownUnit`."""
        conv = self.units.get(unit)  # fast path: a declared spelling as is
        if conv is None:
            conv = self._lookup.get(normalise_unit(unit))
        if conv is None:
            accepted = ", ".join(u if u else "'' (none)" for u in self.accepted_units)
            raise UnknownUnit(
                f"unknown unit {unit.strip()!r} for {self.name}; accepted: {accepted}"
            )
        return conv

    def range_text(self) -> str:
        unit = f" {self.canonical_unit}" if self.canonical_unit else ""
        return f"{_fmt(self.low)}–{_fmt(self.high)}{unit}"


def _units(canonical: str, *pairs: tuple[str, Linear]) -> dict[str, Linear]:
    return {canonical: IDENTITY, **dict(pairs)}


_MG_DL_CHOL = ("mg/dL", CHOLESTEROL_FROM_MG_DL)
_MMOL_L = "mmol/L"
_FLAG_UNITS = {"": IDENTITY, "flag": IDENTITY}

_DECLARED = (
    Variable(
        "age",
        "years",
        _units("years", ("y", IDENTITY), ("yr", IDENTITY), ("yrs", IDENTITY)),
        0,
        120,
        "age at the visit in completed years",
    ),
    Variable("sex", "", _FLAG_UNITS, 0, 1, "0 = female, 1 = male", flag=True),
    Variable(
        "smoker", "", _FLAG_UNITS, 0, 1, "current smoker (0/1)", aliases=("smoking",), flag=True
    ),
    Variable(
        "hba1c",
        "%",
        _units("%", ("mmol/mol", HBA1C_FROM_IFCC)),
        3,
        20,
        "glycated haemoglobin, NGSP/DCCT %; IFCC mmol/mol converted by the master equation",
        aliases=("a1c", "hb_a1c", "glycated_hemoglobin"),
    ),
    Variable(
        "glucose",
        _MMOL_L,
        _units(_MMOL_L, ("mg/dL", GLUCOSE_FROM_MG_DL)),
        1,
        60,
        "plasma glucose (fasting where recorded as such)",
        aliases=("fasting_glucose", "plasma_glucose", "glu"),
    ),
    Variable(
        "sbp",
        "mmHg",
        _units("mmHg"),
        50,
        300,
        "systolic blood pressure",
        aliases=("systolic_bp", "systolic"),
    ),
    Variable(
        "dbp",
        "mmHg",
        _units("mmHg"),
        20,
        200,
        "diastolic blood pressure",
        aliases=("diastolic_bp", "diastolic"),
    ),
    Variable("bmi", "kg/m2", _units("kg/m2"), 10, 90, "body-mass index"),
    Variable(
        "total_cholesterol",
        _MMOL_L,
        _units(_MMOL_L, _MG_DL_CHOL),
        1,
        25,
        "total serum cholesterol",
        aliases=("tc", "cholesterol", "chol"),
    ),
    Variable(
        "ldl",
        _MMOL_L,
        _units(_MMOL_L, _MG_DL_CHOL),
        0.1,
        20,
        "LDL cholesterol",
        aliases=("ldl_c", "ldl_cholesterol"),
    ),
    Variable(
        "hdl",
        _MMOL_L,
        _units(_MMOL_L, _MG_DL_CHOL),
        0.1,
        5,
        "HDL cholesterol",
        aliases=("hdl_c", "hdl_cholesterol"),
    ),
    Variable(
        "triglycerides",
        _MMOL_L,
        _units(_MMOL_L, ("mg/dL", TRIGLYCERIDES_FROM_MG_DL)),
        0.1,
        60,
        "serum triglycerides",
        aliases=("tg", "trig"),
    ),
    Variable(
        "egfr",
        "mL/min/1.73m2",
        _units("mL/min/1.73m2"),
        1,
        200,
        "estimated glomerular filtration rate",
        aliases=("gfr",),
    ),
)

#: Every variable by canonical name, in declaration order.
VARIABLES: Mapping[str, Variable] = MappingProxyType({v.name: v for v in _DECLARED})
_BY_KEY: dict[str, Variable] = {
    key: v for v in _DECLARED for key in (v.name, *(_name_key(a) for a in v.aliases))
}


def variable(name: str | Variable) -> Variable:
    """The variable called ``name`` (case-insensitive; aliases such as ``a1c`` or ``tg``)."""
    if isinstance(name, Variable):
        return name
    found = _BY_KEY.get(_name_key(name))
    if found is None:
        raise UnknownVariable(f"unknown variable {name.strip()!r}; known: {', '.join(VARIABLES)}")
    return found


def convert(var: str | Variable, value: float, unit: str) -> float:
    """``value`` in ``unit`` as the canonical unit of ``var``, checked against the hard range.

    Raises :class:`UnknownVariable`, :class:`UnknownUnit`, :class:`UnparseableValue` (NaN or
    infinite) or :class:`ImpossibleValue`.
    """
    v = variable(var)
    conv = v.conversion(unit)
    if not math.isfinite(value):
        raise UnparseableValue(f"unparseable value {value!r} for {v.name}")
    canonical = conv.to_canonical(value)
    if v.flag:
        if canonical not in (0.0, 1.0):
            raise ImpossibleValue(f"impossible value {float(value)!r} for {v.name} (flag: 0 or 1)")
        return canonical
    if not v.low <= canonical <= v.high:
        given = f"{float(value)!r} {unit.strip()}".rstrip()
        if not conv.is_identity:
            given += f" (= {canonical:.1f} {v.canonical_unit})"
        raise ImpossibleValue(
            f"impossible value {given} for {v.name} (physiological range {v.range_text()})"
        )
    return canonical


# ------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSchema:
    """The inputs of one model, in input order; ``sequence`` models see up to ``max_visits``
    visits per patient (the most recent), tabular models one profile per patient."""

    name: str
    variables: tuple[str, ...]
    sequence: bool
    max_visits: int | None
    description: str = ""

    def __post_init__(self) -> None:
        for name in self.variables:
            if name not in VARIABLES:
                raise ValueError(f"model {self.name}: undeclared variable {name!r}")
        if self.sequence != (self.max_visits is not None):
            raise ValueError(f"model {self.name}: max_visits goes with sequence models only")


def model_schema(name: str, settings: Settings | None = None) -> ModelSchema:
    """The inputs of EHR model ``name``, as its entry in the model registry declares them."""
    try:
        model = served_model(name, settings)
    except ConfigurationError as exc:
        raise KeyError(str(exc)) from None
    if not model.variables:
        raise KeyError(f"{name} is not an EHR model: it declares no EHR variables")
    return _schema(model)


@cache
def _schema(model: ServedModel) -> ModelSchema:
    return ModelSchema(
        model.name,
        model.variables,
        sequence=model.max_visits is not None,
        max_visits=model.max_visits,
        description=model.description,
    )


# ------------------------------------------------------------------------------- fields
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_ISO = re.compile(
    r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?)?(?:Z|[+-]\d{2}:?\d{2})?"
)


def parse_value(text: str, what: str = "value") -> float:
    """A plain decimal number; anything else (``7,2``, ``7..2``, ``abc``, empty, ``nan``)
    raises :class:`UnparseableValue`."""
    s = text.strip()
    if not _NUMBER.fullmatch(s):
        raise UnparseableValue(f"unparseable {what} {text!r}")
    return float(s)


def parse_timestamp(text: str) -> datetime:
    """An ISO 8601 date or date-time; anything else raises :class:`UnparseableTime`."""
    s = text.strip()
    if _ISO.fullmatch(s):
        try:
            return datetime.fromisoformat(s)
        except ValueError:
            pass
    raise UnparseableTime(f"unparseable timestamp {text!r} (expected ISO 8601, 2024-03-05T08:42)")


def parse_patient_id(text: str) -> str:
    s = text.strip()
    if not s:
        raise MissingId("missing patient_id")
    return s


@dataclass(frozen=True)
class Measurement:
    """One accepted measurement, value in the variable's canonical unit."""

    patient_id: str
    timestamp: datetime
    variable: str
    value: float


def check_long_row(fields: Sequence[str]) -> Measurement:
    """One long-format row (``patient_id,timestamp,variable,value,unit``) → a measurement, or
    the first reason it is rejected."""
    if not fields or all(not f.strip() for f in fields):
        raise BlankRow("blank line")
    if len(fields) != len(LONG_COLUMNS):
        raise WrongFieldCount(f"{len(fields)} fields, expected {len(LONG_COLUMNS)}")
    pid = parse_patient_id(fields[0])
    when = parse_timestamp(fields[1])
    var = variable(fields[2])
    value = parse_value(fields[3], f"value for {var.name}")
    return Measurement(pid, when, var.name, convert(var, value, fields[4]))


def wide_header(var: str | Variable, unit: str) -> str:
    """The wide-format column name ``<variable> (<unit>)``, or just ``<variable>`` without unit."""
    v = variable(var)
    v.conversion(unit)
    return f"{v.name} ({unit})" if unit else v.name


_HEADER = re.compile(r"\s*([^()]*?)\s*(?:\(([^()]*)\))?\s*")


def parse_wide_header(name: str) -> tuple[str, str]:
    """``"glucose (mg/dL)"`` → ``("glucose", "mg/dL")``; ``"smoker"`` → ``("smoker", "")``.

    The variable is resolved to its canonical name and the unit checked: an unknown variable or
    unit in a header rejects the whole file, so raise before any row is read.
    """
    m = _HEADER.fullmatch(name)
    if m is None or not m.group(1):
        raise UnknownVariable(f"unreadable wide column header {name!r}; expected 'name (unit)'")
    v = variable(m.group(1))
    unit = (m.group(2) or "").strip()
    v.conversion(unit)
    return v.name, unit


def check_wide_row(fields: Sequence[str], columns: Sequence[tuple[str, str]]) -> list[Measurement]:
    """One wide row → its measurements (empty cells skipped). ``columns`` are the parsed headers
    after ``patient_id,timestamp``. Any bad cell rejects the whole row: a visit with one
    corrupted value is not trusted for the others either."""
    if not fields or all(not f.strip() for f in fields):
        raise BlankRow("blank line")
    expected = len(WIDE_KEY_COLUMNS) + len(columns)
    if len(fields) != expected:
        raise WrongFieldCount(f"{len(fields)} fields, expected {expected}")
    pid = parse_patient_id(fields[0])
    when = parse_timestamp(fields[1])
    out = []
    for (name, unit), cell in zip(columns, fields[2:], strict=True):
        if not cell.strip():
            continue
        value = parse_value(cell, f"value for {name}")
        out.append(Measurement(pid, when, name, convert(name, value, unit)))
    return out
