"""Stream the records of a compound library (.smi, .csv/.tsv, .sdf, each optionally .gz).

Readers yield one :class:`RawRecord` at a time and never hold the file: a million-row library costs
the memory of one row. ``progress()`` reports compressed bytes consumed so a progress bar works
for gzipped files too.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from core.errors import InputError
from ingest.text import TextSource, open_text

Format = Literal["smi", "csv", "tsv", "sdf"]

_SUFFIXES: dict[str, Format] = {
    ".smi": "smi",
    ".smiles": "smi",
    ".ism": "smi",
    ".txt": "smi",
    ".csv": "csv",
    ".tsv": "tsv",
    ".sdf": "sdf",
    ".sd": "sdf",
}


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One record as found in the file: its first line number, its text, its name if any."""

    line_no: int
    text: str
    name: str | None
    molblock: bool = False


def detect_format(path: Path) -> Format:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    fmt = _SUFFIXES.get(suffixes[-1] if suffixes else "")
    if fmt is None:
        raise InputError(
            f"{path.name}: unknown library format; use .smi, .csv, .tsv or .sdf (optionally .gz), "
            "or pass --format"
        )
    return fmt


class LibraryReader:
    """Open a library file and iterate its records; use as a context manager."""

    def __init__(
        self,
        path: Path,
        *,
        fmt: Format | None = None,
        smiles_column: str = "smiles",
        id_column: str | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such file")
        self.fmt: Format = fmt or detect_format(self.path)
        self.smiles_column = smiles_column
        self.id_column = id_column
        self.size = self.path.stat().st_size
        self._source: TextSource | None = None
        self._text: IO[str] | None = None

    def __enter__(self) -> LibraryReader:
        # gzip, a byte-order mark and UTF-16 are handled where every reader opens its text.
        self._source = open_text(self.path)
        self._text = self._source.text(errors="replace")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._text is not None:
            self._text.close()
        if self._source is not None:
            self._source.close()

    def progress(self) -> int:
        """Bytes of the file on disk consumed so far."""
        if self._source is None or self._source.stream.closed:
            return self.size
        return self._source.progress()

    def __iter__(self) -> Iterator[RawRecord]:
        if self._text is None:
            raise RuntimeError("use LibraryReader as a context manager")
        try:
            if self.fmt == "smi":
                yield from _read_smi(self._text)
            elif self.fmt in ("csv", "tsv"):
                yield from _read_csv(
                    self._text,
                    "\t" if self.fmt == "tsv" else ",",
                    self.smiles_column,
                    self.id_column,
                )
            else:
                yield from _read_sdf(self._text, self.id_column)
        except (gzip.BadGzipFile, EOFError, OSError) as exc:
            raise InputError(f"{self.path.name}: the file is damaged or truncated ({exc})") from exc


def _read_smi(stream: IO[str]) -> Iterator[RawRecord]:
    first = True
    for line_no, line in enumerate(stream, start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        parts = stripped.split(None, 1)
        if first and parts[0].lower() in ("smiles", "smi", "canonical_smiles"):
            first = False
            continue
        first = False
        yield RawRecord(line_no, parts[0], parts[1].strip() if len(parts) > 1 else None)


def _find_column(header: list[str], wanted: str, role: str) -> int:
    lowered = [h.strip().lower() for h in header]
    if wanted.lower() in lowered:
        return lowered.index(wanted.lower())
    raise InputError(
        f"no {role} column {wanted!r}; the columns are {', '.join(h.strip() for h in header)}; "
        f"choose one with --{role}-column"
    )


def _read_csv(
    stream: IO[str], delimiter: str, smiles_column: str, id_column: str | None
) -> Iterator[RawRecord]:
    reader = csv.reader(stream, delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return
    s_idx = _find_column(header, smiles_column, "smiles")
    i_idx = _find_column(header, id_column, "id") if id_column else None
    line_no = reader.line_num
    for row in reader:
        first_line, line_no = line_no + 1, reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue
        text = row[s_idx].strip() if s_idx < len(row) else ""
        name = row[i_idx].strip() if i_idx is not None and i_idx < len(row) else None
        yield RawRecord(first_line, text, name or None)


def _read_sdf(stream: IO[str], id_column: str | None) -> Iterator[RawRecord]:
    block: list[str] = []
    start = 1
    for line_no, line in enumerate(stream, start=1):
        if not block:
            start = line_no
        if line.rstrip("\r\n") == "$$$$":
            yield _sdf_record(start, block, id_column)
            block = []
            continue
        block.append(line)
    if any(ln.strip() for ln in block):
        # A last record without "$$$$" is legal SDF if its mol block is complete.
        yield _sdf_record(start, block, id_column)


def _sdf_record(start: int, block: list[str], id_column: str | None) -> RawRecord:
    name = block[0].strip() if block else None
    if id_column:
        tag = f"<{id_column}>"
        for i, line in enumerate(block[:-1]):
            if line.startswith(">") and tag in line:
                name = block[i + 1].strip()
                break
    # Only the mol block goes to RDKit; data items after "M  END" are not part of the structure.
    end = next((i for i, ln in enumerate(block) if ln.startswith("M  END")), None)
    text = "".join(block[: end + 1] if end is not None else block)
    return RawRecord(start, text, name or None, molblock=True)
