"""Padded chunk arrays from per-molecule graphs: numpy only, so benchmarks and tools that replay
stored graphs need no RDKit. The layout is documented in :mod:`workers.chem.featurize`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

N_ATOM_FEATURES = 8
N_BOND_FEATURES = 4


@dataclass(frozen=True, slots=True)
class MolGraph:
    """One molecule as arrays: atoms [n, 8], bond endpoints [m, 2], bond features [m, 4]."""

    atoms: np.ndarray
    bond_index: np.ndarray
    bonds: np.ndarray


def pad_graphs(graphs: Sequence[MolGraph]) -> dict[str, np.ndarray]:
    """Stack graphs into the padded chunk arrays named in the module docstring.

    ``A`` and ``E`` are at least 1 so that no tensor has a zero-sized axis (a molecule of one
    atom has no bond; the counts say what is real).
    """
    if not graphs:
        raise ValueError("cannot pad an empty chunk")
    b = len(graphs)
    a = max(1, max(len(g.atoms) for g in graphs))
    e = max(1, max(len(g.bonds) for g in graphs))
    atom_feats = np.zeros((b, a, N_ATOM_FEATURES), dtype=np.uint8)
    bond_index = np.zeros((b, e, 2), dtype=np.int32)
    bond_feats = np.zeros((b, e, N_BOND_FEATURES), dtype=np.uint8)
    n_atoms = np.zeros((b, 1), dtype=np.int32)
    n_bonds = np.zeros((b, 1), dtype=np.int32)
    for i, g in enumerate(graphs):
        na, nb = len(g.atoms), len(g.bonds)
        atom_feats[i, :na] = g.atoms
        bond_index[i, :nb] = g.bond_index
        bond_feats[i, :nb] = g.bonds
        n_atoms[i, 0] = na
        n_bonds[i, 0] = nb
    return {
        "ATOM_FEATS": atom_feats,
        "N_ATOMS": n_atoms,
        "BOND_INDEX": bond_index,
        "BOND_FEATS": bond_feats,
        "N_BONDS": n_bonds,
    }
