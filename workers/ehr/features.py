"""Accepted measurements of one patient → the fixed-shape inputs of the EHR models (numpy only).

The same functions feed training (``triton_models/<model>/train.py``) and serving (the EHR
worker), so a model never sees features computed two ways. Inputs are canonical units (the
conversion happened at ingest, :mod:`ingest.ehr.schema`); standardisation is the model's own
business (its statistics travel with its weights).

* :func:`visit_sequence` — for ``diabetes_lstm_attention``: measurements on the same calendar
  day form one visit; the most recent ``max_visits`` visits, oldest first, left-aligned and
  zero-padded: ``VALUES`` [V, F] (0 where not measured), ``OBSERVED`` [V, F] (1/0), ``DT_YEARS``
  [V] (years since the previous visit, 0 for the first), ``LENGTH`` (real visits). Age is
  carried forward with the elapsed time when a visit did not record it (it is a clock, not a
  lab), and marked observed.
* :func:`latest_profile` — for ``cvd_autoencoder``: the latest value of each variable (last
  observation carried forward) and whether it was ever observed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ingest.ehr.reader import VARIABLE_CODES
from ingest.ehr.schema import ModelSchema

FloatArray = npt.NDArray[np.float32]
_US_PER_YEAR = 365.25 * 24 * 3600 * 1e6
_AGE = VARIABLE_CODES["age"]


@dataclass(frozen=True)
class PatientMeasurements:
    """All accepted measurements of one patient (any order): time, variable code, value."""

    timestamp: npt.NDArray[np.datetime64]
    variable: npt.NDArray[np.int8]
    value: npt.NDArray[np.float64]


@dataclass(frozen=True)
class VisitSequence:
    values: FloatArray  # [V, F]
    observed: FloatArray  # [V, F]
    dt_years: FloatArray  # [V]
    length: int
    visit_days: npt.NDArray[np.datetime64]  # [length], the day of each real visit


def _columns(schema: ModelSchema) -> npt.NDArray[np.intp]:
    """Variable code → input column of ``schema`` (-1: not an input of this model)."""
    out = np.full(len(VARIABLE_CODES), -1, dtype=np.intp)
    for j, name in enumerate(schema.variables):
        out[VARIABLE_CODES[name]] = j
    return out


def visit_sequence(p: PatientMeasurements, schema: ModelSchema) -> VisitSequence:
    if not schema.sequence or schema.max_visits is None:
        raise ValueError(f"{schema.name} is not a sequence model")
    v_max, n_features = schema.max_visits, len(schema.variables)
    col = _columns(schema)[p.variable.astype(np.intp)]
    days = p.timestamp.astype("datetime64[D]")
    unique_days, visit_of = np.unique(days, return_inverse=True)
    first = max(0, len(unique_days) - v_max)  # keep the most recent visits
    length = len(unique_days) - first
    values = np.zeros((v_max, n_features), dtype=np.float32)
    observed = np.zeros((v_max, n_features), dtype=np.float32)
    # Later measurements of the same variable on the same day win (stable sort by time).
    order = np.argsort(p.timestamp, kind="stable")
    for i in order:
        v, c = visit_of[i] - first, col[i]
        if v >= 0 and c >= 0:
            values[v, c] = p.value[i]
            observed[v, c] = 1.0
    kept_days = unique_days[first:]
    dt = np.zeros(v_max, dtype=np.float32)
    if length > 1:
        gaps = np.diff(kept_days).astype("timedelta64[D]").astype(np.float64) / 365.25
        dt[1:length] = gaps.astype(np.float32)
    if "age" in schema.variables:
        _carry_age_forward(values, observed, dt, length, schema.variables.index("age"))
    return VisitSequence(values, observed, dt, length, kept_days)


def _carry_age_forward(
    values: FloatArray, observed: FloatArray, dt: FloatArray, length: int, j: int
) -> None:
    known = np.flatnonzero(observed[:length, j])
    if not len(known):
        return
    start = int(known[0])
    elapsed = np.cumsum(dt[:length])
    for v in range(length):
        if observed[v, j]:
            continue
        ref = int(known[known <= v][-1]) if (known <= v).any() else start
        values[v, j] = values[ref, j] + (elapsed[v] - elapsed[ref])
        observed[v, j] = 1.0


def latest_profile(p: PatientMeasurements, schema: ModelSchema) -> tuple[FloatArray, FloatArray]:
    """(values [F], observed [F]): the latest value of each input variable."""
    n_features = len(schema.variables)
    values = np.zeros(n_features, dtype=np.float32)
    observed = np.zeros(n_features, dtype=np.float32)
    col = _columns(schema)[p.variable.astype(np.intp)]
    for i in np.argsort(p.timestamp, kind="stable"):  # later overwrites earlier
        if col[i] >= 0:
            values[col[i]] = p.value[i]
            observed[col[i]] = 1.0
    if "age" in schema.variables and len(p.timestamp):
        j = schema.variables.index("age")
        ages = np.flatnonzero(p.variable == _AGE)
        if len(ages):  # age now = last recorded age + time since it was recorded
            last = ages[np.argmax(p.timestamp[ages])]
            years = (p.timestamp.max() - p.timestamp[last]).astype(np.int64) / _US_PER_YEAR
            values[j] = np.float32(p.value[last] + years)
    return values, observed


def stack_sequences(seqs: list[VisitSequence]) -> dict[str, np.ndarray]:
    """A batch of sequences as the model's input tensors."""
    return {
        "VALUES": np.stack([s.values for s in seqs]),
        "OBSERVED": np.stack([s.observed for s in seqs]),
        "DT_YEARS": np.stack([s.dt_years for s in seqs]),
        "LENGTH": np.array([[s.length] for s in seqs], dtype=np.int32),
    }
