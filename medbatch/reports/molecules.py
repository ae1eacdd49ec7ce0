"""Molecules drawn for people: atom contributions as an RDKit similarity map.

A map is a PNG: RDKit's contour fill is thousands of SVG rectangles (about 1 MB a molecule),
while the PNG of the same picture is ~25 kB and still embeds in a self-contained page."""

from __future__ import annotations

import base64
from collections.abc import Sequence

from rdkit import Chem
from rdkit.Chem.Draw import SimilarityMaps, rdMolDraw2D


def similarity_map_png(smiles: str, weights: Sequence[float], size: int = 300) -> bytes:
    """``smiles`` drawn with each atom's weight as a coloured Gaussian (green raises the value,
    pink lowers it; scaled to the molecule's largest weight), as PNG bytes. The weights are in
    the atom order of ``Chem.MolFromSmiles(smiles)``."""
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"SMILES does not parse: {smiles!r}")
    if len(weights) != mol.GetNumAtoms():
        raise ValueError(f"{len(weights)} weights for {mol.GetNumAtoms()} atoms of {smiles!r}")
    drawer = rdMolDraw2D.MolDraw2DCairo(size, size)
    SimilarityMaps.GetSimilarityMapFromWeights(mol, [float(w) for w in weights], draw2d=drawer)
    drawer.FinishDrawing()
    png: bytes = drawer.GetDrawingText()
    return png


def data_uri(png: bytes) -> str:
    """A PNG as a ``data:`` URI for an ``<img>`` of a self-contained page."""
    return "data:image/png;base64," + base64.b64encode(png).decode()
