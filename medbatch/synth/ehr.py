"""Deterministic synthetic EHR extracts with a known ground-truth risk mechanism.

No real EHR data ships offline, so the reference models for nightly bulk scoring
(``diabetes_lstm_attention``, ``cvd_autoencoder``) are trained and tested on this generator.

**Patients.** Each patient has a latent state drawn from one :class:`numpy.random.Generator`
seeded by ``(seed, 0, index)``: age at the first visit, sex, baseline BMI, type-2 diabetes
(more likely with BMI and age), diabetes duration, treatment adherence (Beta(4, 2)), smoking,
personal blood-pressure, lipid and kidney levels. Visits: 1–20 (negative binomial, more for
diabetics), gaps of ~4–7 months with occasional 1–2.5-year losses to follow-up, starting
2014–2021. Per visit, true values follow correlated trajectories:

* HbA1c (%): diabetic baseline 6.6 + 2·(1 − adherence) + 0.04·duration, drifting by
  0.45·(0.62 − adherence) %/year (poor adherence rises, good adherence falls); non-diabetic
  ~5.3–6.4 with a slow rise; visit noise.
* glucose (mmol/L) tracks HbA1c: 1.45·HbA1c − 2.9 + noise growing with HbA1c.
* BMI drifts slowly; SBP rises with age, BMI, male sex and diabetes (personal level + noise);
  DBP follows SBP; HDL falls with BMI, smoking and diabetes; triglycerides rise with BMI and
  HbA1c (log-normal); LDL is personal, lowered by statins in adherent diabetics; total
  cholesterol = LDL + HDL + TG/2.2 (Friedewald, mmol/L); eGFR falls ~0.8 mL/min/year, faster
  with diabetes, high baseline HbA1c and high SBP.

Not every variable is measured at every visit (the gaps of real follow-up): HbA1c at 85 % of
diabetic visits (45 % otherwise), glucose 75 %, BP 95 %, BMI 80 %, the lipid panel 50 %,
eGFR 60 %; age at every visit; sex and smoking status at the first visit (long format) or on
every row (wide format, as warehouses denormalise demographics).

**Ground truth** (:class:`Truth`, computed from the true per-visit values of *all* visits,
measured or not; labels ~ Bernoulli(probability) from the patient's generator):

* diabetes complication::

      z = −2.5 + 1.2·max(mean HbA1c − 7, 0) + 0.6·max(max HbA1c − 9, 0)
          + 1.5·max(HbA1c slope, 0) + 0.03·(mean SBP − 130)
          + 0.15·max(−eGFR slope − 1, 0) + 0.08·diabetes duration at the last visit
      p = 1 / (1 + exp(−z))

  slopes are least-squares per year over the visits (0 when the visits span < 1 year);
* CVD (Framingham-like, profile at the last visit)::

      z = −2.2 + 0.07·(age − 55) + 0.55·male + 0.02·(SBP − 130)
          + 0.4·(total cholesterol / HDL − 4) + 0.75·smoker + 0.3·max(HbA1c − 6, 0)
      p = 1 / (1 + exp(−z))

**Extracts.** :func:`write_long_csv` and :func:`write_wide_csv` stream patients to CSV one at a
time (memory does not grow with the file). Valid rows mix units (HbA1c in mmol/mol, glucose
and lipids in mg/dL, spelling variants such as ``mg/dl``, ``MMOL/L``, ``mm Hg``) at rate
``unit_mix``. At rate ``messiness`` a row is broken with exactly one defect, one kind drawn
uniformly: ``missing_id``, ``unparseable_time`` (``2024-13-45``, ``31/01/2020``),
``unparseable_value`` (``7,2``, ``7..2``, ``abc``), ``impossible_value`` (HbA1c 70 %, negative
values), ``unknown_unit`` (``mg``; long format only) and ``blank_line``. The kinds are those of
:mod:`ingest.ehr.schema`'s rejections. Two sidecars, never the extract, hold what an ingest must
not see: ``<path>.truth.csv`` (per patient: mechanism features, probabilities, labels) and
``<path>.defects.csv`` (``line,kind`` per broken row; line 1 is the header).

Rows are grouped by patient with visits in time order; an ingest must not rely on that.
This is synthetic data for exercising the pipeline and the reference models, not a model of
human physiology or of any population.
"""

from __future__ import annotations

import csv
import functools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import TextIO

import numpy as np
import numpy.typing as npt

from ingest.ehr.schema import (
    LONG_COLUMNS,
    VARIABLES,
    WIDE_KEY_COLUMNS,
    Linear,
    normalise_unit,
    wide_header,
)

__all__ = [
    "BROKEN_KINDS_LONG",
    "BROKEN_KINDS_WIDE",
    "TRUTH_COLUMNS",
    "WIDE_UNITS",
    "Patient",
    "SynthStats",
    "Truth",
    "Visit",
    "cvd_probability",
    "diabetes_complication_probability",
    "synth_patient",
    "synth_patients",
    "write_long_csv",
    "write_wide_csv",
]

FloatArray = npt.NDArray[np.float64]

#: Order of the variables within a visit in the long format (and of the wide columns).
VARIABLE_ORDER = (
    "age",
    "sex",
    "smoker",
    "hba1c",
    "glucose",
    "sbp",
    "dbp",
    "bmi",
    "total_cholesterol",
    "ldl",
    "hdl",
    "triglycerides",
    "egfr",
)
#: The unit of each wide column (US conventional units for the labs, so the ingest converts).
WIDE_UNITS: Mapping[str, str] = MappingProxyType(
    {
        "age": "years",
        "sex": "",
        "smoker": "",
        "hba1c": "%",
        "glucose": "mg/dL",
        "sbp": "mmHg",
        "dbp": "mmHg",
        "bmi": "kg/m2",
        "total_cholesterol": "mg/dL",
        "ldl": "mg/dL",
        "hdl": "mg/dL",
        "triglycerides": "mg/dL",
        "egfr": "mL/min/1.73m2",
    }
)
#: Unit spellings the long format uses besides the canonical one (unit mix).
_ALT_UNITS: dict[str, tuple[str, ...]] = {
    "hba1c": ("mmol/mol", "mmol/mol", "MMOL/MOL"),
    "glucose": ("mg/dL", "mg/dl", "MG/DL", "mmol/l"),
    "total_cholesterol": ("mg/dL", "mg/dl", "MMOL/L"),
    "ldl": ("mg/dL", "mg/dl", "mmol/l"),
    "hdl": ("mg/dL", "mg/dl", "mmol/l"),
    "triglycerides": ("mg/dL", "mg/dl"),
    "sbp": ("mm Hg", "mmhg"),
    "dbp": ("mm Hg", "mmhg"),
    "bmi": ("kg/m²", "kg/m^2"),
    "egfr": ("mL/min/1.73 m²", "ml/min/1.73m2"),
    "age": ("y", "yrs"),
    "sex": ("flag",),
    "smoker": ("flag",),
}
#: Decimal places by normalised unit (mg/dL and mmol/mol are written as integers, as labs do).
_DECIMALS_BY_UNIT = {"%": 1, "mmol/mol": 0, "mg/dl": 0, "mmhg": 0, "kg/m2": 1, "years": 0}
_DECIMALS_MMOL_L = {"glucose": 1}  # lipids in mmol/L: 2 decimals

BROKEN_KINDS_LONG = (
    "missing_id",
    "unparseable_time",
    "unparseable_value",
    "impossible_value",
    "unknown_unit",
    "blank_line",
)
BROKEN_KINDS_WIDE = tuple(k for k in BROKEN_KINDS_LONG if k != "unknown_unit")
_BAD_UNITS = ("mg", "mmol", "g/L", "IU", "mg/L", "pct", "units", "mmol/dL")
_TYPO_WORDS = ("abc", "n/a", "#VALUE!", "?", "pending")

TRUTH_COLUMNS = (
    "patient_id",
    "n_visits",
    "first_visit",
    "last_visit",
    "diabetic",
    "duration_years",
    "adherence",
    "hba1c_mean",
    "hba1c_max",
    "hba1c_slope",
    "sbp_mean",
    "egfr_slope",
    "age_last",
    "male",
    "smoker",
    "sbp_last",
    "tc_hdl_ratio",
    "hba1c_last",
    "diabetes_complication_prob",
    "diabetes_complication_label",
    "cvd_prob",
    "cvd_label",
)

_EPOCH = datetime(2014, 1, 1)
_MRN_SPACE = 10**8


# ------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Visit:
    """One visit: ``values`` are the true values of every variable (canonical units);
    ``measured`` the ones recorded at this visit, in :data:`VARIABLE_ORDER`."""

    when: datetime
    values: Mapping[str, float]
    measured: tuple[str, ...]


@dataclass(frozen=True)
class Truth:
    """The ground truth of one patient: the mechanism's inputs, probabilities and labels."""

    features: Mapping[str, float]
    diabetes_complication_prob: float
    diabetes_complication_label: int
    cvd_prob: float
    cvd_label: int


@dataclass(frozen=True)
class Patient:
    index: int
    patient_id: str
    male: int
    smoker: int
    diabetic: int
    duration_years: float  # diabetes duration at the first visit (0 if not diabetic)
    adherence: float
    visits: tuple[Visit, ...]
    truth: Truth


@dataclass(frozen=True)
class SynthStats:
    """What a writer produced. ``rows`` counts data lines (header excluded, blank lines
    included); ``rows == valid_rows + sum(broken.values())``. ``converted_rows``: valid rows
    whose unit is not the canonical one (long) or valid cells in a non-canonical unit (wide)."""

    path: Path
    fmt: str
    patients: int
    visits: int
    rows: int
    valid_rows: int
    broken: Mapping[str, int]
    converted_rows: int
    diabetes_positives: int
    cvd_positives: int
    truth_path: Path
    defects_path: Path
    measurements: int = 0  # valid measurements (= valid_rows in long; non-empty cells in wide)

    @property
    def broken_rows(self) -> int:
        return sum(self.broken.values())


# ------------------------------------------------------------------------------- mechanism
def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def diabetes_complication_probability(f: Mapping[str, float]) -> float:
    """The documented complication mechanism (see the module docstring)."""
    z = (
        -2.5
        + 1.2 * max(f["hba1c_mean"] - 7.0, 0.0)
        + 0.6 * max(f["hba1c_max"] - 9.0, 0.0)
        + 1.5 * max(f["hba1c_slope"], 0.0)
        + 0.03 * (f["sbp_mean"] - 130.0)
        + 0.15 * max(-f["egfr_slope"] - 1.0, 0.0)
        + 0.08 * f["duration_years"]
    )
    return _sigmoid(z)


def cvd_probability(f: Mapping[str, float]) -> float:
    """The documented Framingham-like CVD mechanism (see the module docstring)."""
    z = (
        -2.2
        + 0.07 * (f["age_last"] - 55.0)
        + 0.55 * f["male"]
        + 0.02 * (f["sbp_last"] - 130.0)
        + 0.4 * (f["tc_hdl_ratio"] - 4.0)
        + 0.75 * f["smoker"]
        + 0.3 * max(f["hba1c_last"] - 6.0, 0.0)
    )
    return _sigmoid(z)


def _slope(t: FloatArray, y: FloatArray) -> float:
    """Least-squares slope per year; 0 when the visits span under a year (too noisy)."""
    if t[-1] - t[0] < 1.0:
        return 0.0
    tc = t - t.mean()
    return float((tc * (y - y.mean())).sum() / (tc * tc).sum())


# ------------------------------------------------------------------------------- patients
def _mrn_params(seed: int) -> tuple[int, int]:
    """MRN = ``MRN`` + 8 digits of (a·index + b) mod 10^8, a coprime to 10^8: unique per seed."""
    rng = np.random.default_rng([seed, 2])
    a = int(rng.integers(10**6, _MRN_SPACE)) | 1
    if a % 5 == 0:
        a += 2
    return a, int(rng.integers(0, _MRN_SPACE))


def synth_patient(seed: int, index: int, *, mrn: tuple[int, int] | None = None) -> Patient:
    """Patient ``index`` of ``seed``: independent of how many others are generated."""
    if seed < 0 or index < 0:
        raise ValueError("seed and index must be non-negative")
    if index >= _MRN_SPACE:
        raise ValueError(f"at most {_MRN_SPACE} patients per seed")
    a, b = mrn if mrn is not None else _mrn_params(seed)
    rng = np.random.default_rng([seed, 0, index])
    n01 = rng.standard_normal

    age0 = float(np.clip(56 + 12 * n01(), 25, 85))
    male = int(rng.random() < 0.5)
    bmi0 = float(np.clip(math.exp(math.log(28.5) + 0.17 * n01()), 17, 55))
    diabetic = int(rng.random() < _sigmoid(-0.2 + 0.12 * (bmi0 - 28) + 0.04 * (age0 - 55)))
    duration0 = float(min(rng.exponential(6.0), age0 - 25)) if diabetic else 0.0
    adherence = float(rng.beta(4, 2))
    smoker = int(rng.random() < (0.28 if male else 0.2) * (1.0 if age0 < 70 else 0.6))
    statin = diabetic and rng.random() < 0.6 + 0.3 * adherence

    mean_visits = 6.0 if diabetic else 3.0
    n = int(min(1 + rng.negative_binomial(2, 2 / (2 + mean_visits)), 20))
    gaps = rng.exponential(110.0 if diabetic else 200.0, n) + 14.0
    gaps += np.where(rng.random(n) < 0.08, rng.uniform(365, 900, n), 0.0)
    gaps[0] = 0.0
    days = np.cumsum(gaps)
    start_day = int(rng.integers(0, 8 * 365))
    minutes = rng.integers(7 * 60, 18 * 60, n)
    t = days / 365.25

    # HbA1c (%) and glucose (mmol/L)
    if diabetic:
        h0 = 6.6 + 2.0 * (1 - adherence) + 0.04 * duration0 + 0.7 * n01()
        h_slope = 0.45 * (0.62 - adherence) + 0.2 * n01()
        hba1c = np.clip(h0 + h_slope * t + 0.25 * rng.standard_normal(n), 5.0, 15.5)
    else:
        h0 = 5.3 + 0.02 * (bmi0 - 28) + 0.25 * n01()
        h_slope = 0.03 + 0.03 * n01()
        hba1c = np.clip(h0 + h_slope * t + 0.1 * rng.standard_normal(n), 4.2, 6.4)
    glucose = 1.45 * hba1c - 2.9 + (0.4 + 0.08 * (hba1c - 5)) * rng.standard_normal(n)
    glucose = np.clip(glucose, 3.2, 28.0)

    bmi = np.clip(bmi0 + 0.35 * n01() * t + 0.4 * rng.standard_normal(n), 15, 65)
    age = age0 + t
    sbp_person = 112 + 0.55 * (age0 - 40) + 0.7 * (bmi0 - 25) + 4 * male + 5 * diabetic
    sbp_person += 9 * n01()
    sbp = sbp_person + 0.55 * t + 0.7 * (bmi - bmi0) + 7 * rng.standard_normal(n)
    sbp = np.clip(sbp, 85, 220)
    dbp = 0.42 * sbp + 22 + 3 * male - 0.12 * (age - 50) + 4 * n01() + 4 * rng.standard_normal(n)
    dbp = np.clip(np.minimum(dbp, sbp - 20), 45, 130)

    ldl0 = float(np.clip(3.3 + 0.015 * (age0 - 50) + 0.8 * n01(), 1.2, 7.0))
    ldl = ldl0 - 0.9 * adherence * statin * (t > 0.25) + 0.25 * rng.standard_normal(n)
    ldl = np.clip(ldl, 0.8, 8.0)
    hdl_person = (1.25 if male else 1.55) - 0.12 * smoker - 0.1 * diabetic + 0.18 * n01()
    hdl = np.clip(hdl_person - 0.025 * (bmi - 28) + 0.08 * rng.standard_normal(n), 0.5, 3.0)
    tg_person = math.log(1.3) + 0.1 * male + 0.3 * n01()
    log_tg = tg_person + 0.03 * (bmi - 28) + 0.12 * (hba1c - 6) + 0.18 * rng.standard_normal(n)
    tg = np.clip(np.exp(log_tg), 0.4, 12.0)
    tc = np.clip(ldl + hdl + tg / 2.2, 2.5, 14.0)

    egfr0 = float(np.clip(105 - 0.9 * (age0 - 40) + 10 * n01(), 20, 130))
    decline = 0.8 + 0.06 * max(sbp_person - 130, 0) + 0.4 * n01()
    if diabetic:
        decline += 0.6 + 0.9 * max(h0 - 7, 0)
    egfr = np.clip(egfr0 - max(decline, 0.0) * t + 3.5 * rng.standard_normal(n), 6, 140)

    # what was measured at each visit
    u = rng.random((n, 6))
    p_hba1c = 0.85 if diabetic else 0.45
    series: dict[str, FloatArray] = {
        "age": age,
        "hba1c": hba1c,
        "glucose": glucose,
        "sbp": sbp,
        "dbp": dbp,
        "bmi": bmi,
        "total_cholesterol": tc,
        "ldl": ldl,
        "hdl": hdl,
        "triglycerides": tg,
        "egfr": egfr,
    }
    visits = []
    for i in range(n):
        taken = {"age", "sex", "smoker"} if i == 0 else {"age"}
        if u[i, 0] < p_hba1c:
            taken.add("hba1c")
        if u[i, 1] < 0.75:
            taken.add("glucose")
        if u[i, 2] < 0.95:
            taken.update(("sbp", "dbp"))
        if u[i, 3] < 0.8:
            taken.add("bmi")
        if u[i, 4] < 0.5:
            taken.update(("total_cholesterol", "ldl", "hdl", "triglycerides"))
        if u[i, 5] < 0.6:
            taken.add("egfr")
        values = {k: float(v[i]) for k, v in series.items()}
        values["sex"], values["smoker"] = float(male), float(smoker)
        day = start_day + int(days[i])  # a clinic time of day (07:00–17:59) on that date
        when = _EPOCH + timedelta(days=day, minutes=int(minutes[i]))
        visits.append(Visit(when, values, tuple(v for v in VARIABLE_ORDER if v in taken)))

    features = {
        "hba1c_mean": float(hba1c.mean()),
        "hba1c_max": float(hba1c.max()),
        "hba1c_slope": _slope(t, hba1c),
        "sbp_mean": float(sbp.mean()),
        "egfr_slope": _slope(t, egfr),
        "duration_years": duration0 + float(t[-1]) if diabetic else 0.0,
        "age_last": float(age[-1]),
        "male": float(male),
        "smoker": float(smoker),
        "sbp_last": float(sbp[-1]),
        "tc_hdl_ratio": float(tc[-1] / hdl[-1]),
        "hba1c_last": float(hba1c[-1]),
    }
    p_dm = diabetes_complication_probability(features)
    p_cvd = cvd_probability(features)
    truth = Truth(
        MappingProxyType(features),
        p_dm,
        int(rng.random() < p_dm),
        p_cvd,
        int(rng.random() < p_cvd),
    )
    return Patient(
        index=index,
        patient_id=f"MRN{(a * index + b) % _MRN_SPACE:08d}",
        male=male,
        smoker=smoker,
        diabetic=diabetic,
        duration_years=duration0,
        adherence=adherence,
        visits=tuple(visits),
        truth=truth,
    )


def _iter_patients(n: int, seed: int) -> Iterator[Patient]:
    mrn = _mrn_params(seed)
    for i in range(n):
        yield synth_patient(seed, i, mrn=mrn)


def synth_patients(n: int, seed: int) -> list[Patient]:
    """``n`` patients of ``seed`` (the first ``k`` are the same for every ``n ≥ k``)."""
    if n < 0:
        raise ValueError("n must be ≥ 0")
    return list(_iter_patients(n, seed))


# ------------------------------------------------------------------------------- writing
def _decimals(var: str, unit: str) -> int:
    if var in ("sex", "smoker"):
        return 0
    key = normalise_unit(unit)
    if key in _DECIMALS_BY_UNIT:
        return _DECIMALS_BY_UNIT[key]
    if key == "mmol/l":
        return _DECIMALS_MMOL_L.get(var, 2)
    return 0 if var in ("egfr", "age") else 1


@functools.cache
def _spec(var: str, unit: str) -> tuple[Linear, int]:
    return VARIABLES[var].conversion(unit), _decimals(var, unit)


def _format(var: str, canonical: float, unit: str) -> str:
    if var == "age":
        return str(math.floor(canonical))  # completed years
    conv, decimals = _spec(var, unit)
    return f"{conv.from_canonical(canonical):.{decimals}f}"


def _timestamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S")


class _Mess:
    """Draws the defects of one patient's rows (its own generator: the defects of a patient do
    not depend on the rows before it)."""

    def __init__(self, seed: int, index: int) -> None:
        self.rng = np.random.default_rng([seed, 1, index])

    def pick(self, options: tuple[str, ...]) -> str:
        return options[int(self.rng.integers(len(options)))]

    def missing_id(self) -> str:
        return self.pick(("", " ", "   "))

    def bad_time(self, when: datetime) -> str:
        y, m, d = when.year, when.month, when.day
        return self.pick(
            (
                f"{y}-{12 + m}-{31 + d}",  # month 13+, day 32+
                f"{y}-02-30",
                f"{d:02d}/{m:02d}/{y}",
                f"{y}{m:02d}{d:02d}?",
                "",
                "N/A",
            )
        )

    def bad_value(self, text: str, *, allow_empty: bool) -> str:
        options = [text.replace(".", ",") if "." in text else f"{text},5"]
        options.append(text.replace(".", "..") if "." in text else f"{text[:1]}..{text[1:]}")
        options.append(f"{text}.1" if "." in text else f"{text}.1.1")
        options.append(self.pick(_TYPO_WORDS))
        if "0" in text:
            options.append(text.replace("0", "O"))
        if allow_empty:
            options.append("")
        return self.pick(tuple(options))

    def impossible(self, var: str, unit: str) -> str:
        v = VARIABLES[var]
        if v.flag:
            return self.pick(("2", "3", "9", "-1"))
        u = float(self.rng.random())
        if self.rng.random() < 0.7:
            canonical = v.high * (1.3 + 2.7 * u)
        else:
            canonical = -v.high * (0.2 + 0.8 * u)
        value = v.conversion(unit).from_canonical(canonical)
        return f"{value:.{_decimals(var, unit)}f}"

    def bad_unit(self, var: str) -> str:
        accepted = {normalise_unit(u) for u in VARIABLES[var].units}
        options = tuple(u for u in _BAD_UNITS if normalise_unit(u) not in accepted)
        return self.pick(options)


def _truth_row(p: Patient) -> list[object]:
    f = p.truth.features
    return [
        p.patient_id,
        len(p.visits),
        _timestamp(p.visits[0].when),
        _timestamp(p.visits[-1].when),
        p.diabetic,
        f"{f['duration_years']:.3f}",
        f"{p.adherence:.4f}",
        *(
            f"{f[k]:.4f}"
            for k in (
                "hba1c_mean",
                "hba1c_max",
                "hba1c_slope",
                "sbp_mean",
                "egfr_slope",
                "age_last",
            )
        ),
        p.male,
        p.smoker,
        f"{f['sbp_last']:.4f}",
        f"{f['tc_hdl_ratio']:.4f}",
        f"{f['hba1c_last']:.4f}",
        f"{p.truth.diabetes_complication_prob:.6f}",
        p.truth.diabetes_complication_label,
        f"{p.truth.cvd_prob:.6f}",
        p.truth.cvd_label,
    ]


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(f"{path.name}.{suffix}.csv")


def _check_rates(n_patients: int, seed: int, messiness: float, unit_mix: float) -> None:
    if n_patients < 0 or seed < 0:
        raise ValueError("n_patients and seed must be ≥ 0")
    for name, rate in (("messiness", messiness), ("unit_mix", unit_mix)):
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {rate}")


class _Writer:
    """The extract, its two sidecars and the running counts."""

    def __init__(self, path: Path, fmt: str, kinds: tuple[str, ...]) -> None:
        self.path = Path(path)
        self.fmt = fmt
        self.truth_path = _sidecar(self.path, "truth")
        self.defects_path = _sidecar(self.path, "defects")
        self.broken = dict.fromkeys(kinds, 0)
        self.rows = self.valid = self.converted = self.measurements = 0
        self.patients = self.visits = self.dm_pos = self.cvd_pos = 0
        self._files: list[TextIO] = []

    def __enter__(self) -> _Writer:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        opened: list[TextIO] = [
            open(p, "w", newline="", encoding="utf-8")  # noqa: SIM115
            for p in self._paths()
        ]
        self._files = opened
        self.out, self.truth, self.defects = (csv.writer(f, lineterminator="\n") for f in opened)
        self.truth.writerow(TRUTH_COLUMNS)
        self.defects.writerow(("line", "kind"))
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self._files:
            f.close()

    def _paths(self) -> tuple[Path, Path, Path]:
        return self.path, self.truth_path, self.defects_path

    def patient(self, p: Patient) -> None:
        self.patients += 1
        self.visits += len(p.visits)
        self.dm_pos += p.truth.diabetes_complication_label
        self.cvd_pos += p.truth.cvd_label
        self.truth.writerow(_truth_row(p))

    def row(self, fields: list[str], kind: str | None) -> None:
        self.rows += 1
        self.out.writerow(fields)
        if kind is None:
            self.valid += 1
        else:
            self.broken[kind] += 1
            self.defects.writerow((self.rows + 1, kind))  # +1: the header is line 1

    def stats(self) -> SynthStats:
        return SynthStats(
            path=self.path,
            fmt=self.fmt,
            patients=self.patients,
            visits=self.visits,
            rows=self.rows,
            valid_rows=self.valid,
            broken=MappingProxyType(dict(self.broken)),
            converted_rows=self.converted,
            diabetes_positives=self.dm_pos,
            cvd_positives=self.cvd_pos,
            truth_path=self.truth_path,
            defects_path=self.defects_path,
            measurements=self.measurements,
        )


def write_long_csv(
    path: Path, n_patients: int, seed: int, *, messiness: float = 0.02, unit_mix: float = 0.25
) -> SynthStats:
    """Stream a long extract (``patient_id,timestamp,variable,value,unit``) of ``n_patients``;
    byte-identical for the same arguments. Sidecars: ``<path>.truth.csv``,
    ``<path>.defects.csv``."""
    _check_rates(n_patients, seed, messiness, unit_mix)
    with _Writer(path, "long", BROKEN_KINDS_LONG) as w:
        w.out.writerow(LONG_COLUMNS)
        for p in _iter_patients(n_patients, seed):
            w.patient(p)
            mess = _Mess(seed, p.index)
            n_rows = sum(len(v.measured) for v in p.visits)
            u_broken = mess.rng.random(n_rows)
            u_unit = mess.rng.random(n_rows)
            r = 0
            for visit in p.visits:
                ts = _timestamp(visit.when)
                for var in visit.measured:
                    unit = VARIABLES[var].canonical_unit
                    if u_unit[r] < unit_mix:
                        unit = mess.pick(_ALT_UNITS[var])
                    fields = [p.patient_id, ts, var, _format(var, visit.values[var], unit), unit]
                    kind = None
                    if u_broken[r] < messiness:
                        kind = mess.pick(BROKEN_KINDS_LONG)
                        fields = _break_long(mess, kind, fields, visit.when)
                    elif not _spec(var, unit)[0].is_identity:
                        w.converted += 1
                    w.row(fields, kind)
                    r += 1
            w.measurements = w.valid
        return w.stats()


def _break_long(mess: _Mess, kind: str, fields: list[str], when: datetime) -> list[str]:
    pid, ts, var, value, unit = fields
    if kind == "blank_line":
        return []
    if kind == "missing_id":
        pid = mess.missing_id()
    elif kind == "unparseable_time":
        ts = mess.bad_time(when)
    elif kind == "unparseable_value":
        value = mess.bad_value(value, allow_empty=True)
    elif kind == "impossible_value":
        value = mess.impossible(var, unit)
    elif kind == "unknown_unit":
        unit = mess.bad_unit(var)
    return [pid, ts, var, value, unit]


def write_wide_csv(
    path: Path,
    n_patients: int,
    seed: int,
    *,
    messiness: float = 0.02,
    units: Mapping[str, str] = WIDE_UNITS,
) -> SynthStats:
    """Stream a wide extract: one row per visit, ``patient_id,timestamp`` then one column per
    variable named ``<variable> (<unit>)`` (:data:`WIDE_UNITS` by default); unmeasured cells
    are empty. Same patients and truth as :func:`write_long_csv` for the same seed."""
    _check_rates(n_patients, seed, messiness, 0.0)
    columns = [v for v in VARIABLE_ORDER if v in units]
    header = [*WIDE_KEY_COLUMNS, *(wide_header(v, units[v]) for v in columns)]
    non_canonical = {v for v in columns if not VARIABLES[v].conversion(units[v]).is_identity}
    with _Writer(path, "wide", BROKEN_KINDS_WIDE) as w:
        w.out.writerow(header)
        for p in _iter_patients(n_patients, seed):
            w.patient(p)
            mess = _Mess(seed, p.index)
            u_broken = mess.rng.random(len(p.visits))
            for i, visit in enumerate(p.visits):
                cells = [
                    _format(v, visit.values[v], units[v])
                    if v in visit.measured or v in ("sex", "smoker")
                    else ""
                    for v in columns
                ]
                fields = [p.patient_id, _timestamp(visit.when), *cells]
                kind = None
                if u_broken[i] < messiness:
                    kind = mess.pick(BROKEN_KINDS_WIDE)
                    fields = _break_wide(mess, kind, fields, visit.when, columns, units)
                else:
                    filled = [v for v, c in zip(columns, cells, strict=True) if c]
                    w.measurements += len(filled)
                    w.converted += sum(v in non_canonical for v in filled)
                w.row(fields, kind)
        return w.stats()


def _break_wide(
    mess: _Mess,
    kind: str,
    fields: list[str],
    when: datetime,
    columns: list[str],
    units: Mapping[str, str],
) -> list[str]:
    if kind == "blank_line":
        return []
    out = list(fields)
    if kind == "missing_id":
        out[0] = mess.missing_id()
    elif kind == "unparseable_time":
        out[1] = mess.bad_time(when)
    else:
        filled = [j for j in range(2, len(out)) if out[j]]
        j = filled[int(mess.rng.integers(len(filled)))]
        var = columns[j - 2]
        if kind == "unparseable_value":
            out[j] = mess.bad_value(out[j], allow_empty=False)
        else:
            out[j] = mess.impossible(var, units[var])
    return out
