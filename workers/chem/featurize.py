"""RDKit molecule → padded graph arrays, the wire format of the ``molecule_gnn`` Triton model.

Why categorical integers instead of one-hot floats: a chunk of 512 molecules travels to Triton
as a few hundred kilobytes of ``uint8`` instead of megabytes of ``float32``; the model turns the
indices into learned embeddings. The same function feeds training (``triton_models/molecule_gnn/
train.py``) and serving, so the model never sees features computed two different ways.

The padding itself lives in :mod:`workers.chem.graph_arrays` (numpy only, no RDKit).

Layout of one chunk of ``B`` molecules (``A`` = most atoms, ``E`` = most bonds in the chunk):

==============  ==========  ============  =================================================
name            dtype       shape         meaning
==============  ==========  ============  =================================================
``ATOM_FEATS``  uint8       [B, A, 8]     :data:`ATOM_FEATURES`, zero-padded past ``N_ATOMS``
``N_ATOMS``     int32       [B, 1]        real atoms of each molecule
``BOND_INDEX``  int32       [B, E, 2]     begin/end atom index of each bond (undirected)
``BOND_FEATS``  uint8       [B, E, 4]     :data:`BOND_FEATURES`, zero-padded past ``N_BONDS``
``N_BONDS``     int32       [B, 1]        real bonds of each molecule
==============  ==========  ============  =================================================
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rdkit import Chem

from workers.chem.graph_arrays import MolGraph, pad_graphs

#: Name and vocabulary size of each atom feature column. Values at or above the size are clipped
#: to ``size - 1`` (an "other" bucket), so the model's embedding tables can never be indexed out
#: of range.
ATOM_FEATURES: tuple[tuple[str, int], ...] = (
    ("atomic_num", 120),  # 1..118, 119 = other, 0 = dummy atom
    ("total_degree", 7),  # 0..5, 6 = six or more
    ("formal_charge", 7),  # charge + 3 for -3..+3, clipped
    ("total_num_hs", 5),  # 0..3, 4 = four or more
    ("hybridization", 8),  # rdkit HybridizationType enum value (UNSPECIFIED..OTHER), clipped
    ("is_aromatic", 2),
    ("is_in_ring", 2),
    ("chiral_tag", 4),  # rdkit ChiralType: unspecified, CW, CCW, other
)
#: Name and vocabulary size of each bond feature column.
BOND_FEATURES: tuple[tuple[str, int], ...] = (
    ("bond_type", 5),  # single, double, triple, aromatic, other
    ("is_conjugated", 2),
    ("is_in_ring", 2),
    ("stereo", 6),  # rdkit BondStereo enum value, clipped
)

_BOND_TYPE = {
    Chem.BondType.SINGLE: 0,
    Chem.BondType.DOUBLE: 1,
    Chem.BondType.TRIPLE: 2,
    Chem.BondType.AROMATIC: 3,
}


def atom_feature_row(atom: Chem.Atom) -> tuple[int, ...]:
    """The categorical feature row of one atom, each value inside its vocabulary."""
    raw = (
        atom.GetAtomicNum(),
        atom.GetTotalDegree(),
        atom.GetFormalCharge() + 3,
        atom.GetTotalNumHs(),
        int(atom.GetHybridization()),
        int(atom.GetIsAromatic()),
        int(atom.IsInRing()),
        int(atom.GetChiralTag()),
    )
    return tuple(min(max(v, 0), size - 1) for v, (_, size) in zip(raw, ATOM_FEATURES, strict=True))


def bond_feature_row(bond: Chem.Bond) -> tuple[int, ...]:
    """The categorical feature row of one bond, each value inside its vocabulary."""
    raw = (
        _BOND_TYPE.get(bond.GetBondType(), 4),
        int(bond.GetIsConjugated()),
        int(bond.IsInRing()),
        int(bond.GetStereo()),
    )
    return tuple(min(max(v, 0), size - 1) for v, (_, size) in zip(raw, BOND_FEATURES, strict=True))


#: Largest value of each column; values are clipped into ``[0, max]`` (see the tables above).
_ATOM_MAX = np.array([size - 1 for _, size in ATOM_FEATURES], dtype=np.int64)
_BOND_MAX = np.array([size - 1 for _, size in BOND_FEATURES], dtype=np.int64)


def mol_to_graph(mol: Chem.Mol) -> MolGraph:
    """Featurise one sanitised RDKit molecule (implicit hydrogens, as parsed from SMILES).

    Same values as :func:`atom_feature_row` / :func:`bond_feature_row` row by row, but the
    clipping runs once per molecule in numpy: the per-value Python work was the workers' hottest
    loop after RDKit's parse.
    """
    atoms = np.array(
        [
            (
                a.GetAtomicNum(),
                a.GetTotalDegree(),
                a.GetFormalCharge() + 3,
                a.GetTotalNumHs(),
                int(a.GetHybridization()),
                a.GetIsAromatic(),
                a.IsInRing(),
                int(a.GetChiralTag()),
            )
            for a in mol.GetAtoms()
        ],
        dtype=np.int64,
    ).reshape(-1, len(ATOM_FEATURES))
    bond_raw = [
        (
            b.GetBeginAtomIdx(),
            b.GetEndAtomIdx(),
            _BOND_TYPE.get(b.GetBondType(), 4),
            b.GetIsConjugated(),
            b.IsInRing(),
            int(b.GetStereo()),
        )
        for b in mol.GetBonds()
    ]
    bonds = np.array(bond_raw, dtype=np.int64).reshape(-1, 2 + len(BOND_FEATURES))
    return MolGraph(
        atoms=np.clip(atoms, 0, _ATOM_MAX).astype(np.uint8),
        bond_index=bonds[:, :2].astype(np.int32),
        bonds=np.clip(bonds[:, 2:], 0, _BOND_MAX).astype(np.uint8),
    )


def featurize_smiles(smiles: Sequence[str]) -> dict[str, np.ndarray]:
    """Featurise canonical SMILES that ingest has already validated.

    Raises :class:`ValueError` naming the SMILES if one no longer parses (a database edited by
    hand, or an RDKit upgrade that changed its mind), so the chunk fails loudly instead of
    scoring a shifted row.
    """
    graphs = []
    for smi in smiles:
        mol = Chem.MolFromSmiles(smi)
        if mol is None:
            raise ValueError(f"stored canonical SMILES no longer parses with this RDKit: {smi!r}")
        graphs.append(mol_to_graph(mol))
    return pad_graphs(graphs)
