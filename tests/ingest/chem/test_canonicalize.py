"""Canonicalisation: same molecule → same key; bad molecule → RDKit's reason, nothing on stderr."""

from __future__ import annotations

import pytest

from ingest.chem.canonicalize import Canonical, Invalid, canonicalize


def test_different_spellings_share_an_inchikey() -> None:
    a, b = canonicalize("OC(=O)c1ccccc1O"), canonicalize("O=C(O)c1ccccc1O")
    assert isinstance(a, Canonical) and a == b
    assert a.inchikey == "YGSDEFSMJLZEOE-UHFFFAOYSA-N"  # salicylic acid


@pytest.mark.parametrize(
    ("smiles", "reason"),
    [
        ("C1CC(", "syntax error while parsing: C1CC("),
        ("c1ccccc", "unclosed ring"),
        ("C(C)(C)(C)(C)C", "Explicit valence for atom # 0 C, 5"),
        ("", "empty SMILES"),
        ("*C", "no InChIKey"),
        ("c1cccc1", "Can't kekulize"),
    ],
)
def test_invalid_rows_carry_rdkit_reason(
    smiles: str, reason: str, capfd: pytest.CaptureFixture[str]
) -> None:
    result = canonicalize(smiles)
    assert isinstance(result, Invalid)
    assert reason in result.reason
    assert capfd.readouterr().err == ""  # RDKit's log is captured, not printed


def test_mol_block() -> None:
    from rdkit import Chem

    result = canonicalize(Chem.MolToMolBlock(Chem.MolFromSmiles("CCO")), molblock=True)
    assert result == canonicalize("CCO")
    truncated = canonicalize("ethanol\n  RDKit\n\n  3  2  0  0  0  0", molblock=True)
    assert isinstance(truncated, Invalid)


def test_memo_computes_an_inchikey_once_per_canonical_molecule() -> None:
    from rdkit import Chem

    from ingest.chem.canonicalize import InchiKeyMemo, canonicalize_all

    block = Chem.MolToMolBlock(Chem.MolFromSmiles("OCC"))
    items = [("CCO", False), ("OCC", False), ("C(O)C", False), ("c1ccccc1", False)]
    items += [("C1CC(", False), (block, True), ("*C", False), ("*C", False)]
    items += [("CCO |(0,0,0;1.5,0,0;2.2,1.2,0)|", False)]  # CXSMILES with coordinates
    memo = InchiKeyMemo()
    got = memo.canonicalize_all(items)
    fresh = [canonicalize(text, molblock=mb) for text, mb in items]
    assert got == fresh  # same keys and the same reasons as one molecule at a time
    assert got[0] == got[1] == got[2] == got[5] == got[8]
    # ethanol and benzene computed; two more spellings of ethanol reused; the mol block, the
    # coordinates and the invalid rows are never memoised.
    assert (memo.computed, memo.reused) == (2, 2)
    assert canonicalize_all(items) == fresh


def test_memo_is_bounded() -> None:
    from ingest.chem.canonicalize import InchiKeyMemo

    memo = InchiKeyMemo(limit=2)
    memo.canonicalize_all([("C", False), ("CC", False), ("CCC", False), ("C", False)])
    assert list(memo.keys) == ["CCC", "C"] and (memo.computed, memo.reused) == (4, 0)
