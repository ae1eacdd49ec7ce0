"""Train the ``cvd_autoencoder`` reference model and its baseline on synthetic EHR extracts,
deterministically.

    python triton_models/cvd_autoencoder/train.py      # from the repository root

Data: ``medbatch.synth.ehr.write_long_csv`` writes a long extract per split (three disjoint
generator seeds: training, validation, test; the generator's default defects and unit mix),
``ingest.ehr.reader.read_long`` reads it back exactly as the nightly ingest does, the accepted
rows are grouped per patient into ``workers.ehr.features.PatientMeasurements`` and turned into
model inputs by ``latest_profile`` — the same code the EHR worker runs. Labels and the true
generating probability come from the extract's truth sidecar, which serving never sees.

Training: reconstruction MSE over the observed variables + binary cross-entropy, AdamW with a
one-cycle schedule, minibatches in a fixed shuffled order; observed variables are withheld from
the encoder at random (denoising; also makes the occlusion contributions ask about states the
network has seen). The OOD threshold is a high percentile of the reconstruction error on the
validation patients. Baseline: scikit-learn logistic regression on the latest profile. Ceiling:
the AUROC of the true generating probability.

Writes ``1/weights.pt``, ``metrics.json`` and ``MODEL_CARD.md`` next to this file, bit-identical on
every rerun (``medbatch.training.run``, shared with the other models).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ingest.ehr.schema import model_schema
from medbatch.training import ehr, run
from workers.ehr.features import latest_profile

NAME = "cvd_autoencoder"
#: The truth sidecar's columns ``<OUTCOME>_label`` and ``<OUTCOME>_prob``.
OUTCOME = "cvd"
FILES = run.ModelFiles.beside(__file__)
SEED = 20240918
#: Generator seed of each split (the synthetic patients of different seeds are independent).
SPLIT_SEEDS = {"train": 6_100, "val": 6_200, "test": 6_300}
CPU = torch.device("cpu")
BASELINE = "logistic regression on the latest profile"
#: Profiles inside every physiological limit but jointly implausible; OOD must flag them.
#: Columns: age, sex, sbp, dbp, bmi, total_cholesterol, hdl, ldl, smoker, hba1c.
IMPLAUSIBLE_PROFILES: dict[str, list[float]] = {
    "age 25, SBP 240 / DBP 60, BMI 16, HDL 4.5 with total cholesterol 3.0, HbA1c 14": [
        25,
        0,
        240,
        60,
        16,
        3.0,
        4.5,
        6.0,
        1,
        14,
    ],
    "age 95, SBP 90 / DBP 125, BMI 60, LDL 0.5, total cholesterol 12": [
        95,
        1,
        90,
        125,
        60,
        12.0,
        0.6,
        0.5,
        0,
        4.0,
    ],
}

network = FILES.load_network()


# ----------------------------------------------------------------------------------------- data
def cohort_inputs(cohort: ehr.Cohort) -> dict[str, np.ndarray]:
    """The model inputs of every patient, as the worker builds them."""
    profiles = [latest_profile(m, model_schema(NAME)) for m in cohort.measurements]
    return {
        "VALUES": np.stack([v for v, _ in profiles]),
        "OBSERVED": np.stack([o for _, o in profiles]),
    }


def as_tensors(inputs: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(inputs["VALUES"]), torch.from_numpy(inputs["OBSERVED"])


def normalisation(inputs: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """Mean and standard deviation of each variable over its observed values (training
    patients only)."""
    mean, std = ehr.observed_mean_std(inputs["VALUES"], inputs["OBSERVED"] > 0.5)
    return {"value_mean": mean, "value_std": std}


def summary(cohort: ehr.Cohort, seed: int, inputs: dict[str, np.ndarray]) -> dict:
    observed = inputs["OBSERVED"].mean(axis=0)
    return {
        **ehr.cohort_summary(cohort, seed),
        "observed_share": {
            name: round(float(observed[j]), 4) for j, name in enumerate(network.VARIABLES)
        },
    }


# ------------------------------------------------------------------------------------- training
def train_model(model, tensors: dict[str, tuple[torch.Tensor, ...]], labels: dict, args):
    """Joint reconstruction + BCE training with random withholding of observed variables;
    returns the losses and validation AUROC of each epoch."""
    from sklearn.metrics import roc_auc_score

    values, observed = tensors["train"]
    y, val, y_val = labels["train"], tensors["val"], labels["val"]
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def step(idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        hidden = (torch.rand(len(idx), network.N_FEATURES, generator=gen) < args.denoise).float()
        logits, recon, z = model(values[idx], observed[idx], hidden)
        rec = network.reconstruction_error(recon, z, observed[idx]).mean()
        cls = bce(logits, y[idx])
        loss = args.recon_weight * rec + cls
        return loss, {"rec": float(rec.detach()), "bce": float(cls.detach())}

    def end_epoch(epoch: int, mean: dict[str, float]) -> tuple[dict, str]:
        val_p, val_err = score(model, val)
        auc = float(roc_auc_score(y_val.numpy(), val_p))
        entry = {
            "epoch": epoch + 1,
            "train_recon_mse": round(mean["rec"], 5),
            "train_bce": round(mean["bce"], 5),
            "val_recon_mse": round(float(val_err.mean()), 5),
            "val_auroc": round(auc, 5),
        }
        info = (
            f"epoch {epoch + 1}: recon {mean['rec']:.3f}, bce {mean['bce']:.4f}, "
            f"val AUROC {auc:.4f}"
        )
        return entry, info

    return run.train_epochs(model, values.shape[0], args, SEED, step, end_epoch)


def score(model, inputs, batch: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """(risk, reconstruction error) of every patient (plain forward, no occlusion copies)."""
    risks, errors = [], []
    with torch.inference_mode():
        for i in range(0, inputs[0].shape[0], batch):
            values, observed = (t[i : i + batch] for t in inputs)
            logits, recon, z = model(values, observed)
            risks.append(torch.sigmoid(logits))
            errors.append(network.reconstruction_error(recon, z, observed))
    return (
        torch.cat(risks).numpy().astype(np.float64),
        torch.cat(errors).numpy().astype(np.float64),
    )


# ------------------------------------------------------------------------------------ baseline
def baseline_features(inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The latest profile, NaN where never observed: [N, 10]."""
    return np.where(inputs["OBSERVED"] > 0.5, inputs["VALUES"].astype(np.float64), np.nan)


# ---------------------------------------------------------------------------------- model card
def model_card(metrics: dict) -> str:
    hp, ood = metrics["hyperparameters"], metrics["ood"]
    implausible = [
        f"| {name} | {r['recon_error']:.1f} | {'yes' if r['ood'] else 'no'} | {r['risk']:.3f} |"
        for name, r in ood["implausible_profiles"].items()
    ]
    pct = ood["test_recon_error_percentiles"]
    return MODEL_CARD_TEMPLATE.format(
        **ehr.card_fields(metrics, NAME, BASELINE),
        implausible_table="\n".join(implausible),
        threshold=ood["threshold"],
        percentile=ood["percentile"],
        val_rate=ood["val_rate"],
        test_rate=ood["test_rate"],
        p50=pct["50"],
        p90=pct["90"],
        p99=pct["99"],
        p999=pct["99.9"],
        half=hp["width"] // 2,
    )


MODEL_CARD_TEMPLATE = """\
# Model card: `cvd_autoencoder` — synthetic EHR, cardiovascular risk with an OOD flag

<!-- Generated by triton_models/cvd_autoencoder/train.py; edit the template there, not this
file. -->

{disclaimer}

## Intended use

Exercising and load-testing the EHR path (extract → ingest → features → Triton → results) with a
tabular model whose behaviour is known and reproducible, including an out-of-distribution flag
the pipeline can surface; a template for a real model. Not a risk score for people.

## Inputs and outputs (Triton, python backend, max batch 256, dynamic batching)

| tensor | type, dims per patient | meaning |
|---|---|---|
| `VALUES` | FP32 [10] | `latest_profile(...)`: canonical units, 0 if never measured |
| `OBSERVED` | FP32 [10] | 1 where measured, 0 where never measured |
| `RISK` | FP32 [1] | probability of a cardiovascular event (synthetic mechanism) |
| `RECON_ERROR` | FP32 [1] | mean squared reconstruction error, observed variables, standardised |
| `OOD` | BOOL [1] | `RECON_ERROR` > {threshold:.4f} (fixed at training time, below) |
| `CONTRIBUTION` | FP32 [10] | per variable, risk logit minus logit with it masked (below) |

Variables (column order): age (years), sex (1 = male), sbp, dbp (mmHg), bmi (kg/m²),
total_cholesterol, hdl, ldl (mmol/L), smoker (0/1), hba1c (%) — `core.model_registry`. A
request is rejected on its own (an error response for it; the other requests of the batch are
still scored) when an input is missing or has the wrong shape or dtype, holds NaN/inf, has
`OBSERVED` other than 0/1, a patient with no observed variable at all, an observed value outside
the variable's physiological range (the schema's hard limits: a unit slip) or a flag other than
0/1. Values where `OBSERVED` is 0 are ignored.

## Data: synthetic, and how it is made

`medbatch/synth/ehr.py` draws patients with a latent state and 1–20 visits with correlated
trajectories (blood pressure rising with age, BMI, male sex and diabetes; HDL falling with BMI,
smoking and diabetes; total cholesterol = LDL + HDL + TG/2.2; …). The label is Bernoulli of a
documented Framingham-like probability of the true profile at the last visit: age, sex, SBP,
total cholesterol / HDL, smoking, HbA1c above 6 %. Each split is written as a long CSV extract
with the generator's default defects (2 % broken rows) and unit mix (25 % of rows in other
units), read back with `ingest.ehr.reader.read_long` (broken rows dropped, units converted) and
turned into inputs by `workers.ehr.features.latest_profile` (last observation carried forward,
age advanced to the last visit) — exactly the serving path.

* Training: {n_train} patients ({pos_train} positive, prevalence {prev_train:.1%}), generator
  seed {seed_train}.
* Validation: {n_val} patients, seed {seed_val}; used for the OOD threshold and progress only.
* Test: {n_test} patients ({pos_test} positive), seed {seed_test}; used only for the numbers
  below. The tests re-score its first {n_ref} patients (AUROC {ref_auroc:.4f}) with the
  committed weights.

## Architecture

`1/network.py`: input = standardised values (training mean and standard deviation of each
variable; 0 where not observed) and the observed mask, 20 numbers; encoder 20 → {width} →
{half} → **{latent}-dimensional code**; decoder {latent} → {half} → {width} → 10 reconstructs the
standardised profile; risk head {latent} → {head} → 1 on the code (GELU between layers).
{n_params} parameters; normalisation statistics and the OOD threshold travel in the state dict.
One batch of 64 patients (with the occlusion copies) takes about {batch_ms:.1f} ms on one CPU
thread.

**Contributions** (`CONTRIBUTION`, occlusion): in the same forward pass, each profile is
repeated once per variable with that variable masked out (observed 0, value 0);
`CONTRIBUTION[j] = logit(as is) − logit(variable j masked)`. Positive: the variable, as
measured, raises the risk compared with not knowing it; exactly 0 for a variable not observed.
Training withholds observed variables from the encoder at random (p = {denoise}), so masked
profiles are inputs of a kind the network has seen. Correlated variables share credit. On the
first {n_ref} test patients:

| variable | mean contribution (logit) | largest for | largest, risk > 0.5 |
|---|---:|---:|---:|
{contribution_table}

## Out-of-distribution flag

`OOD` is `RECON_ERROR > {threshold:.4f}`, the {percentile}th percentile of the reconstruction
error on the validation patients (so about {val_rate:.1%} of them are flagged by construction).
On the test patients {test_rate:.2%} are flagged; their reconstruction error has median
{p50:.3f}, 90th percentile {p90:.3f}, 99th {p99:.3f}, 99.9th {p999:.3f}. Profiles whose every
value is inside the physiological limits but that no patient of the training population could
have:

| profile | RECON_ERROR | OOD | RISK |
|---|---:|---:|---:|
{implausible_table}

The flag says "unlike the training population", not "wrong": a rare but real patient is flagged
too, and a data error that happens to look typical is not. The worker should report it next to
the risk, not drop the patient.

## Training

Reconstruction MSE over the observed variables (weight {recon_weight}) + binary cross-entropy,
trained jointly; AdamW (lr {lr}, weight decay {weight_decay}, one-cycle schedule), {epochs} epochs
of minibatches of {batch_size} in a fixed shuffled order, gradient norm clipped at 1.
{reproducibility}

## Held-out synthetic test metrics ({n_test} patients, prevalence {observed_rate:.1%})

| scorer | AUROC | Brier | ECE (10 bins) | mean predicted risk |
|---|---:|---:|---:|---:|
{results_table}

Model − baseline AUROC: {diff:+.4f} (95 % paired bootstrap interval {diff_lo:+.4f} to
{diff_hi:+.4f}). Ceiling − model: {gap:+.4f} ({gap_lo:+.4f} to {gap_hi:+.4f}). The synthetic
mechanism is close to a logistic function of the latest profile, so logistic regression is a
strong baseline here; the network's nonlinearity can only add the cholesterol ratio and the
HbA1c threshold. The ceiling itself is far from 1 because the label is a coin flip of the true
probability; the small gap between the model and the ceiling comes from the mechanism using
the true values at the last visit while the inputs carry the last *measured* values (often
older, rounded by the extract, some lost to broken rows).

{calibration_and_synthetic_only}
* Only the latest value of each variable is used; trends are ignored.
* Contributions are occlusion effects on the logit, not causal effects.
* The OOD threshold is a percentile of a synthetic population; on any real population the flag
  rate would be meaningless until re-derived.
* Values must be in canonical units (the ingest converts); out-of-range values are rejected,
  not clipped.
* One trial run at a smaller size also printed test figures before the defaults were fixed; no
  hyperparameter was tuned on them.
"""


# --------------------------------------------------------------------------------------- main
def main() -> None:
    parser = run.base_parser(__doc__, splits=(60_000, 20_000, 20_000), epochs=20)
    parser.add_argument("--latent", type=int, default=6)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--head", type=int, default=16)
    parser.add_argument("--denoise", type=float, default=0.15)
    parser.add_argument("--recon-weight", type=float, default=1.0)
    parser.add_argument("--ood-percentile", type=float, default=99.5)
    args = parser.parse_args()

    t0 = time.perf_counter()
    run.seed_everything(SEED)
    splits = ehr.load_splits(args, SPLIT_SEEDS, OUTCOME, cohort_inputs)
    t_data = time.perf_counter() - t0

    norm = normalisation(splits.inputs["train"])
    hp = {"latent": args.latent, "width": args.width, "head": args.head}
    torch.manual_seed(SEED)
    model = network.CVDAutoencoder(**hp)
    with torch.no_grad():
        model.value_mean.copy_(torch.tensor(norm["value_mean"]))
        model.value_std.copy_(torch.tensor(norm["value_std"]))
    tensors = {s: as_tensors(x) for s, x in splits.inputs.items()}
    history = train_model(model, tensors, splits.labels(), args)
    t_train = time.perf_counter() - t0 - t_data

    # OOD threshold from the validation patients (float32, as served).
    _, val_err = score(model, tensors["val"])
    threshold = float(np.float32(np.percentile(val_err, args.ood_percentile)))
    with torch.no_grad():
        model.ood_threshold.fill_(threshold)

    p_model, test_err = score(model, tensors["test"])
    results = ehr.evaluate(splits, p_model, baseline_features, SEED)
    implausible = {}
    for name, profile in IMPLAUSIBLE_PROFILES.items():
        pred = network.predict(
            model,
            torch.tensor([profile], dtype=torch.float32),
            torch.ones(1, network.N_FEATURES),
            CPU,
        )
        implausible[name] = {
            "values": profile,
            "recon_error": round(float(pred.recon_error[0]), 4),
            "ood": bool(pred.ood[0]),
            "risk": round(float(pred.risk[0]), 4),
        }

    # The reference patients (the first of the test split), through the serving path.
    ref = ehr.reference_patients(splits, lambda x: network.predict(model, *as_tensors(x), CPU))
    reference = {
        **ref.summary(),
        "recon_error_sum": round(float(ref.pred.recon_error.double().sum()), 4),
        "ood_count": int(ref.pred.ood.sum()),
        "first": [
            {
                "patient_id": ref.cohort.patient_ids[i],
                "label": int(ref.cohort.label[i]),
                "risk": round(float(ref.risk[i]), 6),
                "recon_error": round(float(ref.pred.recon_error[i]), 6),
                "ood": bool(ref.pred.ood[i]),
                "contribution": [round(float(c), 5) for c in ref.pred.contribution[i]],
            }
            for i in range(6)
        ],
    }
    ood = {
        "percentile": args.ood_percentile,
        "threshold": threshold,
        "val_rate": round(float((val_err > threshold).mean()), 6),
        "test_rate": round(float((test_err > threshold).mean()), 6),
        "test_recon_error_percentiles": {
            str(q): round(float(np.percentile(test_err, q)), 4) for q in (50, 90, 99, 99.5, 99.9)
        },
        "implausible_profiles": implausible,
    }
    batch_s = run.time_batch(network.predict, model, tensors["test"])
    hyper = {
        **hp,
        **run.optimiser_hyperparameters(args),
        "denoise": args.denoise,
        "recon_weight": args.recon_weight,
        "ood_percentile": args.ood_percentile,
        "seed": SEED,
    }
    metrics = {
        "synthetic_data_only": True,
        "test": results,
        "baseline_description": "scikit-learn LogisticRegression (C=1, standardised, missing "
        "values imputed with the training mean) on the latest profile, fitted on the training "
        "patients",
        "ood": ood,
        "reference": reference,
        "contributions_on_reference_patients": ref.contributions(network.VARIABLES),
        **run.model_record(model, norm, history, hyper),
        "data": splits.summaries(summary),
        "environment": run.environment(),
        **run.timings(batch_s, 5, t_data, t_train),
    }
    extra = {"normalisation": norm, "ood_threshold": threshold}
    payload = run.weights_payload(model, hp, network.VARIABLES, extra, metrics)
    shown = {"test": results, "ood": ood}
    run.finish(metrics, payload, shown, args.dry_run, FILES, model_card, t0)


if __name__ == "__main__":
    main()
