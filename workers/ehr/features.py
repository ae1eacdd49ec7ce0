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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ingest.ehr.reader import VARIABLE_CODES
from ingest.ehr.schema import ModelSchema

FloatArray = npt.NDArray[np.float32]
_US_PER_YEAR = 365.25 * 24 * 3600 * 1e6
_US_PER_DAY = 24 * 3600 * 10**6
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


# ------------------------------------------------------------------------ whole groups at once
# The same features for a group of patients with numpy operations over all their rows instead of
# Python loops per measurement (the scoring batch's hottest loop: ~0.1 ms per patient). They must
# agree exactly with the per-patient functions above, which stay the reference (tested on the
# generator's messy extracts, shuffled rows and same-time duplicates).
def _group_rows(
    ps: Sequence[PatientMeasurements],
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.int64], npt.NDArray[np.intp], npt.NDArray[Any]]:
    """(patient index, time in µs, variable code, value) of every row, sorted by patient, then
    time, ties in their original order (the per-patient functions' stable sort)."""
    counts = np.array([len(p.value) for p in ps], dtype=np.intp)
    pidx = np.repeat(np.arange(len(ps), dtype=np.intp), counts)
    ts = np.concatenate([p.timestamp.astype("datetime64[us]") for p in ps]).astype(np.int64)
    var = np.concatenate([p.variable for p in ps]).astype(np.intp)
    val = np.concatenate([p.value for p in ps])
    order = np.lexsort((ts, pidx))  # stable
    return pidx[order], ts[order], var[order], val[order]


def _last_per_key(keys: npt.NDArray[np.int64]) -> npt.NDArray[np.intp]:
    """Index of the last occurrence of each distinct key (later measurements win)."""
    _, first_in_reversed = np.unique(keys[::-1], return_index=True)
    return len(keys) - 1 - first_in_reversed


def visit_sequences(ps: Sequence[PatientMeasurements], schema: ModelSchema) -> list[VisitSequence]:
    """:func:`visit_sequence` of every patient of ``ps`` (each with at least one row)."""
    if not schema.sequence or schema.max_visits is None:
        raise ValueError(f"{schema.name} is not a sequence model")
    n_p, v_max, n_f = len(ps), schema.max_visits, len(schema.variables)
    pidx, ts, var, val = _group_rows(ps)
    day = np.floor_divide(ts, _US_PER_DAY)
    new_visit = np.ones(len(day), dtype=bool)
    new_visit[1:] = (pidx[1:] != pidx[:-1]) | (day[1:] != day[:-1])
    visit = np.cumsum(new_visit) - 1  # global visit number
    n_visits = np.bincount(pidx[new_visit], minlength=n_p)
    first_visit = np.r_[0, np.cumsum(n_visits)[:-1]]
    first_kept = np.maximum(0, n_visits - v_max)
    lengths = n_visits - first_kept
    pos = visit - first_visit[pidx] - first_kept[pidx]
    col = _columns(schema)[var]
    keep = (pos >= 0) & (col >= 0)
    flat = ((pidx[keep] * v_max + pos[keep]) * n_f + col[keep]).astype(np.int64)
    last = _last_per_key(flat)
    values = np.zeros((n_p, v_max, n_f), dtype=np.float32)
    observed = np.zeros((n_p, v_max, n_f), dtype=np.float32)
    values.reshape(-1)[flat[last]] = val[keep][last]
    observed.reshape(-1)[flat[last]] = 1.0

    visit_day = day[new_visit]  # in global visit order
    k = np.arange(v_max)
    real = k[None, :] < lengths[:, None]
    at = np.where(real, first_visit[:, None] + first_kept[:, None] + k[None, :], 0)
    kept_days = np.where(real, visit_day[at], 0)
    dt = np.zeros((n_p, v_max), dtype=np.float32)
    gaps = np.diff(kept_days, axis=1).astype(np.float64) / 365.25
    dt[:, 1:] = np.where(real[:, 1:], gaps, 0.0).astype(np.float32)
    if "age" in schema.variables:
        _carry_ages_forward(values, observed, dt, real, schema.variables.index("age"))
    return [
        VisitSequence(
            values[i],
            observed[i],
            dt[i],
            int(lengths[i]),
            kept_days[i, : lengths[i]].astype("datetime64[D]"),
        )
        for i in range(n_p)
    ]


def _carry_ages_forward(
    values: FloatArray, observed: FloatArray, dt: FloatArray, real: npt.NDArray[np.bool_], j: int
) -> None:
    known = observed[:, :, j] > 0
    has = known.any(axis=1)
    v_max = known.shape[1]
    elapsed = np.cumsum(dt, axis=1)  # float32, sequential along each row, as per patient
    idx = np.where(known, np.arange(v_max)[None, :], -1)
    before = np.maximum.accumulate(idx, axis=1)
    first = known.argmax(axis=1)
    ref = np.where(before >= 0, before, first[:, None])
    fill = real & ~known & has[:, None]
    rows = np.arange(len(values))[:, None]
    carried = values[rows, ref, j] + (elapsed - elapsed[rows, ref])
    values[:, :, j] = np.where(fill, carried, values[:, :, j])
    observed[:, :, j] = np.where(fill, 1.0, observed[:, :, j])


def latest_profiles(
    ps: Sequence[PatientMeasurements], schema: ModelSchema
) -> tuple[FloatArray, FloatArray]:
    """:func:`latest_profile` of every patient of ``ps``: (values [P, F], observed [P, F])."""
    n_p, n_f = len(ps), len(schema.variables)
    pidx, ts, var, val = _group_rows(ps)
    col = _columns(schema)[var]
    keep = col >= 0
    flat = (pidx[keep] * n_f + col[keep]).astype(np.int64)
    last = _last_per_key(flat)
    values = np.zeros((n_p, n_f), dtype=np.float32)
    observed = np.zeros((n_p, n_f), dtype=np.float32)
    values.reshape(-1)[flat[last]] = val[keep][last]
    observed.reshape(-1)[flat[last]] = 1.0
    if "age" in schema.variables and len(ts):
        j = schema.variables.index("age")
        latest = np.full(n_p, np.iinfo(np.int64).min)
        np.maximum.at(latest, pidx, ts)
        ages = np.flatnonzero(var == _AGE)
        # the per-patient function takes the first age row at the latest age time
        a_p, a_t = pidx[ages], ts[ages]
        newest = np.full(n_p, np.iinfo(np.int64).min)
        np.maximum.at(newest, a_p, a_t)
        at_newest = ages[a_t == newest[a_p]]
        _, first = np.unique(pidx[at_newest], return_index=True)
        chosen = at_newest[first]
        who = pidx[chosen]
        years = (latest[who] - ts[chosen]) / _US_PER_YEAR
        values[who, j] = (val[chosen] + years).astype(np.float32)
    return values, observed
