"""One bucket of patients → model inputs → stored scores with their explanations (no Celery, no
Triton here: the task in ``tasks.py`` wires these to the server, tests call them directly).

Each model is called with the inputs its registry entry declares (a sequence model: the latest
visits; a profile model: each variable's latest value), built by :mod:`workers.ehr.features`,
the same code that built the training set. No model is named here: what is stored follows from
the outputs a model has. The explanation stored with a score is what a clinician reviewing it
would ask for: which visits the model attended to, and which variables pushed the risk up.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ingest.ehr.schema import model_schema
from workers.ehr.features import (
    PatientMeasurements,
    VisitSequence,
    latest_profiles,
    stack_sequences,
    visit_sequences,
)

TOP_VISITS = 3
TOP_VARIABLES = 3


@dataclass(frozen=True)
class Patient:
    patient_id: str
    measurements: PatientMeasurements

    @property
    def rows(self) -> int:
        return len(self.measurements.value)


def patients(table: pa.Table) -> Iterator[Patient]:
    """The patients of a bucket sorted by patient then time (``ingest.ehr.spill.read_bucket``)."""
    if table.num_rows == 0:
        return
    pid = table.column("patient_id").combine_chunks()
    change = pc.not_equal(pid.slice(1), pid.slice(0, len(pid) - 1)).to_numpy(zero_copy_only=False)
    starts = np.r_[0, np.flatnonzero(change) + 1]
    ends = np.r_[starts[1:], len(pid)]
    ts = table.column("timestamp").to_numpy().astype("datetime64[us]")
    var = table.column("variable").to_numpy().astype(np.int8)
    val = table.column("value").to_numpy().astype(np.float64)
    for s, e in zip(starts, ends, strict=True):
        yield Patient(str(pid[int(s)]), PatientMeasurements(ts[s:e], var[s:e], val[s:e]))


@dataclass
class ModelBatch:
    """What one model is sent for a group of patients (``patients``, in input order), what is
    needed to explain its outputs, and the patients it cannot score, with the reason."""

    model: str
    patients: list[Patient]
    inputs: dict[str, np.ndarray]
    sequences: list[VisitSequence] | None = None
    skipped: list[tuple[Patient, str]] = field(default_factory=list)

    def subset(self, indices: range) -> ModelBatch:
        """The same batch for ``patients[indices]`` (to isolate a request Triton refused)."""
        idx = list(indices)
        return ModelBatch(
            self.model,
            [self.patients[i] for i in idx],
            {name: array[idx] for name, array in self.inputs.items()},
            None if self.sequences is None else [self.sequences[i] for i in idx],
        )


def _no_input(model: str) -> str:
    variables = ", ".join(model_schema(model).variables)
    return f"none of {model}'s input variables ({variables}) was measured for this patient"


def build_inputs(model: str, group: list[Patient]) -> ModelBatch:
    """``model``'s inputs for ``group``; patients with none of its variables are set aside."""
    schema = model_schema(model)
    if not group:
        return ModelBatch(model, [], {}, [] if schema.sequence else None, [])
    kept: list[Patient] = []
    skipped: list[tuple[Patient, str]] = []
    if schema.sequence:
        seqs = []
        for p, seq in zip(
            group, visit_sequences([p.measurements for p in group], schema), strict=True
        ):
            if seq.observed.any():
                kept.append(p)
                seqs.append(seq)
            else:
                skipped.append((p, _no_input(model)))
        return ModelBatch(model, kept, stack_sequences(seqs) if seqs else {}, seqs, skipped)
    values, observed = [], []
    all_values, all_observed = latest_profiles([p.measurements for p in group], schema)
    for p, v, o in zip(group, all_values, all_observed, strict=True):
        if o.any():
            kept.append(p)
            values.append(v)
            observed.append(o)
        else:
            skipped.append((p, _no_input(model)))
    inputs = {"VALUES": np.stack(values), "OBSERVED": np.stack(observed)} if kept else {}
    return ModelBatch(model, kept, inputs, None, skipped)


def not_scored_rows(
    model: str, version: str, pairs: list[tuple[Patient, str]]
) -> list[dict[str, Any]]:
    """Rows for patients this model could not score: no risk, the reason instead."""
    return [
        {
            "patient_id": p.patient_id,
            "model_name": model,
            "model_version": version,
            "risk": None,
            "not_scored": reason,
            "out_of_distribution": None,
            "reconstruction_error": None,
            "measurements": p.rows,
            "visits": visits,
            "explanation": {},
        }
        for (p, reason), visits in zip(pairs, _visit_counts([p for p, _ in pairs]), strict=True)
    ]


def _visit_counts(group: list[Patient]) -> list[int]:
    """Distinct calendar days of each patient's measurements, for the whole group at once."""
    if not group:
        return []
    days = np.concatenate(
        [p.measurements.timestamp.astype("datetime64[D]").astype(np.int64) for p in group]
    )
    who = np.repeat(np.arange(len(group)), [p.rows for p in group])
    pairs = np.unique(who * (1 << 32) + (days + (1 << 31)))  # ±5.8 M years of days fit in 32 bits
    return np.bincount(pairs >> 32, minlength=len(group)).tolist()


def score_rows(batch: ModelBatch, out: dict[str, np.ndarray], version: str) -> list[dict[str, Any]]:
    """One row of ``ehr_scores`` per patient sent (without the job columns). Rounding, ranking,
    day labels and visit counts run on whole arrays; what remains per patient is building its
    dicts from Python lists (this is per-patient work on the scoring path)."""
    group = batch.patients
    n = len(group)
    variables = model_schema(batch.model).variables
    risk = out["RISK"].reshape(n, -1)[:, 0].astype(np.float64).tolist()
    contribution = out["CONTRIBUTION"].reshape(n, -1).astype(np.float64)
    rounded = np.round(contribution, 4).tolist()
    positive = (contribution > 0).tolist()
    top_vars = np.argsort(-contribution, axis=1, kind="stable")[:, :TOP_VARIABLES].tolist()
    attended = batch.sequences is not None and "ATTENTION" in out
    if attended:
        assert batch.sequences is not None
        raw_attention = out["ATTENTION"].reshape(n, -1).astype(np.float64)
        attention = np.round(raw_attention, 5)
        attention4 = np.round(raw_attention, 4).tolist()
        lengths = [seq.length for seq in batch.sequences]
        all_days = (
            np.concatenate([seq.visit_days for seq in batch.sequences]).astype(str).tolist()
            if n
            else []
        )
        day_start = np.r_[0, np.cumsum(lengths)].tolist()
        # the top visits of every patient: attention on padding is 0, below any real visit's
        # weight, but a patient may have fewer than TOP_VISITS visits: ranked per patient below
        ranked = np.argsort(-attention, axis=1, kind="stable").tolist()
        attention_lists = attention.tolist()
    ood = out["OOD"].reshape(-1).tolist() if "OOD" in out else None
    recon = (
        out["RECON_ERROR"].reshape(-1).astype(np.float64).tolist() if "RECON_ERROR" in out else None
    )
    visits = _visit_counts(group) if batch.sequences is None else None
    rows = []
    for i, p in enumerate(group):
        c = rounded[i]
        pos = positive[i]
        explanation: dict[str, Any] = {
            "top_variables": [
                {"variable": variables[j], "contribution": c[j]} for j in top_vars[i] if pos[j]
            ],
            "contributions": dict(zip(variables, c, strict=True)),
        }
        row: dict[str, Any] = {
            "patient_id": p.patient_id,
            "model_name": batch.model,
            "model_version": version,
            "risk": risk[i],
            "not_scored": None,
            "out_of_distribution": None,
            "reconstruction_error": None,
            "measurements": p.rows,
        }
        if batch.sequences is not None:
            length = batch.sequences[i].length
            row["visits"] = length
            if attended:
                days = all_days[day_start[i] : day_start[i] + length]
                listed = attention_lists[i][:length]
                explanation["attention"] = [[d, w] for d, w in zip(days, listed, strict=True)]
                top = [v for v in ranked[i] if v < length][:TOP_VISITS]
                explanation["top_visits"] = [
                    {"day": days[v], "weight": attention4[i][v]} for v in top
                ]
        else:
            assert visits is not None
            row["visits"] = visits[i]
        if ood is not None:
            row["out_of_distribution"] = bool(ood[i])
        if recon is not None:
            row["reconstruction_error"] = recon[i]
        row["explanation"] = explanation
        rows.append(row)
    return rows
