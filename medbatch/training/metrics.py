"""Held-out metrics of a binary risk model, shared by the EHR training scripts so that every
model card reports the same figures computed the same way. scikit-learn is imported inside the
functions (training-only dependency)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np


def auroc(scores: list[float], labels: list[int]) -> float | None:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) formula, ties averaged; None
    without both classes. Plain numpy: the demo uses it where scikit-learn is not installed."""
    y = np.asarray(labels)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if not n_pos or not n_neg:
        return None
    _, where, counts = np.unique(np.asarray(scores), return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[where]  # 1-based, ties share their mean
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """AUROC, Brier score, expected calibration error (10 equal-count bins), mean predicted
    risk against the observed rate."""
    from sklearn.metrics import brier_score_loss, roc_auc_score

    order = np.argsort(p, kind="stable")
    ece = 0.0
    for part in np.array_split(order, 10):
        ece += len(part) / len(p) * abs(float(p[part].mean()) - float(y[part].mean()))
    return {
        "auroc": round(float(roc_auc_score(y, p)), 6),
        "brier": round(float(brier_score_loss(y, p)), 6),
        "ece_10_bins": round(ece, 6),
        "mean_predicted": round(float(p.mean()), 6),
        "observed_rate": round(float(y.mean()), 6),
    }


def paired_auroc_difference(
    y: np.ndarray, a: np.ndarray, b: np.ndarray, seed: int, resamples: int = 500
) -> dict[str, Any]:
    """AUROC(a) − AUROC(b) on the same patients with a 95 % paired bootstrap interval (the
    resamples drawn from ``seed``, so the interval is reproducible)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples):
        idx = rng.integers(0, len(y), len(y))
        diffs.append(roc_auc_score(y[idx], a[idx]) - roc_auc_score(y[idx], b[idx]))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    point = roc_auc_score(y, a) - roc_auc_score(y, b)
    return {
        "difference": round(float(point), 6),
        "ci95": [round(float(lo), 6), round(float(hi), 6)],
    }


def held_out_results(
    y: np.ndarray, p_model: np.ndarray, p_baseline: np.ndarray, p_true: np.ndarray, seed: int
) -> dict[str, Any]:
    """The model, the baseline and the true generating probability (the ceiling) on the test
    patients, with the paired AUROC differences model − baseline and ceiling − model."""
    return {
        "model": binary_metrics(y, p_model),
        "baseline_logistic_regression": binary_metrics(y, p_baseline),
        "truth_probability_ceiling": binary_metrics(y, p_true),
        "model_minus_baseline_auroc": paired_auroc_difference(y, p_model, p_baseline, seed),
        "ceiling_minus_model_auroc": paired_auroc_difference(y, p_true, p_model, seed),
    }


def logistic_baseline(train_x: np.ndarray, y: np.ndarray, test_x: np.ndarray) -> np.ndarray:
    """Logistic regression (missing → training mean, standardised); test probabilities."""
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(
        SimpleImputer(strategy="mean"), StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)
    )
    clf.fit(train_x, y)
    probabilities: np.ndarray = clf.predict_proba(test_x)[:, 1]
    return probabilities


def contribution_summary(
    contribution: np.ndarray, risk: np.ndarray, variables: Iterable[str]
) -> dict[str, dict[str, float | None]]:
    """Per variable: mean contribution, and how often it is the largest one (all patients, and
    those with a risk above 0.5)."""
    top = contribution.argmax(axis=1)
    high = risk > 0.5
    return {
        name: {
            "mean": round(float(contribution[:, j].mean()), 5),
            "top_share": round(float((top == j).mean()), 4),
            "top_share_risk_above_0.5": round(float((top[high] == j).mean()), 4)
            if high.any()
            else None,
        }
        for j, name in enumerate(variables)
    }
