"""Applicability domain and calibrated interval of a chem model, from the file its ``train.py``
writes beside the weights (``ServedModel.applicability_file``).

Why: a model trained on ~1,000 small neutral organic molecules still returns a number for a
salt, a metal complex or a C50 alkane. Each scored molecule gets, beside the model's outputs,

* ``logS_lower`` / ``logS_upper``: a conformal 90 % interval around the ensemble mean, its
  half-width the quantile of held-out absolute errors on the calibration split (optionally
  scaled by the members' spread, when the file says the normalised score measured better);
* ``in_domain`` / ``domain_reason``: whether the molecule looks like the training data — every
  element seen in training, as many fragments and heavy atoms as training molecules had, and a
  Morgan-fingerprint Tanimoto similarity to its nearest training molecule at or above the
  threshold chosen on the calibration split. Out-of-domain molecules are still scored.

The same functions are used by ``triton_models/molecule_gnn/train.py`` to choose the
thresholds, so training and serving cannot disagree on what a molecule's inputs are.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from rdkit import Chem, DataStructs
from rdkit.Chem import rdFingerprintGenerator, rdMolDescriptors

from core.served_models import ServedModel
from core.settings import Settings

#: The fingerprint the domain compares: Morgan, radius 2, 2,048 bits (ECFP4-like).
FP_RADIUS = 2
FP_BITS = 2048
#: An element symbol in a molecular formula (RDKit's, from C++: ten times faster than a Python
#: loop over the atoms).
_ELEMENT = re.compile(r"[A-Z][a-z]?")


@cache
def _generator(radius: int, bits: int) -> Any:
    return rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=bits)


@dataclass(frozen=True)
class DomainInputs:
    """What the domain check needs of one molecule, computed once from its RDKit molecule."""

    fingerprint: DataStructs.ExplicitBitVect
    elements: frozenset[str]
    heavy_atoms: int
    fragments: int


def domain_inputs(
    mol: Chem.Mol | str, radius: int = FP_RADIUS, bits: int = FP_BITS
) -> DomainInputs:
    """The domain inputs of an RDKit molecule (or of a SMILES, parsed here): its Morgan
    fingerprint, its elements (hydrogen included), heavy atoms and fragments.

    A SMILES is parsed without RDKit's full sanitisation (aromaticity perception and
    kekulisation are ~90 % of a parse, and a canonical SMILES already says which atoms are
    aromatic): only implicit valences and ring membership, which is what these inputs read.
    For RDKit's canonical SMILES the result equals a sanitised parse (tested on the training
    set and the NCI set). Raises :class:`ValueError` if a SMILES does not parse."""
    if isinstance(mol, str):
        mol = _quick_parse(mol)
    return DomainInputs(
        fingerprint=_generator(radius, bits).GetFingerprint(mol),
        elements=frozenset(_ELEMENT.findall(rdMolDescriptors.CalcMolFormula(mol))),
        heavy_atoms=mol.GetNumHeavyAtoms(),
        fragments=len(Chem.GetMolFrags(mol)),
    )


def _quick_parse(smiles: str) -> Chem.Mol:
    """A molecule from a (canonical) SMILES, with valences and rings but unsanitised."""
    mol = Chem.MolFromSmiles(smiles, sanitize=False)
    if mol is None:
        raise ValueError(f"SMILES does not parse: {smiles!r}")
    mol.UpdatePropertyCache(strict=False)
    Chem.FastFindRings(mol)
    return mol


def nearest_similarity(
    query: DataStructs.ExplicitBitVect, training: Sequence[DataStructs.ExplicitBitVect]
) -> float:
    """Tanimoto similarity of ``query`` to its nearest training molecule (RDKit's bulk
    similarity, in C++ over the whole training set)."""
    if not training:
        return 0.0
    return float(max(DataStructs.BulkTanimotoSimilarity(query, list(training))))


#: Training molecules compared per bulk call while looking for one at or above the threshold.
BLOCK = 64


def similar_enough(
    query: DataStructs.ExplicitBitVect,
    training: Sequence[DataStructs.ExplicitBitVect],
    threshold: float,
) -> float | None:
    """``None`` if some training molecule is at least ``threshold`` similar to ``query``, else
    the similarity of the nearest one.

    Why: the domain only needs the nearest similarity of a molecule that falls short. The
    training file lists its molecules in greedy set-cover order (each next one is at least
    ``threshold`` similar to the most molecules its predecessors did not reach,
    :func:`cover_order`), so most in-domain molecules find a neighbour in the first block or
    two: about a quarter of the comparisons of one bulk call over the whole set, same answer.
    """
    nearest = 0.0
    for first in range(0, len(training), BLOCK):
        block = training[first : first + BLOCK]
        nearest = max(nearest, *DataStructs.BulkTanimotoSimilarity(query, list(block)))
        if nearest >= threshold:
            return None
    return float(nearest)


def cover_order(fingerprints: Sequence[DataStructs.ExplicitBitVect], threshold: float) -> list[int]:
    """Indices of ``fingerprints`` in greedy set-cover order for :func:`similar_enough`: each
    next one reaches (similarity ≥ ``threshold``) the most molecules not reached before; ties
    and the rest by index."""
    sims = np.asarray(
        [DataStructs.BulkTanimotoSimilarity(fp, list(fingerprints)) for fp in fingerprints]
    )
    reach = sims >= threshold
    covered = np.zeros(len(fingerprints), dtype=bool)
    order: list[int] = []
    free = np.ones(len(fingerprints), dtype=bool)
    while free.any():
        gains = np.where(free, (reach & ~covered[None, :]).sum(axis=1), -1)
        best = int(np.argmax(gains))
        if gains[best] <= 0:
            break
        order.append(best)
        free[best] = False
        covered |= reach[best]
    return order + [int(i) for i in np.flatnonzero(free)]


@dataclass(frozen=True)
class Applicability:
    """The calibrated interval and the applicability domain of one model version."""

    coverage: float
    method: str  # "absolute": logS ± q; "normalised": logS ± q · logS_std
    quantile: float
    similarity_threshold: float
    elements: frozenset[str]
    heavy_atoms: tuple[int, int]
    max_fragments: int
    radius: int
    bits: int
    training_fingerprints: tuple[DataStructs.ExplicitBitVect, ...]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Applicability:
        interval, domain = data["interval"], data["domain"]
        fp = domain["fingerprint"]
        generator = _generator(int(fp["radius"]), int(fp["bits"]))
        fingerprints = []
        for smi in domain["training_smiles"]:
            mol = Chem.MolFromSmiles(smi)
            if mol is None:
                raise ValueError(f"training SMILES in the applicability file does not parse: {smi}")
            fingerprints.append(generator.GetFingerprint(mol))
        low, high = domain["heavy_atoms"]
        return cls(
            coverage=float(interval["coverage"]),
            method=str(interval["method"]),
            quantile=float(interval["quantile"]),
            similarity_threshold=float(domain["similarity_threshold"]),
            elements=frozenset(domain["elements"]),
            heavy_atoms=(int(low), int(high)),
            max_fragments=int(domain["max_fragments"]),
            radius=int(fp["radius"]),
            bits=int(fp["bits"]),
            training_fingerprints=tuple(fingerprints),
        )

    def interval(
        self, logs: float | None, spread: float | None
    ) -> tuple[float | None, float | None]:
        """(lower, upper) of the calibrated interval, or (None, None) without a prediction."""
        if logs is None or not math.isfinite(logs):
            return None, None
        half = self.quantile
        if self.method == "normalised":
            if spread is None or not math.isfinite(spread):
                return None, None
            half = self.quantile * spread
        return logs - half, logs + half

    def reason(self, inputs: DomainInputs) -> str:
        """Why the molecule is outside the domain ("; "-joined), or "" when it is inside."""
        reasons = []
        unseen = sorted(inputs.elements - self.elements)
        if unseen:
            reasons.append(f"element not in training data: {', '.join(unseen)}")
        if inputs.fragments > self.max_fragments:
            reasons.append(
                f"{inputs.fragments} fragments (salt or mixture); training molecules have "
                f"at most {self.max_fragments}"
            )
        low, high = self.heavy_atoms
        if not low <= inputs.heavy_atoms <= high:
            reasons.append(
                f"size outside training range: {inputs.heavy_atoms} heavy atoms "
                f"(training {low}–{high})"
            )
        similarity = similar_enough(
            inputs.fingerprint, self.training_fingerprints, self.similarity_threshold
        )
        if similarity is not None:
            reasons.append(
                f"nearest training molecule similarity {similarity:.2f} < "
                f"{self.similarity_threshold:.2f}"
            )
        return "; ".join(reasons)

    def assess(
        self,
        molecules: Sequence[Chem.Mol | str],
        values: Sequence[float | None],
        spreads: Sequence[float | None],
    ) -> list[tuple[float | None, float | None, bool, str]]:
        """(lower, upper, in domain, reason) of each molecule, in order: the values of the
        model's ``derived`` fields (named in ``core.served_models``)."""
        out = []
        for mol, value, spread in zip(molecules, values, spreads, strict=True):
            lower, upper = self.interval(value, spread)
            why = self.reason(domain_inputs(mol, self.radius, self.bits))
            out.append((lower, upper, not why, why))
        return out


def applicability_for(model: ServedModel, version: str, settings: Settings) -> Applicability | None:
    """The applicability of ``model`` at ``version`` (its file in the Triton model repository),
    or ``None`` for a model without one."""
    if model.applicability_file is None:
        return None
    return load_applicability(
        Path(settings.triton_model_repository) / model.name / version / model.applicability_file
    )


@cache
def load_applicability(path: Path) -> Applicability:
    """The applicability file of a model version (read once per process)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} is missing: rebuild it with the model's train.py (--applicability-only "
            "keeps the weights)"
        ) from None
    return Applicability.from_dict(data)


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """The split-conformal quantile: the ⌈coverage·(n+1)⌉-th smallest score (finite-sample
    valid for exchangeable data)."""
    n = len(scores)
    rank = min(n, math.ceil(coverage * (n + 1)))
    return float(np.sort(scores)[rank - 1])
