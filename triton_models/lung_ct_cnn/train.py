"""Train the ``lung_ct_cnn`` reference model and its baseline on synthetic chest CT,
deterministically.

    python triton_models/lung_ct_cnn/train.py            # from the repository root

Data: volumes drawn by ``medbatch.synth.lung_ct.synth_volume`` (about half with 1–3 nodule-like
lesions), from three disjoint seed ranges: training, validation (calibration and pooling only)
and test (final metrics only). The slice count of each volume is drawn log-uniformly from
[``--min-slices``, ``--max-slices``] (the generator derives the slice thickness from it). Every
volume goes through the serving preprocessing, ``workers.dicom.preprocess.model_input``, onto
the [64, 128, 128] grid. A grid slice is labelled positive when a source slice it overlaps
(within half a grid step, at least the nearest source slice) holds lesion voxels.

Training: the slice encoder of ``1/network.py`` is trained with binary cross-entropy on
minibatches of 2.5D slice stacks, each minibatch with a fixed share of positive slices; then,
with the encoder frozen, the slice-score calibration and the attention pooling of the study
probability are fitted on the validation volumes. Baseline: logistic regression on hand-made
features of the same grids (soft-tissue and ground-glass voxel counts inside a lung envelope).

Writes ``1/weights.pt``, ``metrics.json`` and ``MODEL_CARD.md`` next to this file. Two runs give
bit-identical weights (fixed seeds, deterministic algorithms, one torch thread, fixed data
order; the volumes are generated in worker processes but collected in seed order);
``metrics.json`` records the SHA-256 of the state dict tensors. Nothing else is cached. The
run itself (seeding, optimiser, timing, writing) is ``medbatch.training.run``, shared with the
other models.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import time

import numpy as np
import torch

from medbatch.synth.lung_ct import LESION_DIAMETER_MM, synth_volume
from medbatch.training import run
from workers.dicom.preprocess import GRID, WINDOW_CENTER_HU, WINDOW_WIDTH_HU, model_input

FILES = run.ModelFiles.beside(__file__)
SEED = 20240611
#: First seed of each split; the splits are [start, start + n) and never overlap.
SPLIT_SEEDS = {"train": 1_000_000, "val": 2_000_000, "test": 3_000_000}
#: Grid pixels per cell of the encoder's lesion map (stride 8: 128 → 16 cells).
CELL_PX = 8
CPU = torch.device("cpu")

network = FILES.load_network()


# ----------------------------------------------------------------------------------------- data
def n_slices_for(seed: int, low: int, high: int) -> int:
    """Slice count of the volume of ``seed``: log-uniform in [low, high]."""
    u = np.random.default_rng([seed, 17]).random()
    return round(math.exp(math.log(low) + u * (math.log(high) - math.log(low))))


def grid_slice_labels(nodule_slices: frozenset[int] | set[int], n_source: int) -> np.ndarray:
    """Per-grid-slice labels: grid slice g sits at source position g·(n−1)/63 (the linear
    resampling of ``model_input``) and is positive when a lesion slice lies within half a grid
    step of it, or within half a source slice when the grid is finer than the source."""
    n_grid = GRID[0]
    pos = np.linspace(0.0, max(n_source - 1, 0), n_grid)
    if not nodule_slices:
        return np.zeros(n_grid, dtype=bool)
    half = max(0.5, (n_source - 1) / (n_grid - 1) / 2)
    idx = np.asarray(sorted(nodule_slices), dtype=np.float64)
    return (np.abs(pos[:, None] - idx[None, :]) <= half + 1e-9).any(axis=1)


def lesion_cells(ct, slice_labels: np.ndarray) -> np.ndarray:
    """Dense training target [64, cells, cells]: on each positive grid slice, the map cells
    (8 × 8 grid pixels each) that a lesion crossing that slice covers. Uses the generator's
    lesion centres and diameters; a slice positive by :func:`grid_slice_labels` always gets at
    least the cell of its nearest lesion."""
    n, rows, cols = ct.hu.shape
    thickness, pixel, _ = ct.spacing_mm
    n_grid, g_rows, g_cols = GRID
    cells = g_rows // CELL_PX
    out = np.zeros((n_grid, cells, cells), dtype=bool)
    if not ct.lesions:
        return out
    z_grid = np.linspace(0.0, max(n - 1, 0), n_grid) * thickness  # mm of each grid slice
    half_step = max(thickness * (n - 1) / (n_grid - 1) / 2, thickness / 2)
    mm_per_row = pixel * (rows - 1) / (g_rows - 1)
    mm_per_col = pixel * (cols - 1) / (g_cols - 1)
    cell_px = CELL_PX
    centres = [
        (
            les.center_mm[0],
            (les.center_mm[1] / pixel + (rows - 1) / 2) / ((rows - 1) / (g_rows - 1)),
            (les.center_mm[2] / pixel + (cols - 1) / 2) / ((cols - 1) / (g_cols - 1)),
            les.diameter_mm / 2,
        )
        for les in ct.lesions
    ]
    edges = np.arange(cells) * cell_px
    for g in np.flatnonzero(slice_labels):
        dz = [abs(z_grid[g] - c[0]) for c in centres]
        hits = [i for i, d in enumerate(dz) if d <= centres[i][3] + half_step]
        for i in hits or [int(np.argmin(dz))]:
            _, gy, gx, r = centres[i]
            r_plane = math.sqrt(max(r**2 - max(dz[i] - half_step, 0.0) ** 2, (0.5 * r) ** 2))
            ry, rx = max(r_plane / mm_per_row, 1.0), max(r_plane / mm_per_col, 1.0)
            # cells whose square meets the lesion's bounding box in this slice
            rows_hit = (edges + cell_px > gy - ry) & (edges < gy + ry)
            cols_hit = (edges + cell_px > gx - rx) & (edges < gx + rx)
            out[g] |= rows_hit[:, None] & cols_hit[None, :]
    return out


def _row_hull(mask: np.ndarray, axis: int) -> np.ndarray:
    """Fill each line along ``axis`` between its first and last True (vectorised)."""
    n = mask.shape[axis]
    has = mask.any(axis=axis, keepdims=True)
    first = np.argmax(mask, axis=axis)
    last = n - 1 - np.argmax(np.flip(mask, axis=axis), axis=axis)
    shape = [1] * mask.ndim
    shape[axis] = n
    idx = np.arange(n).reshape(shape)
    return has & (idx >= np.expand_dims(first, axis)) & (idx <= np.expand_dims(last, axis))


def baseline_features(grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Hand-made features of one model-input grid: (study features [6], per-slice feature [64]).

    HU are recovered from the lung window (clipped to [−1350, +150]). Body: row- and column-wise
    hull of the voxels above −500 HU. Lung envelope: per image half (split at the body's centre
    column), row- and column-wise hull of the body voxels below −400 HU, so vessels and nodules
    inside the lungs are included. Features: soft-tissue (−200..+150 HU) and ground-glass
    (−650..−200 HU) voxel fractions of the envelope, the largest per-slice soft-tissue fraction,
    the envelope volume, and the bright-voxel fraction of the slab around the worst slice.
    """
    hu = grid.astype(np.float32) * WINDOW_WIDTH_HU + (WINDOW_CENTER_HU - WINDOW_WIDTH_HU / 2)
    tissue = hu > -500
    body = _row_hull(tissue, 2) & _row_hull(tissue, 1)
    lung = body & (hu < -400)
    cols = grid.shape[2]
    col_idx = np.arange(cols)
    weight = body.sum(axis=(0, 1)).astype(np.float64)
    centre = round(float((weight * col_idx).sum() / max(weight.sum(), 1.0)))
    envelope = np.zeros_like(lung)
    for half in (slice(0, centre), slice(centre, cols)):
        part = lung[:, :, half]
        envelope[:, :, half] = _row_hull(part, 2) & _row_hull(part, 1)
    soft = envelope & (hu >= -200)
    ggo = envelope & (hu >= -650) & (hu < -200)
    env_slice = envelope.sum(axis=(1, 2)).astype(np.float64)
    soft_slice = soft.sum(axis=(1, 2)).astype(np.float64)
    frac_slice = np.where(env_slice > 200, soft_slice / np.maximum(env_slice, 1.0), 0.0)
    env = max(float(env_slice.sum()), 1.0)
    worst = int(np.argmax(frac_slice))
    slab = slice(max(worst - 1, 0), worst + 2)
    study = np.array(
        [
            soft.sum() / env,
            ggo.sum() / env,
            frac_slice.max(),
            math.log(env),
            soft[slab].sum() / max(float(envelope[slab].sum()), 1.0),
            np.sort(frac_slice)[-3:].mean(),
        ],
        dtype=np.float64,
    )
    return study, frac_slice


def training_nodules(seed: int) -> int:
    """Lesion count of a training volume: 0 for 40 % of the seeds, else 1–4 (more positive
    slices per generated volume than the natural ``nodules=None`` draw; validation and test
    volumes keep the generator's own draw)."""
    rng = np.random.default_rng([seed, 23])
    return 0 if rng.random() < 0.4 else int(rng.integers(1, 5))


def make_example(args: tuple[int, int, int, bool]) -> dict:
    """One synthetic volume through the serving preprocessing (runs in a worker process)."""
    seed, low, high, training = args
    n = n_slices_for(seed, low, high)
    ct = synth_volume(seed, n, nodules=training_nodules(seed) if training else None)
    grid = model_input(ct.hu)
    study_feats, slice_feats = baseline_features(grid)
    labels = grid_slice_labels(ct.nodule_slices, n)
    return {
        "seed": seed,
        "grid": grid,
        "label": ct.label,
        "slice_labels": labels,
        "cells": lesion_cells(ct, labels) if training else None,
        "n_slices": n,
        "thickness_mm": ct.spacing_mm[0],
        "max_diameter_mm": max((les.diameter_mm for les in ct.lesions), default=0.0),
        "kinds": [les.kind for les in ct.lesions],
        "baseline_study": study_feats,
        "baseline_slice": slice_feats,
    }


class Split:
    """The examples of one split as arrays (grids stay float32, exactly what is served)."""

    def __init__(self, examples: list[dict]) -> None:
        self.seeds = np.array([e["seed"] for e in examples])
        self.grids = torch.from_numpy(np.stack([e["grid"] for e in examples]))
        self.labels = np.array([e["label"] for e in examples], dtype=np.int64)
        self.slice_labels = np.stack([e["slice_labels"] for e in examples])
        self.cells = (
            np.stack([e["cells"] for e in examples]) if examples[0]["cells"] is not None else None
        )
        self.n_slices = np.array([e["n_slices"] for e in examples])
        self.thickness = np.array([e["thickness_mm"] for e in examples])
        self.max_diameter = np.array([e["max_diameter_mm"] for e in examples])
        self.kinds = [e["kinds"] for e in examples]
        self.base_study = np.stack([e["baseline_study"] for e in examples])
        self.base_slice = np.stack([e["baseline_slice"] for e in examples])

    def __len__(self) -> int:
        return len(self.seeds)

    def summary(self) -> dict:
        return {
            "volumes": len(self),
            "positive_volumes": int(self.labels.sum()),
            "positive_grid_slices": int(self.slice_labels.sum()),
            "grid_slices": int(self.slice_labels.size),
            "seeds": [int(self.seeds[0]), int(self.seeds[-1])],
            "slices_min_median_max": [
                int(self.n_slices.min()),
                int(np.median(self.n_slices)),
                int(self.n_slices.max()),
            ],
            "thickness_mm_min_max": [float(self.thickness.min()), float(self.thickness.max())],
        }


def generate(split: str, n: int, args: argparse.Namespace) -> Split:
    jobs = [
        (SPLIT_SEEDS[split] + i, args.min_slices, args.max_slices, split == "train")
        for i in range(n)
    ]
    t0 = time.perf_counter()
    if args.workers > 1:
        with multiprocessing.get_context("fork").Pool(args.workers) as pool:
            examples = list(pool.imap(make_example, jobs, chunksize=4))
    else:
        examples = [make_example(j) for j in jobs]
    split_data = Split(examples)
    print(
        f"{split}: {n} volumes ({int(split_data.labels.sum())} positive, "
        f"{int(split_data.slice_labels.sum())} positive grid slices) "
        f"in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    return split_data


# ------------------------------------------------------------------------------------- training
def negative_cell_weights(grids: torch.Tensor) -> np.ndarray:
    """Where negative training crops are centred, [N, 64, 16, 16]: cells that are at least a
    quarter lung, weighted 1 + 8 × their share of bright (> −225 HU) pixels, so that vessel-rich
    lung (the hard negatives) is sampled more often than empty lung."""
    out = np.zeros((grids.shape[0], GRID[0], GRID[1] // CELL_PX, GRID[2] // CELL_PX), np.float32)
    for i in range(grids.shape[0]):
        g = grids[i].numpy()
        tissue = g > 0.567  # −500 HU
        body = _row_hull(tissue, 2) & _row_hull(tissue, 1)
        lung = body & (g < 0.633)  # −400 HU
        shape = (GRID[0], GRID[1] // CELL_PX, CELL_PX, GRID[2] // CELL_PX, CELL_PX)
        lung_frac = lung.reshape(shape).mean(axis=(2, 4))
        bright = (body & (g > 0.75)).reshape(shape).mean(axis=(2, 4))
        out[i] = (lung_frac >= 0.25) * (1.0 + 8.0 * bright)
    return out


def crop_batch(
    train: Split,
    neg_weights: np.ndarray,
    pairs: np.ndarray,
    n_pos: int,
    crop_cells: int,
    rng: np.random.RandomState,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training crops [n, 3, 8·crop_cells, 8·crop_cells] and their cell targets.

    The first ``n_pos`` (volume, slice) pairs are positive slices: the crop holds a random lesion
    cell at a random place. The others are negative slices: the crop holds a lung cell drawn by
    ``neg_weights``. Crops are aligned to the 8-pixel cells, mirrored left-right and front-back
    at random. Lesion and vessel statistics are alike in both kinds of crops, so the only thing
    that tells them apart is the lesion.
    """
    cells_per_side = GRID[1] // CELL_PX
    px = crop_cells * CELL_PX
    s = GRID[0]
    xs, ts = [], []
    for k, (v, g) in enumerate(pairs.tolist()):
        target = train.cells[v, g]
        weights = target.ravel().astype(np.float64) if k < n_pos else neg_weights[v, g].ravel()
        total = float(weights.sum())
        if total > 0:
            cell = int(rng.choice(weights.size, p=weights / total))
        else:
            cell = int(rng.randint(4, 12)) * cells_per_side + int(rng.randint(4, 12))
        cy, cx = divmod(cell, cells_per_side)
        oy = int(np.clip(cy - rng.randint(crop_cells), 0, cells_per_side - crop_cells))
        ox = int(np.clip(cx - rng.randint(crop_cells), 0, cells_per_side - crop_cells))
        idx = [min(max(g - 1, 0), s - 1), g, min(g + 1, s - 1)]
        x = train.grids[v, idx, oy * CELL_PX : oy * CELL_PX + px, ox * CELL_PX : ox * CELL_PX + px]
        t = target[oy : oy + crop_cells, ox : ox + crop_cells]
        if rng.rand() < 0.5:
            x, t = x.flip(-1), t[:, ::-1]
        if rng.rand() < 0.5:
            x, t = x.flip(-2), t[::-1, :]
        xs.append(x)
        ts.append(np.ascontiguousarray(t))
    return torch.stack(xs), torch.from_numpy(np.stack(ts))


def train_encoder(model, train: Split, args: argparse.Namespace) -> list[float]:
    """Dense lesion-map + slice-max BCE on crops (the encoder is fully convolutional, so it is
    trained on crops and served on whole slices); the mean loss of every 250 steps."""
    rng = np.random.RandomState(SEED)
    neg_weights = negative_cell_weights(train.grids)
    pos = np.argwhere(train.slice_labels)
    neg = np.argwhere(~train.slice_labels)
    n_pos = round(args.batch_size * args.positive_fraction)
    n_neg = args.batch_size - n_pos
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    pos_weight = torch.tensor(args.map_pos_weight)

    def loss_at(_: int) -> torch.Tensor:
        pairs = np.concatenate(
            [pos[rng.randint(len(pos), size=n_pos)], neg[rng.randint(len(neg), size=n_neg)]]
        )
        x, cells = crop_batch(train, neg_weights, pairs, n_pos, args.crop_cells, rng)
        cells = cells.float()
        maps = model.encoder(x)
        return bce(maps.amax(dim=(1, 2)), cells.amax(dim=(1, 2))) + args.map_weight * bce(
            maps, cells, pos_weight=pos_weight
        )

    params = model.encoder.parameters()
    return run.train_steps(model, params, args, loss_at, pct_start=0.1, unit="crops")


def slice_logits(model, split: Split, batch: int = 4) -> torch.Tensor:
    out = []
    with torch.inference_mode():
        for i in range(0, len(split), batch):
            out.append(model.slice_logits(split.grids[i : i + batch]))
    return torch.cat(out)


def _fit_lbfgs(params: list[torch.Tensor], loss_fn, iters: int = 200) -> float:
    opt = torch.optim.LBFGS(params, lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(loss_fn())


def fit_calibration(model, logits: torch.Tensor, split: Split) -> dict:
    """Fit slice Platt scaling and the study attention pooling on validation logits."""
    z = logits.detach().double()
    y_slice = torch.from_numpy(split.slice_labels.astype(np.float64))
    y_study = torch.from_numpy(split.labels.astype(np.float64))
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    a = torch.ones((), dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    slice_loss = _fit_lbfgs([a, b], lambda: bce(a * z + b, y_slice))

    best = None
    for tau in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0):
        w = torch.softmax(z / tau, dim=1)
        pooled = (w * z).sum(dim=1)
        pooled = (pooled - pooled.mean()) / pooled.std()
        s = torch.ones((), dtype=torch.float64, requires_grad=True)
        c = torch.zeros((), dtype=torch.float64, requires_grad=True)
        loss = _fit_lbfgs(
            [s, c], lambda p=pooled, s=s, c=c: bce(s * p + c, y_study) + 1e-3 * (s**2 + c**2)
        )
        if best is None or loss < best[0] - 1e-9:
            # undo the standardisation: s·(p − m)/sd + c
            raw = (w * z).sum(dim=1)
            m, sd = float(raw.mean()), float(raw.std())
            s_val, c_val = float(s.detach()), float(c.detach())
            best = (loss, tau, s_val / sd, c_val - s_val * m / sd)
    assert best is not None
    with torch.no_grad():
        model.slice_scale.fill_(float(a.detach()))
        model.slice_bias.fill_(float(b.detach()))
        model.log_tau.fill_(math.log(best[1]))
        model.study_scale.fill_(best[2])
        model.study_bias.fill_(best[3])
    return {
        "slice_scale": round(float(a.detach()), 6),
        "slice_bias": round(float(b.detach()), 6),
        "slice_val_bce": round(slice_loss, 6),
        "tau": best[1],
        "study_scale": round(best[2], 6),
        "study_bias": round(best[3], 6),
        "study_val_bce": round(best[0], 6),
    }


# ------------------------------------------------------------------------------------ metrics
def binary_metrics(y: np.ndarray, p: np.ndarray) -> dict:
    from sklearn.metrics import brier_score_loss, roc_auc_score

    pred = p >= 0.5
    pos, neg = y == 1, y == 0
    return {
        "auroc": round(float(roc_auc_score(y, p)), 6),
        "brier": round(float(brier_score_loss(y, p)), 6),
        "sensitivity_at_0.5": round(float(pred[pos].mean()), 6),
        "specificity_at_0.5": round(float((~pred[neg]).mean()), 6),
    }


def auroc_by_size(y: np.ndarray, p: np.ndarray, diameter: np.ndarray) -> dict:
    """AUROC of the positives whose largest lesion is in a diameter band against all negatives."""
    from sklearn.metrics import roc_auc_score

    out = {}
    neg = y == 0
    for lo, hi in ((5, 10), (10, 15), (15, 25.01)):
        band = (y == 1) & (diameter >= lo) & (diameter < hi)
        if band.sum() and neg.sum():
            sel = band | neg
            out[f"{lo}-{int(hi)}mm"] = {
                "positives": int(band.sum()),
                "auroc": round(float(roc_auc_score(y[sel], p[sel])), 6),
            }
    return out


def run_baseline(train: Split, test: Split) -> tuple[dict, dict]:
    """Logistic regression on the hand-made study features, and the raw per-slice soft-tissue
    fraction as a slice score."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
    clf.fit(train.base_study, train.labels)
    p = clf.predict_proba(test.base_study)[:, 1]
    study = binary_metrics(test.labels, p)
    study["auroc_by_largest_lesion"] = auroc_by_size(test.labels, p, test.max_diameter)
    slice_auc = roc_auc_score(test.slice_labels.ravel(), test.base_slice.ravel())
    return study, {"auroc": round(float(slice_auc), 6)}


# ---------------------------------------------------------------------------------- model card
def model_card(metrics: dict) -> str:
    t, b, hp, d = metrics["test"], metrics["baseline"], metrics["hyperparameters"], metrics["data"]
    size_rows = []
    for band, m in t["study"]["auroc_by_largest_lesion"].items():
        base = b["study"]["auroc_by_largest_lesion"].get(band, {}).get("auroc", float("nan"))
        size_rows.append(f"| {band} | {m['positives']} | {m['auroc']:.3f} | {base:.3f} |")
    cal = metrics["calibration"]
    s, bs = t["study"], b["study"]
    results = [
        "| model | study AUROC | Brier | sensitivity @0.5 | specificity @0.5 | slice AUROC |",
        "|---|---:|---:|---:|---:|---:|",
        f"| `lung_ct_cnn` (attention pooling), this model | {s['auroc']:.3f} | {s['brier']:.3f} "
        f"| {s['sensitivity_at_0.5']:.3f} | {s['specificity_at_0.5']:.3f} "
        f"| {t['slice']['auroc']:.3f} |",
        f"| `lung_ct_cnn`, max slice score as study score "
        f"| {t['study_max_slice_score']['auroc']:.3f} | | | | |",
        "| baseline: logistic regression on lung soft-tissue / ground-glass voxel fractions "
        f"| {bs['auroc']:.3f} | {bs['brier']:.3f} | {bs['sensitivity_at_0.5']:.3f} "
        f"| {bs['specificity_at_0.5']:.3f} | {b['slice']['auroc']:.3f} |",
    ]
    return MODEL_CARD_TEMPLATE.format(
        **run.card_fields(metrics),
        results_table="\n".join(results),
        n_train=d["train"]["volumes"],
        n_val=d["val"]["volumes"],
        n_test=d["test"]["volumes"],
        pos_train=d["train"]["positive_volumes"],
        pos_test=d["test"]["positive_volumes"],
        pslices_train=d["train"]["positive_grid_slices"],
        pslices_test=d["test"]["positive_grid_slices"],
        gslices_test=d["test"]["grid_slices"],
        seeds_train=d["train"]["seeds"],
        seeds_val=d["val"]["seeds"],
        seeds_test=d["test"]["seeds"],
        size_table="\n".join(size_rows),
        tau=cal["tau"],
        infer_ms=metrics["cpu_seconds_per_study_1_thread_informational"] * 1000,
        pos_frac=hp["positive_fraction"],
        crop_px=hp["crop_cells"] * CELL_PX,
        lesion_lo=LESION_DIAMETER_MM[0],
        lesion_hi=LESION_DIAMETER_MM[1],
    )


MODEL_CARD_TEMPLATE = """\
# Model card: `lung_ct_cnn` — synthetic chest CT, nodule-like lesion present?

<!-- Generated by triton_models/lung_ct_cnn/train.py; edit the template there, not this file. -->

> **A reference model that proves the pipeline. It is NOT a clinical model: it has never seen a
> real CT scan, it is trained and tested only on synthetic images, and it must never be used for
> diagnosis, screening, triage or any other decision about a patient.**

## What it is

A small 2.5D convolutional network served by Triton (`lung_ct_cnn`, python backend) that reads
one chest CT, resampled to the fixed grid of `workers/dicom/preprocess.py`, and answers

* `STUDY_PROB` FP32 [1]: the probability that the volume holds a nodule-like lesion, and
* `SLICE_SCORES` FP32 [64]: a probability per grid slice (slices feet → head), which the worker
  maps back to the acquired slices with `preprocess.source_slice_scores`.

It exists so that the DICOM path (listener → preprocessing → Triton → results) can be built,
tested and load-tested end to end with a model whose behaviour is known and reproducible.

## Data: synthetic, and how it is made

`medbatch/synth/lung_ct.py` (`synth_volume(seed, n_slices)`, numpy only, deterministic per seed)
draws an axial chest CT in Hounsfield units: air (−1000) around an elliptical body with a
subcutaneous fat layer (≈ −100) and soft-tissue interior (≈ +40); two lungs (≈ −850 with a
posterior density gradient and smooth texture) that narrow to the apices and sit on domed
diaphragms; heart and mediastinum, trachea and main bronchi; **branching, tapering vessel trees**
from each hilum (≈ +40 HU, partial volume at their edges); ribs, sternum and a segmented spine
(+200..+1000 HU); a scanner table; Gaussian noise (σ 15–40 HU). Body size, field of view,
slice count and slice thickness vary. About half of the seeds get 1–3 lesions inside a lung:
lobulated ellipsoids of {lesion_lo:.0f}–{lesion_hi:.0f} mm diameter, solid (−100..+100 HU, 70 %),
part-solid or ground-glass (≈ −500 HU). A vessel cut across is a round blob on one slice, as a
nodule is, but it continues on the neighbouring slices; the model has to use that 3D
compactness and the lesion size, not brightness alone.

* Training: {n_train} volumes ({pos_train} positive, {pslices_train} positive grid slices),
  seeds {seeds_train}.
* Validation: {n_val} volumes, seeds {seeds_val}; used only to fit the slice calibration and the
  study pooling (3 + 2 parameters), never for the encoder.
* Test: {n_test} volumes ({pos_test} positive; {pslices_test} of {gslices_test} grid slices
  positive), seeds {seeds_test}; used only for the numbers below.
* Slice counts log-uniform in [{min_slices}, {max_slices}]; every volume goes through
  `workers.dicom.preprocess.model_input` (linear resampling to 64 × 128 × 128, lung window
  −600 / 1500 HU scaled to [0, 1]), exactly as served.
* Slice labels: grid slice *g* lies at source position *g*·(*n*−1)/63; it is positive when a
  source slice within half a grid step (at least the nearest source slice) holds lesion voxels
  (occupancy ≥ 0.5).

## Architecture

`1/network.py`: each grid slice with its two neighbours as 3 channels (edges repeat); six 3 × 3
convolutions with batch norm and leaky ReLU, three of stride 2, widths {widths}, then a 1 × 1
head ({head} units) → a 16 × 16 lesion logit map per slice (one logit per 8 × 8-pixel cell, about
25 mm); the slice logit is the maximum of its map. Slice scores are the slice logits through
Platt scaling fitted on the validation volumes. The study probability is
**attention pooling** over the 64 slice logits — weights `softmax(logit / tau)` (tau = {tau}
chosen on validation), pooled logit `Σ weight · logit` (a smooth maximum) — followed by a logistic
calibration fitted on the validation volumes. {n_params} parameters. One study takes about
{infer_ms:.0f} ms on one CPU thread (`network.predict`, measured during training).

Triton: python backend, input `VOLUME` FP32 [64, 128, 128] (max batch 8, dynamic batching),
outputs `STUDY_PROB` FP32 [1] and `SLICE_SCORES` FP32 [64]. All requests of one `execute` go
through one forward pass; a malformed request (wrong shape, NaN/inf, values outside [0, 1])
gets its own error response. `config.pbtxt` runs one CPU instance; `configs/gpu.pbtxt`
(`tritonserver --model-config-name=gpu`) one GPU instance (the GPU configuration has so far only
been checked for syntax, not run on a GPU).

## Training

* The encoder is fully convolutional, so it is trained on {crop_px} × {crop_px}-pixel crops of
  the 2.5D slice stacks (cheaper than whole slices) and served on whole slices. {steps} AdamW
  steps (lr {lr}, weight decay {weight_decay}, one-cycle schedule) of {batch_size} crops,
  {pos_frac:.0%} from positive slices (the crop holds a lesion cell) and the rest from negative
  slices (the crop holds a lung cell, drawn with a weight that grows with the vessel content of
  the cell: vessel-rich lung is the hard negative). Random left-right and front-back mirroring.
* Loss: binary cross-entropy of the crop's maximum logit against "the crop holds a lesion",
  plus a dense binary cross-entropy of every map cell against the lesion cells (positive weight
  {map_pos_weight}). The cell targets come from the generator's lesion centres and diameters
  (`train.lesion_cells`); the slice labels themselves come only from the lesion slices mapped
  onto the grid. Training volumes draw 0 (40 %) or 1–4 lesions, to get more positive slices per
  generated volume; validation and test volumes keep the generator's own draw.
* Then the encoder is frozen and the calibration/pooling parameters are fitted on validation
  logits (L-BFGS).
* Deterministic: fixed seeds, `torch.use_deterministic_algorithms(True)`, one torch thread,
  volumes collected in seed order. Two runs give identical tensors; state-dict SHA-256
  (`triton_torch_adapter.model_files.state_dict_sha256`): `{state_sha}`.
* `1/weights.pt`: {weights_bytes} bytes (state dict, hyperparameters, grid and window, metrics).
* Built with torch {torch_version}, numpy {numpy_version}; about {wall_min:.0f} minutes on 2 CPU
  cores (volume generation in 2 processes, training on 1 thread).

Rebuild (from the repository root; rewrites `1/weights.pt`, `metrics.json` and this file,
bit-identically apart from the informational timing fields):

    python triton_models/lung_ct_cnn/train.py

## Held-out synthetic test metrics ({n_test} volumes)

{results_table}

The baseline's slice AUROC uses the per-slice soft-tissue fraction of the lung envelope as the
score. The baseline is near chance at the study level by construction of the data: the vessel
trees put far more soft-tissue voxels into the lungs than a lesion does, and their amount varies
from patient to patient, so counting voxels does not find lesions; shape and 3D extent do. (Its
threshold of 0.5 is off because it is fitted on the training volumes, 60 % positive; the CNN's
study probability is calibrated on the validation volumes instead.) By
the diameter of the largest lesion (positives in the band against all negatives; few volumes
per band, so these numbers are noisy):

| largest lesion | positives | study AUROC | baseline AUROC |
|---|---:|---:|---:|
{size_table}

## Limitations

* **Synthetic only.** The anatomy, the lesions and the noise are simple geometric models; real
  scans have motion, beam hardening, reconstruction kernels, contrast, emphysema, fibrosis,
  atelectasis, effusions, calcified granulomas, scars, airways with walls, devices and real
  nodules with spiculation and pleural tags. Nothing here says how the model would behave on a
  real scan, and it must not be tried on one for any clinical purpose.
* Lesions under ~10 mm occupy one or two grid slices of 2–4 mm pixels after resampling to
  64 × 128 × 128; most of them are missed (see the table above). The preprocessing resamples
  linearly without low-pass filtering, so with very thin source slices a small lesion between
  two grid samples can vanish from the grid (its slice label is still positive).
* The study probability is calibrated on the synthetic validation prevalence (about 50 %).
* Batch norm statistics come from training crops, which hold more lung and less air than whole
  slices; the held-out numbers above are measured on whole slices, as served.
"""


# --------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = run.base_parser(__doc__, splits=(400, 100, 150), unit="volumes", batch_size=64)
    parser.add_argument("--min-slices", type=int, default=40)
    parser.add_argument("--max-slices", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--positive-fraction", type=float, default=0.4)
    parser.add_argument("--widths", type=int, nargs=4, default=[16, 32, 48, 64])
    parser.add_argument("--head", type=int, default=32)
    parser.add_argument("--crop-cells", type=int, default=6, help="crop side in 8-px cells")
    parser.add_argument("--map-weight", type=float, default=1.0)
    parser.add_argument("--map-pos-weight", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=2, help="volume generator processes")
    return parser.parse_args()


def evaluate(model, test: Split) -> tuple[dict, np.ndarray, np.ndarray]:
    """The test metrics of the calibrated model, and its study and slice probabilities."""
    from sklearn.metrics import roc_auc_score

    with torch.inference_mode():
        study_p, slice_p, _ = model.pool(slice_logits(model, test))
    study_p, slice_p = study_p.numpy(), slice_p.numpy()
    study = binary_metrics(test.labels, study_p)
    study["auroc_by_largest_lesion"] = auroc_by_size(test.labels, study_p, test.max_diameter)
    results = {
        "study": study,
        "slice": {
            "auroc": round(float(roc_auc_score(test.slice_labels.ravel(), slice_p.ravel())), 6)
        },
        "study_max_slice_score": {
            "auroc": round(float(roc_auc_score(test.labels, slice_p.max(axis=1))), 6)
        },
    }
    return results, study_p, slice_p


def reference_predictions(test: Split, study_p: np.ndarray, slice_p: np.ndarray) -> list[dict]:
    """The first test volumes, re-scored by tests/triton_models/test_lung_ct_cnn.py."""
    return [
        {
            "seed": int(test.seeds[i]),
            "n_slices": int(test.n_slices[i]),
            "label": int(test.labels[i]),
            "study_prob": round(float(study_p[i]), 6),
            "slice_scores_sum": round(float(slice_p[i].sum()), 6),
        }
        for i in range(6)
    ]


def main() -> None:
    args = parse_args()
    t0 = time.perf_counter()
    run.seed_everything(SEED)
    train = generate("train", args.train, args)
    val = generate("val", args.val, args)
    test = generate("test", args.test, args)
    t_data = time.perf_counter() - t0

    hp = {"widths": list(args.widths), "head": args.head}
    torch.manual_seed(SEED)
    model = network.LungCTNet(widths=tuple(args.widths), head=args.head)
    losses = train_encoder(model, train, args)
    t_train = time.perf_counter() - t0 - t_data

    calibration = fit_calibration(model, slice_logits(model, val), val)
    results, study_p, slice_p = evaluate(model, test)
    base_study, base_slice = run_baseline(train, test)
    per_study_s = run.time_batch(network.predict, model, [test.grids[:1]])
    hyper = {
        **hp,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "positive_fraction": args.positive_fraction,
        "crop_cells": args.crop_cells,
        "map_weight": args.map_weight,
        "map_pos_weight": args.map_pos_weight,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "min_slices": args.min_slices,
        "max_slices": args.max_slices,
        "seed": SEED,
    }
    metrics = {
        "test": results,
        "baseline": {
            "description": "logistic regression on hand-made lung soft-tissue features "
            "(train.baseline_features), fitted on the training volumes",
            "study": base_study,
            "slice": base_slice,
        },
        "calibration": calibration,
        "reference_predictions": reference_predictions(test, study_p, slice_p),
        "train_loss_per_250_steps": losses,
        "hyperparameters": hyper,
        **run.size_and_hash(model),
        "data": {"train": train.summary(), "val": val.summary(), "test": test.summary()},
        "environment": run.environment(),
        **run.timings(per_study_s, 4, t_data, t_train, per="study"),
    }
    payload = {
        "state_dict": model.state_dict(),
        "network_kwargs": hp,
        "grid": list(GRID),
        "window": [WINDOW_CENTER_HU, WINDOW_WIDTH_HU],
        "hyperparameters": hyper,
        "calibration": calibration,
        "state_dict_sha256": metrics["state_dict_sha256"],
        "metrics": {"test": results},
        "synthetic_data_only": True,
    }
    shown = {"test": results, "baseline": metrics["baseline"]}
    run.finish(metrics, payload, shown, args.dry_run, FILES, model_card, t0)


if __name__ == "__main__":
    main()
