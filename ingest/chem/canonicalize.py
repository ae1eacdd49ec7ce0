"""RDKit canonicalisation with RDKit's own reason for every molecule it refuses.

RDKit reports why a SMILES or mol block fails only through its log. We route that log into a
per-thread buffer while parsing, so the reason stored against the row is RDKit's exact words
("SMILES Parse Error: unclosed ring ...", "Explicit valence for atom # 1 N, 5 ...") and nothing
reaches the process's stderr.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from rdkit import Chem, rdBase

_TIMESTAMP = re.compile(r"^\[\d\d:\d\d:\d\d\]\s*")
_local = threading.local()


class _Capture(logging.Handler):
    """Collect RDKit messages of the current thread's parse into its buffer."""

    def emit(self, record: logging.LogRecord) -> None:
        buf = getattr(_local, "messages", None)
        if buf is not None:
            buf.append(_TIMESTAMP.sub("", record.getMessage()).strip())


def _install_capture() -> None:
    rdBase.LogToPythonLogger()
    logger = logging.getLogger("rdkit")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.addHandler(_Capture())
    logger.setLevel(logging.WARNING)
    logger.propagate = False


_install_capture()


@dataclass(frozen=True, slots=True)
class Canonical:
    smiles: str
    inchikey: str


@dataclass(frozen=True, slots=True)
class Invalid:
    reason: str


def _reason(messages: list[str], fallback: str) -> str:
    # RDKit repeats the input on several lines around a caret; keep the lines that explain.
    useful = [m for m in messages if m and ("Error" in m or "valence" in m or "atom" in m.lower())]
    text = "; ".join(dict.fromkeys(useful or messages)) or fallback
    return text[:500]


def canonicalize(
    text: str, *, molblock: bool = False, known: Mapping[str, str] | None = None
) -> Canonical | Invalid:
    """Canonical SMILES and InChIKey of a SMILES string (or an MDL mol block), or why not.

    ``known`` maps canonical SMILES to the InChIKey already computed for them in this
    submission: the InChIKey (over half of this function's time) is then not computed again for
    a molecule written the same way after canonicalisation. Equal canonical SMILES are the same
    RDKit graph (atoms, charges, isotopes, hydrogens, stereo), from which InChI derives its key,
    so the key is the one a fresh computation would give. Mol blocks (and CXSMILES with
    coordinates) never use it: their coordinates also reach InChI.
    """
    messages: list[str] = []
    _local.messages = messages
    try:
        if not molblock and not text.strip():
            return Invalid("empty SMILES")
        mol = Chem.MolFromMolBlock(text) if molblock else Chem.MolFromSmiles(text)
        if mol is None:
            return Invalid(_reason(messages, "RDKit could not parse the structure"))
        if mol.GetNumAtoms() == 0:
            return Invalid("molecule has no atoms")
        smiles = Chem.MolToSmiles(mol)
        if known is not None and not molblock and not mol.GetNumConformers():
            inchikey = known.get(smiles)
            if inchikey is not None:
                return Canonical(smiles=smiles, inchikey=inchikey)
        messages.clear()
        inchikey = Chem.MolToInchiKey(mol)
        if not inchikey:
            return Invalid(
                "no InChIKey could be computed ("
                + _reason(messages, "query or dummy atoms such as '*' are not supported")
                + ")"
            )
        return Canonical(smiles=smiles, inchikey=inchikey)
    finally:
        _local.messages = None


class InchiKeyMemo:
    """Canonical SMILES → InChIKey of one submission, bounded (oldest forgotten first), so a
    library that repeats a molecule computes its InChIKey once."""

    def __init__(self, limit: int = 2048) -> None:
        self.limit = limit
        self.keys: OrderedDict[str, str] = OrderedDict()
        #: InChIKeys computed / reused through this memo (tests and profiling read them).
        self.computed = 0
        self.reused = 0

    def canonicalize_all(self, items: list[tuple[str, bool]]) -> list[Canonical | Invalid]:
        """:func:`canonicalize_all` with the InChIKeys already known to this submission."""
        results = []
        for text, molblock in items:
            # Plain SMILES only: a CXSMILES extension may carry coordinates.
            plain = not molblock and "|" not in text
            result = canonicalize(text, molblock=molblock, known=self.keys if plain else None)
            if plain and isinstance(result, Canonical):
                if result.smiles in self.keys:
                    self.reused += 1
                    self.keys.move_to_end(result.smiles)
                else:
                    self.computed += 1
                    self.keys[result.smiles] = result.inchikey
                    if len(self.keys) > self.limit:
                        self.keys.popitem(last=False)
            results.append(result)
        return results


def canonicalize_all(items: list[tuple[str, bool]]) -> list[Canonical | Invalid]:
    """:func:`canonicalize` of each ``(text, molblock)``: one task of a canonicalising process.
    A molecule repeated within the batch has its InChIKey computed once."""
    return InchiKeyMemo(limit=len(items) + 1).canonicalize_all(items)
