"""The applicability domain and calibrated interval of ``molecule_gnn``, from the committed
``1/applicability.json`` (issue 15): salts, metal complexes and very long alkanes are out of
domain with a reason; common drugs are in."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rdkit import Chem

from core.served_models import MOLECULE_GNN
from core.settings import Settings
from workers.chem.domain import (
    Applicability,
    applicability_for,
    conformal_quantile,
    cover_order,
    domain_inputs,
    load_applicability,
    nearest_similarity,
    similar_enough,
)

FILE = (
    Path(__file__).resolve().parents[3]
    / "triton_models"
    / "molecule_gnn"
    / "1"
    / str(MOLECULE_GNN.applicability_file)
)

DRUGS = {
    "aspirin": "CC(=O)Oc1ccccc1C(=O)O",
    "caffeine": "Cn1c(=O)c2c(ncn2C)n(C)c1=O",
    "ibuprofen": "CC(C)Cc1ccc(C(C)C(=O)O)cc1",
}
OUTSIDE = {
    "salt": ("[Na+].[Cl-]", ["element not in training data: Na", "2 fragments"]),
    "cisplatin": ("N.N.Cl[Pt]Cl", ["element not in training data: Pt", "3 fragments"]),
    "ferrocene": (
        "[CH-]1C=CC=C1.[CH-]1C=CC=C1.[Fe+2]",
        ["element not in training data: Fe", "3 fragments"],
    ),
    "C50 alkane": ("C" * 50, ["size outside training range: 50 heavy atoms"]),
}


@pytest.fixture(scope="module")
def app() -> Applicability:
    return load_applicability(FILE)


@pytest.mark.parametrize("name", sorted(DRUGS))
def test_common_drugs_are_in_domain(app: Applicability, name: str) -> None:
    assert app.reason(domain_inputs(DRUGS[name])) == ""


@pytest.mark.parametrize("name", sorted(OUTSIDE))
def test_salts_metal_complexes_and_long_alkanes_are_out_with_a_reason(
    app: Applicability, name: str
) -> None:
    smiles, expected = OUTSIDE[name]
    reason = app.reason(domain_inputs(smiles))
    for part in expected:
        assert part in reason, reason


def test_a_molecule_unlike_any_training_molecule_is_out_by_similarity(app: Applicability) -> None:
    # A fluorinated cage peptide-like molecule: organic, small, known elements, yet unlike
    # the training set.
    smiles = "FC(F)(F)C12CC3(NC(=O)C45CC6CC(C4)CC(C6)C5)CC(C1)CC(C3)C2"
    reason = app.reason(domain_inputs(smiles))
    assert reason.startswith("nearest training molecule similarity "), reason
    similarity = float(reason.split()[4])
    assert similarity < app.similarity_threshold


def test_mol_and_smiles_give_the_same_inputs() -> None:
    mol = Chem.MolFromSmiles(DRUGS["caffeine"])
    a, b = domain_inputs(mol), domain_inputs(DRUGS["caffeine"])
    assert a.fingerprint == b.fingerprint
    assert (a.elements, a.heavy_atoms, a.fragments) == ({"C", "H", "N", "O"}, 14, 1)
    assert (a.elements, a.heavy_atoms, a.fragments) == (b.elements, b.heavy_atoms, b.fragments)
    with pytest.raises(ValueError, match="does not parse"):
        domain_inputs("C1CC(")


def test_the_interval_and_what_assess_returns(app: Applicability) -> None:
    assert app.method == "absolute" and 0.5 < app.quantile < 1.5
    lower, upper = app.interval(-3.0, 0.2)
    assert lower == pytest.approx(-3.0 - app.quantile) and upper == pytest.approx(
        -3.0 + app.quantile
    )
    assert app.interval(None, 0.2) == (None, None)
    assert app.interval(float("nan"), 0.2) == (None, None)
    rows = app.assess([DRUGS["aspirin"], "[Na+].[Cl-]"], [-2.0, None], [0.1, None])
    assert rows[0][2:] == (True, "") and rows[0][0] == pytest.approx(-2.0 - app.quantile)
    assert rows[1][:3] == (None, None, False) and "Na" in rows[1][3]
    assert len(MOLECULE_GNN.derived) == len(rows[0])


def test_a_normalised_interval_scales_with_the_spread(app: Applicability) -> None:
    data = json.loads(FILE.read_text())
    data["interval"] = {"coverage": 0.9, "method": "normalised", "quantile": 2.0}
    data["domain"]["training_smiles"] = data["domain"]["training_smiles"][:5]
    norm = Applicability.from_dict(data)
    assert norm.interval(-3.0, 0.25) == (-3.5, -2.5)
    assert norm.interval(-3.0, None) == (None, None)


def test_conformal_quantile_is_the_finite_sample_rank() -> None:
    scores = np.arange(1, 101, dtype=float)  # 1 … 100
    assert conformal_quantile(scores, 0.9) == 91.0  # ⌈0.9 · 101⌉ = 91st smallest
    assert conformal_quantile(scores[:5], 0.9) == 5.0  # capped at n


def test_the_committed_file_matches_the_registry_and_the_training_data() -> None:
    data = json.loads(FILE.read_text())
    assert data["interval"]["coverage"] == 0.9
    assert len(data["domain"]["training_smiles"]) == 1025
    assert set(data["domain"]["elements"]) >= {"C", "N", "O", "Cl"}
    assert applicability_for(MOLECULE_GNN, "1", Settings()) is load_applicability(FILE)


def test_a_missing_file_says_how_to_rebuild_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--applicability-only"):
        load_applicability(tmp_path / "applicability.json")


def test_the_quick_parse_of_a_canonical_smiles_equals_a_sanitised_parse() -> None:
    """The worker parses stored canonical SMILES without full sanitisation; the domain inputs
    must be those of the sanitised molecule (training set and RDKit's NCI molecules)."""
    from rdkit import RDConfig, rdBase

    smiles = json.loads(FILE.read_text())["domain"]["training_smiles"]
    nci = (Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi").read_text().splitlines()[:2000]
    with rdBase.BlockLogs():  # scoped: ingest's capture of RDKit's messages must keep working
        for line in nci:
            mol = Chem.MolFromSmiles(line.split()[0]) if line.strip() else None
            if mol is not None:
                smiles.append(Chem.MolToSmiles(mol))
    assert len(smiles) > 2900
    differ = []
    for smi in smiles:
        quick, full = domain_inputs(smi), domain_inputs(Chem.MolFromSmiles(smi))
        if quick != full:
            differ.append(smi)
    assert differ == []


def test_the_early_exit_gives_the_full_scans_answer(app: Applicability) -> None:
    """``similar_enough`` stops at the first block holding a neighbour above the threshold;
    its verdict, and the similarity it reports when there is none, are the full scan's."""
    from rdkit import RDConfig, rdBase

    nci = (Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi").read_text().splitlines()[:600]
    with rdBase.BlockLogs():
        queries = [s.split()[0] for s in nci if s.strip() and Chem.MolFromSmiles(s.split()[0])]
    queries += list(DRUGS.values()) + [s for s, _ in OUTSIDE.values()]
    short = 0
    for smi in queries:
        fp = domain_inputs(smi).fingerprint
        full = nearest_similarity(fp, app.training_fingerprints)
        got = similar_enough(fp, app.training_fingerprints, app.similarity_threshold)
        if full >= app.similarity_threshold:
            assert got is None, smi
        else:
            short += 1
            assert got == pytest.approx(full, abs=1e-12), smi
    assert short > 10  # both branches were exercised


def test_cover_order_puts_the_molecule_reaching_most_first() -> None:
    smiles = ("CCO", "CCCO", "CCCCO", "c1ccccc1", "CCCCCO", "Oc1ccccc1")
    fps = [domain_inputs(s).fingerprint for s in smiles]
    # At 0.5, propanol reaches the four alcohols; benzene and phenol (0.27) only themselves;
    # then the rest, already reached, by index.
    assert cover_order(fps, 0.5) == [1, 3, 5, 0, 2, 4]
    # At 0.3, ethanol reaches the four alcohols too: ties go to the lower index.
    assert cover_order(fps, 0.3) == [0, 3, 5, 1, 2, 4]
