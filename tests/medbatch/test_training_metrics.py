"""The AUROC the EHR demo prints against the generator's truth."""

from __future__ import annotations

import pytest

from medbatch.training.metrics import auroc


def test_auroc_counts_ordered_pairs_and_halves_ties() -> None:
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auroc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == pytest.approx(0.5)
    assert auroc([0.9, 0.1], [1, 0]) == pytest.approx(1.0)
    assert auroc([0.2, 0.3], [1, 1]) is None  # one class only: undefined
