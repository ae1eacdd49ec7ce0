"""Which kind of EHR extract a file is, from its header or its layout: what a submission checks
before it stores anything. Apart from :mod:`ingest.ehr.reader` (numpy, pyarrow) so that
``medbatch ehr FILE`` and the API's submit do not import the readers the worker runs."""

from __future__ import annotations

import csv
from pathlib import Path

from core.errors import InputError
from ingest.ehr.schema import LONG_COLUMNS, WIDE_KEY_COLUMNS
from ingest.text import read_first_line

__all__ = ["detect_format", "header_fields"]


def header_fields(path: Path) -> list[str]:
    """The header line's fields, as every reader of the file sees them."""
    return next(csv.reader([read_first_line(path)]), [])


def detect_format(path: Path) -> str:
    """``long`` or ``wide`` from the header line, ``fhir`` for a Bulk Data export (a folder, a
    .zip or .tar of one, or NDJSON; :mod:`ingest.ehr.fhir_export`); anything else is not an
    extract."""
    from ingest.ehr.fhir_export import looks_like_export, open_export

    if looks_like_export(path):
        open_export(path)  # raises, saying why, when it holds nothing to score
        return "fhir"
    header = [h.strip().lower() for h in header_fields(path)]
    if header[: len(LONG_COLUMNS)] == list(LONG_COLUMNS):
        return "long"
    if header[:2] == list(WIDE_KEY_COLUMNS) and len(header) > 2:
        return "wide"
    raise InputError(
        f"{path.name}: not an EHR extract: the header must be "
        f"'{','.join(LONG_COLUMNS)}' (long format) or start with "
        f"'{','.join(WIDE_KEY_COLUMNS)}' followed by '<variable> (<unit>)' columns (wide format), "
        "or it must be a FHIR Bulk Data export (a folder, .zip or .tar of NDJSON files)"
    )
