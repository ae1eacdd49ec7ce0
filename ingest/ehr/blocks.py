"""What every EHR reader yields: validated blocks of measurements and the rejections among them.

The CSV readers (:mod:`ingest.ehr.reader`) and the FHIR reader (:mod:`ingest.ehr.fhir_reader`)
hand the same :class:`LongBlock` to the spill, so nothing after the reader knows the format.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from ingest.ehr.schema import VARIABLES

__all__ = ["VARIABLE_CODES", "LongBlock", "Rejection"]

#: Index of each variable in :data:`VARIABLES` order: the compact code accepted rows carry.
VARIABLE_CODES: dict[str, int] = {name: i for i, name in enumerate(VARIABLES)}


@dataclass(frozen=True)
class Rejection:
    line: int  # physical line in the file; the header is line 1 (FHIR: line in the export)
    kind: str
    reason: str


@dataclass
class LongBlock:
    """The accepted measurements of one block (values in canonical units) and its rejections.

    A FHIR export also reports what was read but is neither a measurement nor an error:
    ``skipped`` (reason → resources: ``status entered-in-error``, …), ``unknown_codes`` (code →
    Observations of things no model uses) and ``counts`` (resources, patients, …)."""

    lines: npt.NDArray[np.int64]
    patient_id: pa.Array
    timestamp: npt.NDArray[np.datetime64]
    variable: npt.NDArray[np.int8]
    value: npt.NDArray[np.float64]
    rejections: list[Rejection] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    unknown_codes: Counter[str] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.lines)
