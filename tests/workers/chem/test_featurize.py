"""Featurisation checked against RDKit's own view of known molecules."""

from __future__ import annotations

import numpy as np
import pytest
from rdkit import Chem

from workers.chem.featurize import (
    ATOM_FEATURES,
    BOND_FEATURES,
    featurize_smiles,
    mol_to_graph,
    pad_graphs,
)

ATOM_COL = {name: i for i, (name, _) in enumerate(ATOM_FEATURES)}
BOND_COL = {name: i for i, (name, _) in enumerate(BOND_FEATURES)}


def test_benzene_is_six_aromatic_ring_atoms_and_bonds() -> None:
    g = mol_to_graph(Chem.MolFromSmiles("c1ccccc1"))
    assert g.atoms.shape == (6, len(ATOM_FEATURES)) and g.bonds.shape == (6, len(BOND_FEATURES))
    assert (g.atoms[:, ATOM_COL["atomic_num"]] == 6).all()
    assert (g.atoms[:, ATOM_COL["is_aromatic"]] == 1).all()
    assert (g.atoms[:, ATOM_COL["is_in_ring"]] == 1).all()
    assert (g.atoms[:, ATOM_COL["total_num_hs"]] == 1).all()
    assert (g.atoms[:, ATOM_COL["total_degree"]] == 3).all()
    assert (g.atoms[:, ATOM_COL["hybridization"]] == int(Chem.HybridizationType.SP2)).all()
    assert (g.bonds[:, BOND_COL["bond_type"]] == 3).all()  # aromatic
    assert (g.bonds[:, BOND_COL["is_conjugated"]] == 1).all()


def test_acetic_acid_matches_rdkit_atom_by_atom() -> None:
    mol = Chem.MolFromSmiles("CC(=O)O")
    g = mol_to_graph(mol)
    for atom, row in zip(mol.GetAtoms(), g.atoms, strict=True):
        assert row[ATOM_COL["atomic_num"]] == atom.GetAtomicNum()
        assert row[ATOM_COL["total_num_hs"]] == atom.GetTotalNumHs()
        assert row[ATOM_COL["total_degree"]] == atom.GetTotalDegree()
        assert row[ATOM_COL["hybridization"]] == int(atom.GetHybridization())
    for bond, (a, b) in zip(mol.GetBonds(), g.bond_index, strict=True):
        assert (a, b) == (bond.GetBeginAtomIdx(), bond.GetEndAtomIdx())
    types = sorted(int(t) for t in g.bonds[:, BOND_COL["bond_type"]])
    assert types == [0, 0, 1]  # two single, one double


def test_charge_and_chirality() -> None:
    g = mol_to_graph(Chem.MolFromSmiles("C[C@H](N)C(=O)[O-]"))
    charges = g.atoms[:, ATOM_COL["formal_charge"]].astype(int) - 3
    assert sorted(charges.tolist()) == [-1, 0, 0, 0, 0, 0]
    tags = g.atoms[:, ATOM_COL["chiral_tag"]]
    assert int(tags[1]) == int(Chem.ChiralType.CHI_TETRAHEDRAL_CCW)
    assert (np.delete(tags, 1) == 0).all()


def test_stereo_double_bond() -> None:
    g = mol_to_graph(Chem.MolFromSmiles("C/C=C/C"))
    stereo = g.bonds[:, BOND_COL["stereo"]]
    assert int(stereo[1]) == int(Chem.BondStereo.STEREOE)


@pytest.mark.parametrize("smiles", ["[Na+]", "[U]", "[Og]"])
def test_values_stay_inside_vocabularies(smiles: str) -> None:
    g = mol_to_graph(Chem.MolFromSmiles(smiles))
    for col, (_, size) in enumerate(ATOM_FEATURES):
        assert int(g.atoms[:, col].max()) < size


def test_numpy_only_padding_agrees_on_widths() -> None:
    from workers.chem.graph_arrays import N_ATOM_FEATURES, N_BOND_FEATURES

    assert (len(ATOM_FEATURES), len(BOND_FEATURES)) == (N_ATOM_FEATURES, N_BOND_FEATURES)


def test_padding_layout() -> None:
    arrays = featurize_smiles(["CCO", "c1ccccc1", "[Na+]"])
    assert arrays["ATOM_FEATS"].shape == (3, 6, 8) and arrays["ATOM_FEATS"].dtype == np.uint8
    assert arrays["BOND_INDEX"].shape == (3, 6, 2) and arrays["BOND_INDEX"].dtype == np.int32
    assert arrays["N_ATOMS"].ravel().tolist() == [3, 6, 1]
    assert arrays["N_BONDS"].ravel().tolist() == [2, 6, 0]
    assert not arrays["ATOM_FEATS"][0, 3:].any()  # padding is zero
    assert not arrays["BOND_FEATS"][2].any()


def test_single_atom_chunk_has_no_zero_sized_axis() -> None:
    arrays = pad_graphs([mol_to_graph(Chem.MolFromSmiles("[Cl-]"))])
    assert arrays["BOND_INDEX"].shape == (1, 1, 2) and arrays["N_BONDS"][0, 0] == 0


def test_unparseable_stored_smiles_fails_loudly() -> None:
    with pytest.raises(ValueError, match="no longer parses"):
        featurize_smiles(["CCO", "C1CC("])


VARIED = [
    "C[C@H](N)C(=O)[O-]",
    "C/C=C/C",
    "F/C=C\\Cl",
    "c1ccc2[nH]ccc2c1",
    "[Na+].[Cl-]",
    "O=[N+]([O-])c1ccccc1",
    "C[C@@]1(O)CC[C@H](C)CC1",
    "[U]",
    "C#N",
    "CC(C)(C)[Si](C)(C)OC",
]


def test_chunk_rows_equal_the_row_by_row_features() -> None:
    from workers.chem.featurize import (
        atom_feature_row,
        bond_feature_row,
        featurize_mols,
        parse_canonical,
    )

    canonical = [Chem.MolToSmiles(Chem.MolFromSmiles(s)) for s in VARIED]
    mols = parse_canonical(canonical)
    arrays = featurize_mols(mols)
    reference = pad_graphs([mol_to_graph(m) for m in mols])
    for name, value in reference.items():
        np.testing.assert_array_equal(arrays[name], value, err_msg=name)
    for name, value in featurize_smiles(canonical).items():
        np.testing.assert_array_equal(arrays[name], value, err_msg=name)
    for i, mol in enumerate(mols):
        atoms = [atom_feature_row(a) for a in mol.GetAtoms()]
        assert arrays["ATOM_FEATS"][i, : len(atoms)].tolist() == [list(r) for r in atoms]
        bonds = [bond_feature_row(b) for b in mol.GetBonds()]
        ends = [[b.GetBeginAtomIdx(), b.GetEndAtomIdx()] for b in mol.GetBonds()]
        assert arrays["BOND_FEATS"][i, : len(bonds)].tolist() == [list(r) for r in bonds]
        assert arrays["BOND_INDEX"][i, : len(bonds)].tolist() == ends
