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


def canonicalize(text: str, *, molblock: bool = False) -> Canonical | Invalid:
    """Canonical SMILES and InChIKey of a SMILES string (or an MDL mol block), or why not."""
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


def canonicalize_all(items: list[tuple[str, bool]]) -> list[Canonical | Invalid]:
    """:func:`canonicalize` of each ``(text, molblock)``: one task of a canonicalising process."""
    return [canonicalize(text, molblock=molblock) for text, molblock in items]
