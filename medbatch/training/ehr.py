"""Cohorts and model-card figures shared by the EHR reference models' training scripts
(``triton_models/diabetes_lstm_attention/train.py``, ``triton_models/cvd_autoencoder/train.py``)
and their tests.

A cohort is built the way the nightly path sees patients: ``medbatch.synth.ehr.write_long_csv``
writes a long extract (or ``write_fhir_export`` a FHIR ``$export`` of the same patients),
``ingest.ehr.reader.read_extract``, the worker's own entry point, reads it back (rejected rows
dropped, units converted) and the accepted rows are grouped per patient into
``workers.ehr.features.PatientMeasurements``; labels and the true generating probability come
from the extract's truth sidecar, which serving never sees. Keeping this in one place means both
models are trained, and re-checked by their tests, on exactly the same reading of the data.
"""

from __future__ import annotations

import csv
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ingest.ehr.reader import read_extract
from medbatch.synth.ehr import SynthStats, write_long_csv
from medbatch.training.metrics import contribution_summary, held_out_results, logistic_baseline
from medbatch.training.run import card_fields as card_fields_of_every_model
from workers.ehr.features import PatientMeasurements

if TYPE_CHECKING:
    import torch

#: Model inputs by tensor name, as the worker builds them.
Inputs = dict[str, np.ndarray]
#: The first test patients, re-scored by the tests against the figures ``metrics.json`` records.
REFERENCE_PATIENTS = 2000


@dataclass
class Cohort:
    """The patients of one synthetic extract as the ingest sees them, with their truth."""

    patient_ids: list[str]
    measurements: list[PatientMeasurements]
    label: np.ndarray  # [N] int64, the outcome
    prob: np.ndarray  # [N] float64, the true generating probability
    rows: int  # data lines written
    accepted: int  # measurements the reader accepted


def load_cohort(n: int, seed: int, workdir: Path, outcome: str, fmt: str = "long") -> Cohort:
    """Write an extract of ``n`` patients (``long`` CSV, or ``fhir``: a $export), read it back
    with the ingest's reader and group the accepted rows per patient (patients in generation
    order; one with no accepted row, if any, is dropped: the worker could not score it
    either). ``outcome`` names the truth columns ``<outcome>_label`` and ``<outcome>_prob``."""
    stats: SynthStats
    if fmt == "fhir":
        from medbatch.synth.ehr_fhir import write_fhir_export

        path = workdir / f"export-{seed}-{n}"
        stats = write_fhir_export(path, n, seed)
    else:
        path = workdir / f"extract-{seed}-{n}.csv"
        stats = write_long_csv(path, n, seed)
    with stats.truth_path.open(newline="") as f:
        truth = list(csv.DictReader(f))
    blocks = list(read_extract(path))
    pid = np.concatenate([b.patient_id.to_numpy(zero_copy_only=False) for b in blocks])
    stamp = np.concatenate([b.timestamp for b in blocks])
    var = np.concatenate([b.variable for b in blocks])
    val = np.concatenate([b.value for b in blocks])
    ids, inverse = np.unique(pid.astype(str), return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(inverse, minlength=len(ids)))])
    where = {str(p): k for k, p in enumerate(ids)}
    kept: list[str] = []
    measurements: list[PatientMeasurements] = []
    label: list[int] = []
    prob: list[float] = []
    for row in truth:
        k = where.get(row["patient_id"])
        if k is None:
            continue
        sel = order[bounds[k] : bounds[k + 1]]
        kept.append(row["patient_id"])
        measurements.append(PatientMeasurements(stamp[sel], var[sel], val[sel]))
        label.append(int(row[f"{outcome}_label"]))
        prob.append(float(row[f"{outcome}_prob"]))
    return Cohort(
        kept,
        measurements,
        np.array(label, dtype=np.int64),
        np.array(prob),
        stats.rows,
        len(val),
    )


@dataclass
class Splits:
    """The training, validation and test cohorts and their model inputs."""

    cohorts: dict[str, Cohort]
    inputs: dict[str, Inputs]
    seeds: Mapping[str, int]  # generator seed of each split

    def labels(self) -> dict[str, torch.Tensor]:
        """Each split's labels as float32 tensors (the BCE targets)."""
        import torch

        return {s: torch.from_numpy(c.label.astype(np.float32)) for s, c in self.cohorts.items()}

    def summaries(
        self, summary: Callable[[Cohort, int, Inputs], dict[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        """``summary(cohort, seed, inputs)`` of every split: ``metrics.json``'s ``data``."""
        return {s: summary(c, self.seeds[s], self.inputs[s]) for s, c in self.cohorts.items()}


class SplitSizes(Protocol):
    """Patients per split (the training scripts' ``--train``, ``--val``, ``--test``)."""

    train: int
    val: int
    test: int


def load_splits(
    sizes: SplitSizes,
    seeds: Mapping[str, int],
    outcome: str,
    cohort_inputs: Callable[[Cohort], Inputs],
) -> Splits:
    """Every split's cohort (``sizes.<split>`` patients of generator seed ``seeds[split]``) and
    its model inputs, built by ``cohort_inputs``; the extracts are written to a temporary
    folder, removed after."""
    splits = Splits({}, {}, seeds)
    with tempfile.TemporaryDirectory(prefix="ehr-train-") as tmp:
        for split in ("train", "val", "test"):
            n = getattr(sizes, split)
            t = time.perf_counter()
            cohort = splits.cohorts[split] = load_cohort(n, seeds[split], Path(tmp), outcome)
            splits.inputs[split] = cohort_inputs(cohort)
            print(
                f"{split}: {len(cohort.patient_ids)} patients "
                f"({int(cohort.label.sum())} positive) in {time.perf_counter() - t:.0f} s",
                flush=True,
            )
    return splits


def evaluate(
    splits: Splits,
    p_model: np.ndarray,
    baseline_features: Callable[[Inputs], np.ndarray],
    seed: int,
) -> dict[str, Any]:
    """The test metrics of ``p_model`` (test-split probabilities) against a logistic
    regression fitted on ``baseline_features`` of the training split and against the truth."""
    test = splits.cohorts["test"]
    p_base = logistic_baseline(
        baseline_features(splits.inputs["train"]),
        splits.cohorts["train"].label,
        baseline_features(splits.inputs["test"]),
    )
    return held_out_results(test.label, p_model, p_base, test.prob, seed)


def cohort_summary(cohort: Cohort, seed: int) -> dict[str, Any]:
    """The figures of a split that every EHR ``metrics.json`` records under ``data``."""
    return {
        "generator_seed": seed,
        "patients": len(cohort.patient_ids),
        "positives": int(cohort.label.sum()),
        "prevalence": round(float(cohort.label.mean()), 4),
        "csv_rows": cohort.rows,
        "accepted_measurements": cohort.accepted,
    }


def observed_mean_std(values: np.ndarray, observed: np.ndarray) -> tuple[list[float], list[float]]:
    """Mean and standard deviation (at least 1e-3) of each variable (last axis) over the
    entries where ``observed`` is true, in float64."""
    mean, std = [], []
    for j in range(values.shape[-1]):
        x = values[..., j][observed[..., j]].astype(np.float64)
        mean.append(float(x.mean()))
        std.append(float(max(x.std(), 1e-3)))
    return mean, std


@dataclass
class Reference:
    """The first test patients as served (``network.predict``), which the tests re-score."""

    seed: int  # generator seed of the test split
    cohort: Cohort  # the whole test cohort; the reference patients are its first ``len(risk)``
    inputs: Inputs
    pred: Any  # the network's ``Prediction`` (``risk``, ``contribution``, ...)
    risk: np.ndarray  # float64

    def summary(self) -> dict[str, Any]:
        """The aggregate figures ``metrics.json`` records for them (``first`` is the model's)."""
        from sklearn.metrics import roc_auc_score

        return {
            "generator_seed": self.seed,
            "patients": len(self.risk),
            "auroc": round(float(roc_auc_score(self.cohort.label[: len(self.risk)], self.risk)), 6),
            "risk_sum": round(float(self.risk.sum()), 4),
        }

    def contributions(self, variables: Iterable[str]) -> dict[str, dict[str, float | None]]:
        """Occlusion contributions per variable over the reference patients."""
        return contribution_summary(
            self.pred.contribution.numpy(), self.pred.risk.numpy(), variables
        )


def reference_patients(
    splits: Splits, predict: Callable[[Inputs], Any], n: int = REFERENCE_PATIENTS
) -> Reference:
    """The first ``n`` test patients through ``predict`` (the serving path)."""
    test = splits.cohorts["test"]
    k = min(n, len(test.patient_ids))
    inputs = {name: a[:k] for name, a in splits.inputs["test"].items()}
    pred = predict(inputs)
    risk = pred.risk.numpy().astype(np.float64)
    return Reference(splits.seeds["test"], test, inputs, pred, risk)


# ---------------------------------------------------------------------------------- model card
#: What every EHR model card says the same way: the warning at the top, how to reproduce the
#: weights, and the calibration note with the first limitation. Filled by :func:`card_fields`.
CARD_DISCLAIMER = """\
> **A REFERENCE model that proves the nightly EHR scoring pipeline. It is trained and tested on
> SYNTHETIC data only, has never seen a real patient record, and must NEVER be used for
> clinical care, screening, triage or any other decision about a patient.**"""
CARD_REPRODUCIBILITY = """\
Deterministic: fixed seeds, `torch.use_deterministic_algorithms(True)`, one torch thread; two
runs give identical tensors. State-dict SHA-256
(`triton_torch_adapter.model_files.state_dict_sha256`): `{state_sha}`.
`1/weights.pt`: {weights_bytes} bytes. Built with torch {torch_version}, numpy {numpy_version},
in about {wall_min:.1f} minutes on 2 CPU cores.

Rebuild (from the repository root; rewrites `1/weights.pt`, `metrics.json` and this file,
identically apart from the informational timing fields):

    python triton_models/{name}/train.py"""
CARD_CALIBRATION_AND_SYNTHETIC_ONLY = """\
**Calibration.** Trained with BCE on the natural synthetic prevalence, no recalibration step;
the expected calibration error above is measured on the test patients. The probabilities are
calibrated to this generator's prevalence only.

## Limitations

* **Synthetic only.** The physiology, the measurement schedule and the outcome mechanism are
  simple invented models; nothing here says how the network would behave on real records."""


def results_table(test: Mapping[str, Any], name: str, baseline: str) -> str:
    """The model card's table of held-out metrics: model, baseline, ceiling."""
    rows = []
    for label, key in (
        (f"`{name}`, this model", "model"),
        (f"baseline: {baseline}", "baseline_logistic_regression"),
        ("ceiling: the true generating probability", "truth_probability_ceiling"),
    ):
        m = test[key]
        rows.append(
            f"| {label} | {m['auroc']:.4f} | {m['brier']:.4f} | {m['ece_10_bins']:.4f} "
            f"| {m['mean_predicted']:.4f} |"
        )
    return "\n".join(rows)


def contribution_table(contributions: Mapping[str, Mapping[str, Any]]) -> str:
    """The model card's table of occlusion contributions per variable."""
    rows = []
    for name, c in contributions.items():
        high = c["top_share_risk_above_0.5"]
        rows.append(
            f"| {name} | {c['mean']:+.3f} | {c['top_share']:.1%} | "
            + (f"{high:.1%}" if high is not None else "–")
            + " |"
        )
    return "\n".join(rows)


def card_fields(metrics: Mapping[str, Any], name: str, baseline: str) -> dict[str, Any]:
    """The template fields both EHR model cards fill the same way from ``metrics.json``."""
    t, d = metrics["test"], metrics["data"]
    mb, cm = t["model_minus_baseline_auroc"], t["ceiling_minus_model_auroc"]
    common = card_fields_of_every_model(metrics)
    return {
        **common,
        "disclaimer": CARD_DISCLAIMER,
        "reproducibility": CARD_REPRODUCIBILITY.format(**common, name=name),
        "calibration_and_synthetic_only": CARD_CALIBRATION_AND_SYNTHETIC_ONLY,
        "results_table": results_table(t, name, baseline),
        "contribution_table": contribution_table(metrics["contributions_on_reference_patients"]),
        "diff": mb["difference"],
        "diff_lo": mb["ci95"][0],
        "diff_hi": mb["ci95"][1],
        "gap": cm["difference"],
        "gap_lo": cm["ci95"][0],
        "gap_hi": cm["ci95"][1],
        "observed_rate": t["model"]["observed_rate"],
        "n_train": d["train"]["patients"],
        "n_val": d["val"]["patients"],
        "n_test": d["test"]["patients"],
        "pos_train": d["train"]["positives"],
        "pos_test": d["test"]["positives"],
        "prev_train": d["train"]["prevalence"],
        "seed_train": d["train"]["generator_seed"],
        "seed_val": d["val"]["generator_seed"],
        "seed_test": d["test"]["generator_seed"],
        "n_ref": metrics["reference"]["patients"],
        "ref_auroc": metrics["reference"]["auroc"],
        "batch_ms": metrics["cpu_seconds_per_64_patients_1_thread_informational"] * 1000,
    }
