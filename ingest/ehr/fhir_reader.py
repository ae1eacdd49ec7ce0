"""Stream a FHIR Bulk Data ``$export`` into the same validated :class:`LongBlock`\\ s as a CSV
extract: the spill, the scoring, the exports and the report do not know the difference.

**Blocks.** Each NDJSON file is read through :mod:`ingest.text` (gzip, byte-order mark, UTF-16)
in blocks of about ``block_size`` bytes cut at line ends, so memory is one block whatever the
file's size. A block of Observations is parsed at once by pyarrow's JSON reader against a
schema of only the fields used (everything else in a resource is skipped by the parser), and
decided on whole columns: codings mapped once per distinct (system, code), units once per
distinct (variable, UCUM code, unit text), times parsed once per distinct string, ranges checked
on arrays with the CSV path's conversions. Lines it does not accept itself go through the
reference checks of :mod:`ingest.ehr.fhir_resources`, which give the reason (or accept a rare
shape the columns do not cover); a block pyarrow cannot parse (a broken line, a string where a
number belongs) is decided line by line by the reference checks with orjson.

**Patients first.** Age and sex are properties of the Patient, not of an Observation, and a
Patient may be in another file, after its Observations. So the Patient files are read first into
a compact index (id, birth date, sex: 17 bytes plus the identifier per patient — 27 MB per
million patients with 11-character identifiers, 51 MB with UUIDs; measured, the process grew by
78 and 89 MB per million patients, as sorting the index briefly needs about twice its size).
Observations are then streamed, and for every distinct (patient, time) of a block an ``age`` row
(completed years at the visit's UTC date) and a ``sex`` row are added, as a long CSV carries
them. A (patient, time) already given in the previous block is not repeated (an
export written visit by visit then adds each exactly once; otherwise a repeat carries the same
value at the same time and changes nothing).

**Line numbers.** A rejection is keyed by ``(job, line)``; an export has several files, so
``line`` is the line's position in the export read as one stream (Patient files first, then
Observation files, each in manifest or name order), and the reason starts with the file and its
own line number: ``Observation-2.ndjson, line 1,234: no subject (the patient)``.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

from core.errors import InputError
from ingest.ehr.blocks import VARIABLE_CODES, LongBlock, Rejection
from ingest.ehr.fhir_codes import (
    ANSWERS,
    CODE_SYSTEMS,
    PANEL_CODES,
    SKIPPED_STATUSES,
    code_label,
    observation_variable,
)
from ingest.ehr.fhir_export import ExportFile, FhirExport, open_export
from ingest.ehr.fhir_resources import (
    PATIENT_REFERENCE,
    ObservationRecord,
    PatientRecord,
    Skipped,
    UnknownCode,
    check_observation,
    check_patient,
    load_line,
    parse_fhir_time,
    resolve_unit,
)
from ingest.ehr.schema import VARIABLES, RowRejected, UnknownUnit, UnparseableTime
from ingest.text import open_stream

__all__ = ["NDJSON_BLOCK_FACTOR", "PatientIndex", "read_fhir"]

#: An NDJSON block holds ~10× fewer measurements per byte than a CSV block, and each block
#: costs some fixed work (a parse call, ~50 column operations): the ingest reads NDJSON in
#: blocks this many times ``MEDBATCH_EHR_BLOCK_BYTES`` (memory stays a few such blocks).
NDJSON_BLOCK_FACTOR = 4

_CODING = pa.list_(pa.struct([("system", pa.string()), ("code", pa.string())]))
_CONCEPT = pa.struct([("coding", _CODING)])
_QUANTITY = pa.struct(
    [
        ("value", pa.float64()),
        ("comparator", pa.string()),
        ("unit", pa.string()),
        ("system", pa.string()),
        ("code", pa.string()),
    ]
)
#: The fields of an Observation the ingest reads; the parser skips everything else.
OBSERVATION_SCHEMA = pa.schema(
    [
        ("resourceType", pa.string()),
        ("status", pa.string()),
        ("code", _CONCEPT),
        ("subject", pa.struct([("reference", pa.string())])),
        ("effectiveDateTime", pa.string()),
        ("effectiveInstant", pa.string()),
        ("effectivePeriod", pa.struct([("start", pa.string())])),
        ("issued", pa.string()),
        ("valueQuantity", _QUANTITY),
        ("valueCodeableConcept", _CONCEPT),
        (
            "component",
            pa.list_(
                pa.struct(
                    [
                        ("code", _CONCEPT),
                        ("valueQuantity", _QUANTITY),
                        ("valueCodeableConcept", _CONCEPT),
                    ]
                )
            ),
        ),
    ]
)
_PARSE = pajson.ParseOptions(explicit_schema=OBSERVATION_SCHEMA, unexpected_field_behavior="ignore")
_AGE, _SEX = VARIABLE_CODES["age"], VARIABLE_CODES["sex"]
_US_PER_DAY = 86_400_000_000
_NAT = np.iinfo(np.int64).min
_NO_BIRTH = np.iinfo(np.int32).min
_MAX_LINE = 256 << 20
_SEP = "\x1f"
_NULL = "\x00"


# ------------------------------------------------------------------------------- lines
def _chunks(stream: IO[bytes], block_size: int, name: str) -> Iterator[bytes]:
    """Whole lines, about ``block_size`` bytes at a time (a longer line is one chunk)."""
    rest = b""
    while True:
        data = stream.read(block_size)
        if not data:
            if rest:
                yield rest
            return
        if rest:
            data = rest + data
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            if len(data) > _MAX_LINE:
                raise InputError(f"{name}: a line longer than {_MAX_LINE >> 20} MiB")
            rest = data
            continue
        yield data[:cut]
        rest = data[cut:]


@dataclass(frozen=True)
class _Lines:
    """Where each line of a chunk is, and which lines are blank or one JSON object's shape."""

    starts: npt.NDArray[np.int64]
    ends: npt.NDArray[np.int64]  # exclusive, before the newline
    blank: npt.NDArray[np.bool_]
    shaped: npt.NDArray[np.bool_]  # first non-blank byte '{' and last '}'

    def __len__(self) -> int:
        return len(self.starts)


def _line_index(buf: bytes) -> _Lines:
    arr = np.frombuffer(buf, dtype=np.uint8)
    newlines = np.flatnonzero(arr == 10)
    ends = newlines if buf.endswith(b"\n") else np.r_[newlines, len(arr)]
    starts = np.r_[0, newlines + 1][: len(ends)].astype(np.int64)
    ends = ends.astype(np.int64)
    # NDJSON as servers write it: '{' first, '}' last (before an optional CR); others exactly
    stop = ends - ((ends > starts) & (arr[np.maximum(ends - 1, 0)] == 13))
    nonempty = stop > starts
    shaped = np.zeros(len(starts), dtype=bool)
    shaped[nonempty] = (arr[starts[nonempty]] == ord("{")) & (arr[stop[nonempty] - 1] == ord("}"))
    blank = ~nonempty
    for k in np.flatnonzero(nonempty & ~shaped):
        text = buf[starts[k] : ends[k]].strip()
        blank[k] = not text
        shaped[k] = text[:1] == b"{" and text[-1:] == b"}"
    return _Lines(starts, ends, blank, shaped)


# ------------------------------------------------------------------------------- patients
#: 64-bit hash of an identifier; Python's own (seeded per process: the index lives in one).
_hash = hash


class PatientIndex:
    """Birth date and sex by Patient id, for every Patient of the export, in ~17 bytes plus the
    identifier per patient: ids sorted by a 64-bit hash (searched with numpy, confirmed by
    comparing the ids themselves, so a hash collision costs time, never a wrong patient)."""

    def __init__(self) -> None:
        self._parts: list[tuple[pa.Array, npt.NDArray[np.int64], npt.NDArray[np.int32], Any]] = []
        self.ids = pa.array([], pa.string())
        self.hashes = np.empty(0, np.int64)
        self.birth = np.empty(0, np.int32)  # days since 1970-01-01; _NO_BIRTH when unknown
        self.sex = np.empty(0, np.int8)  # 1, 0, or -1 when unknown

    def add(self, records: list[PatientRecord]) -> None:
        if not records:
            return
        epoch = datetime(1970, 1, 1).date()
        self._parts.append(
            (
                pa.array([r.patient_id for r in records], pa.string()),
                np.fromiter((_hash(r.patient_id) for r in records), np.int64, len(records)),
                np.fromiter(
                    (
                        _NO_BIRTH if r.birth_date is None else (r.birth_date - epoch).days
                        for r in records
                    ),
                    np.int32,
                    len(records),
                ),
                np.fromiter(
                    (-1 if r.sex is None else int(r.sex) for r in records), np.int8, len(records)
                ),
            )
        )

    def freeze(self) -> None:
        """Sort by hash; a Patient given twice keeps its last version."""
        if not self._parts:
            return
        ids = pa.concat_arrays([p[0] for p in self._parts])
        hashes = np.concatenate([p[1] for p in self._parts])
        birth = np.concatenate([p[2] for p in self._parts])
        sex = np.concatenate([p[3] for p in self._parts])
        self._parts.clear()
        seq = np.arange(len(hashes))
        order = np.lexsort((seq, hashes))
        hashes = hashes[order]
        keep = np.ones(len(order), dtype=bool)
        same = np.flatnonzero(hashes[1:] == hashes[:-1])
        if len(same):  # a Patient given twice (or a hash collision): the last version wins
            shared = np.union1d(same, same + 1)
            shared_ids = ids.take(pa.array(order[shared])).to_pylist()
            breaks = np.flatnonzero(hashes[shared][1:] != hashes[shared][:-1]) + 1
            start = 0
            for end in [*breaks.tolist(), len(shared)]:
                last_of: dict[str, int] = {}
                for j in range(start, end):  # in input order within a hash (seq breaks ties)
                    last_of[shared_ids[j]] = j
                for j in range(start, end):
                    keep[shared[j]] = last_of[shared_ids[j]] == j
                start = end
        order = order[keep]
        self.hashes = hashes[keep]
        self.ids = ids.take(pa.array(order))
        self.birth = birth[order]
        self.sex = sex[order]

    def __len__(self) -> int:
        return len(self.hashes)

    def lookup(self, ids: list[str]) -> npt.NDArray[np.int64]:
        """Index of each id in the index, or -1."""
        if not len(self.hashes) or not ids:
            return np.full(len(ids), -1, dtype=np.int64)
        h = np.fromiter((_hash(i) for i in ids), np.int64, len(ids))
        pos = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)
        candidate = self.hashes[pos] == h
        same = pc.equal(self.ids.take(pa.array(pos)), pa.array(ids, pa.string()))
        found = candidate & same.to_numpy(zero_copy_only=False)
        out = np.where(found, pos, -1).astype(np.int64)
        for k in np.flatnonzero(candidate & ~found):  # a hash shared by several ids
            j = int(pos[k])
            while j < len(self.hashes) and self.hashes[j] == h[k]:
                if self.ids[j].as_py() == ids[k]:
                    out[k] = j
                    break
                j += 1
        return out


def _completed_years(birth_days: npt.NDArray[np.int64], day: npt.NDArray[np.int64]) -> Any:
    """Whole years from each birth date to each day (both days since 1970-01-01)."""
    b = birth_days.astype("datetime64[D]")
    d = day.astype("datetime64[D]")
    by, dy = b.astype("datetime64[Y]"), d.astype("datetime64[Y]")
    bm, dm = b.astype("datetime64[M]"), d.astype("datetime64[M]")
    b_md = (bm - by).astype(np.int64) * 32 + (b - bm).astype(np.int64)
    d_md = (dm - dy).astype(np.int64) * 32 + (d - dm).astype(np.int64)
    return (dy - by).astype(np.int64) - (d_md < b_md)


# ------------------------------------------------------------------------------- accepted rows
@dataclass
class _Accepted:
    """Measurements of one block being gathered: from columns (arrays) and line by line."""

    lines: list[npt.NDArray[np.int64]] = field(default_factory=list)
    pids: list[pa.Array] = field(default_factory=list)
    times: list[npt.NDArray[np.int64]] = field(default_factory=list)
    variables: list[npt.NDArray[np.int8]] = field(default_factory=list)
    values: list[npt.NDArray[np.float64]] = field(default_factory=list)
    one_by_one: list[tuple[int, str, int, int, float]] = field(default_factory=list)

    def add_record(self, line: int, record: ObservationRecord) -> None:
        us = int(np.datetime64(record.timestamp, "us").astype(np.int64))
        for name, value in record.measurements:
            self.one_by_one.append((line, record.patient_id, us, VARIABLE_CODES[name], value))

    def arrays(self) -> tuple[Any, pa.Array, Any, Any, Any]:
        if self.one_by_one:
            cols = list(zip(*self.one_by_one, strict=True))
            self.lines.append(np.array(cols[0], dtype=np.int64))
            self.pids.append(pa.array(cols[1], pa.string()))
            self.times.append(np.array(cols[2], dtype=np.int64))
            self.variables.append(np.array(cols[3], dtype=np.int8))
            self.values.append(np.array(cols[4], dtype=np.float64))
            self.one_by_one.clear()
        if not self.lines:
            empty = np.empty(0, np.int64)
            return empty, pa.array([], pa.string()), empty, empty.astype(np.int8), empty * 1.0
        return (
            np.concatenate(self.lines),
            pa.concat_arrays(self.pids) if len(self.pids) > 1 else self.pids[0],
            np.concatenate(self.times),
            np.concatenate(self.variables),
            np.concatenate(self.values),
        )


# ------------------------------------------------------------------------------- columns
def _np(a: pa.Array | pa.ChunkedArray) -> Any:
    return a.to_numpy(zero_copy_only=False)


def _column(table: pa.Table, name: str) -> Any:
    return table.column(name).combine_chunks()


@dataclass(frozen=True)
class _CodingInfo:
    """Per distinct coding of a block: the variable it names, whether it is a panel, its label."""

    variable: npt.NDArray[np.int16]  # -1: none
    panel: npt.NDArray[np.bool_]
    loinc: npt.NDArray[np.bool_]
    label: list[str]


def _flat_codings(concepts: pa.Array) -> tuple[Any, pa.Array]:
    """(row of each coding, the codings) of a column of CodeableConcepts; null codings are
    dropped, as the reference checks drop them."""
    lists = pc.struct_field(concepts, "coding")
    flat = pc.list_flatten(lists)
    rows = _np(pc.list_parent_indices(lists))
    valid = _np(pc.is_valid(flat))
    return rows[valid], flat.filter(pa.array(valid))


def _codings(concepts: pa.Array) -> tuple[Any, Any, _CodingInfo]:
    """(row of each coding, distinct-coding index of each, what each distinct coding means)."""
    rows, flat = _flat_codings(concepts)
    key = pc.binary_join_element_wise(
        pc.fill_null(pc.struct_field(flat, "system"), _NULL),
        pc.fill_null(pc.struct_field(flat, "code"), _NULL),
        _SEP,
    )
    encoded = pc.dictionary_encode(key)
    keys = encoded.dictionary.to_pylist()
    variable = np.full(len(keys), -1, dtype=np.int16)
    panel = np.zeros(len(keys), dtype=bool)
    loinc = np.zeros(len(keys), dtype=bool)
    labels = []
    for k, text in enumerate(keys):
        s, c = (None if part == _NULL else part for part in text.split(_SEP, 1))
        name = observation_variable(s, c)
        if name is not None:
            variable[k] = VARIABLE_CODES[name]
        loinc[k] = CODE_SYSTEMS.get(s or "") == "LOINC"
        panel[k] = bool(loinc[k] and c in PANEL_CODES)
        labels.append(code_label(s, c))
    return rows, _np(encoded.indices), _CodingInfo(variable, panel, loinc, labels)


def _first_per_row(rows: Any, mask: Any, n: int) -> tuple[Any, Any]:
    """For each of ``n`` rows, the position of its first entry where ``mask`` (or -1)."""
    out = np.full(n, -1, dtype=np.int64)
    where = np.flatnonzero(mask)
    if len(where):
        uniq, first = np.unique(rows[where], return_index=True)
        out[uniq] = where[first]
    return out, out >= 0


def _variables(concepts: pa.Array, n: int) -> tuple[Any, Any, Any]:
    """Per row: the variable its code names (-1), whether it is a panel, its unknown label."""
    rows, idx, info = _codings(concepts)
    codes = np.r_[info.variable[idx], -1]  # position -1: "none"
    first, _ = _first_per_row(rows, codes[:-1] >= 0, n)
    variable = codes[first]
    panel = np.zeros(n, dtype=bool)
    panel[rows[info.panel[idx]]] = True
    first_loinc, has_loinc = _first_per_row(rows, info.loinc[idx], n)
    first_any, _ = _first_per_row(rows, np.ones(len(rows), dtype=bool), n)
    chosen = np.where(has_loinc, first_loinc, first_any)
    labels = np.array([*info.label, "(no code)"], dtype=object)
    label = labels[np.r_[idx, len(info.label)][chosen]]
    return variable.astype(np.int16), panel, label


def _quantity_values(
    quantity: pa.Array, variable: Any
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Canonical values of quantity parts and whether each is acceptable as it stands."""
    value = pc.struct_field(quantity, "value")
    present = _np(pc.is_valid(value))
    raw = _np(pc.fill_null(value, np.nan)).astype(np.float64)
    plain = _np(pc.is_null(pc.struct_field(quantity, "comparator")))
    key = pc.binary_join_element_wise(
        *(pc.fill_null(pc.struct_field(quantity, f), _NULL) for f in ("system", "code", "unit")),
        _SEP,
    )
    encoded = pc.dictionary_encode(key)
    distinct = encoded.dictionary.to_pylist()
    # one unit resolution per distinct (variable, system, code, unit)
    pairs, idx = np.unique(
        variable.astype(np.int64) * max(len(distinct), 1) + _np(encoded.indices),
        return_inverse=True,
    )
    names = {code: name for name, code in VARIABLE_CODES.items()}
    scale = np.full(len(pairs), np.nan)
    offset = np.zeros(len(pairs))
    for k, pair in enumerate(pairs.tolist()):
        name = names[pair // max(len(distinct), 1)]
        system, code, unit = (
            None if p == _NULL else p for p in distinct[pair % max(len(distinct), 1)].split(_SEP)
        )
        try:
            conv = VARIABLES[name].conversion(resolve_unit(name, system, code, unit))
        except UnknownUnit:
            continue
        scale[k], offset[k] = conv.scale, conv.offset
    canonical = raw * scale[idx] + offset[idx]
    return canonical, present & plain & np.isfinite(canonical)


def _answer_values(concepts: pa.Array, variable: Any) -> tuple[Any, Any]:
    """Values of coded-answer parts; not acceptable: no answer, an unknown one, or 'unknown'."""
    n = len(variable)
    rows, flat = _flat_codings(concepts)
    systems = pc.struct_field(flat, "system").to_pylist()
    codes = pc.struct_field(flat, "code").to_pylist()
    names = {code: name for name, code in VARIABLE_CODES.items()}
    known = np.zeros(len(rows), dtype=bool)
    answer = np.full(len(rows) + 1, np.nan)
    for j, (s, c) in enumerate(zip(systems, codes, strict=True)):
        table = ANSWERS[names[int(variable[rows[j]])]]
        if (s, c) in table:
            known[j] = True
            v = table[(s, c)]  # type: ignore[index]
            answer[j] = np.nan if v is None else v
    first, _ = _first_per_row(rows, known, n)
    value = answer[first]
    return value, ~np.isnan(value)


def _in_range(canonical: Any, variable: Any) -> Any:
    low = np.array([v.low for v in VARIABLES.values()])
    high = np.array([v.high for v in VARIABLES.values()])
    flag = np.array([v.flag for v in VARIABLES.values()])
    var = variable.astype(np.intp)
    return np.where(
        flag[var],
        (canonical == 0.0) | (canonical == 1.0),
        (canonical >= low[var]) & (canonical <= high[var]),
    )


#: The shape almost every server writes (seconds and an offset): parsed on columns; any
#: other (a date, fractions of a second, no offset, an offset beyond ±14:00) by the reference.
_COMMON_TIME = r"^[12]\d{3}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(Z|[+-](0\d|1[0-4]):[0-5]\d)$"


def _parse_times(text: pa.Array) -> npt.NDArray[np.int64]:
    """µs since the epoch (UTC) of each FHIR dateTime, _NAT where unusable; each distinct
    string parsed once: the common shape on columns, the rest by the reference parser."""
    encoded = pc.dictionary_encode(text)
    distinct = encoded.dictionary
    us = np.full(len(distinct) + 1, _NAT, dtype=np.int64)
    common = _np(pc.fill_null(pc.match_substring_regex(distinct, _COMMON_TIME), False))
    if common.any():
        shaped = distinct.filter(pa.array(common))
        local = pc.utf8_slice_codeunits(shaped, 0, 19)
        parsed = pc.strptime(local, format="%Y-%m-%dT%H:%M:%S", unit="s", error_is_null=True)
        exact = _np(
            pc.fill_null(pc.equal(pc.strftime(parsed, format="%Y-%m-%dT%H:%M:%S"), local), False)
        )  # strptime rolls Feb 30 over to March: only exact round trips
        zone = pc.utf8_slice_codeunits(shaped, 19, 25)
        sign = np.where(_np(pc.starts_with(zone, "-")), -1, 1)
        zone = pc.replace_substring(zone, "Z", "+00:00")
        hours = _np(pc.cast(pc.utf8_slice_codeunits(zone, 1, 3), pa.int64()))
        minutes = _np(pc.cast(pc.utf8_slice_codeunits(zone, 4, 6), pa.int64()))
        seconds = _np(pc.cast(pc.fill_null(parsed, 0), pa.int64()))
        utc = (seconds - sign * (hours * 3600 + minutes * 60)) * 1_000_000
        rows = np.flatnonzero(common)
        us[rows[exact]] = utc[exact]
        common[rows[~exact]] = False
    for k in np.flatnonzero(~common).tolist():
        with contextlib.suppress(UnparseableTime):
            us[k] = np.datetime64(parse_fhir_time(distinct[k].as_py()), "us").astype(np.int64)
    idx = _np(pc.fill_null(encoded.indices, len(distinct)))
    return us[idx]


_ANSWER_CODES = np.array([VARIABLE_CODES[n] for n in ANSWERS], dtype=np.int16)


@dataclass
class _Decided:
    ok: npt.NDArray[np.bool_]
    unknown: npt.NDArray[np.bool_]
    unknown_label: Any
    skipped: npt.NDArray[np.bool_]
    status: Any
    patient_id: pa.Array
    time: npt.NDArray[np.int64]
    part_row: npt.NDArray[np.int64]
    part_variable: npt.NDArray[np.int8]
    part_value: npt.NDArray[np.float64]


def _decide(table: pa.Table) -> _Decided:
    """Every Observation row of a parsed block: accepted (with its measurements), skipped,
    unknown, or left to the reference checks (everything else)."""
    n = table.num_rows
    observation = _np(pc.fill_null(pc.equal(_column(table, "resourceType"), "Observation"), False))
    status = _column(table, "status")
    skipped = observation & _np(
        pc.fill_null(pc.is_in(status, value_set=pa.array(sorted(SKIPPED_STATUSES))), False)
    )
    live = observation & ~skipped

    # parts: the resource's own code, then each component's
    top_var, panel, label = _variables(_column(table, "code"), n)
    components = _column(table, "component")
    comp = pc.list_flatten(components)
    comp_row = _np(pc.list_parent_indices(components))
    comp_valid = _np(pc.is_valid(comp))
    comp = comp.filter(pa.array(comp_valid))
    comp_row = comp_row[comp_valid]
    comp_var = _variables(pc.struct_field(comp, "code"), len(comp))[0]

    top = np.flatnonzero(top_var >= 0)
    mine = np.flatnonzero(comp_var >= 0)
    part_row = np.r_[top, comp_row[mine]].astype(np.int64)
    part_var = np.r_[top_var[top], comp_var[mine]].astype(np.int16)
    quantity = pa.concat_arrays(
        [
            _column(table, "valueQuantity").take(pa.array(top)),
            pc.struct_field(comp, "valueQuantity").take(pa.array(mine)),
        ]
    )
    concept = pa.concat_arrays(
        [
            _column(table, "valueCodeableConcept").take(pa.array(top)),
            pc.struct_field(comp, "valueCodeableConcept").take(pa.array(mine)),
        ]
    )
    is_answer = np.isin(part_var, _ANSWER_CODES)
    value = np.full(len(part_row), np.nan)
    part_ok = np.zeros(len(part_row), dtype=bool)
    q = np.flatnonzero(~is_answer)
    if len(q):
        value[q], part_ok[q] = _quantity_values(quantity.take(pa.array(q)), part_var[q])
    a = np.flatnonzero(is_answer)
    if len(a):
        value[a], part_ok[a] = _answer_values(concept.take(pa.array(a)), part_var[a])
    part_ok &= _in_range(value, part_var)

    has_part = np.bincount(part_row, minlength=n) > 0
    bad_part = np.bincount(part_row[~part_ok], minlength=n) > 0
    reference = pc.struct_field(_column(table, "subject"), "reference")
    patient = pc.struct_field(pc.extract_regex(reference, PATIENT_REFERENCE), "id")
    times = _parse_times(
        pc.coalesce(
            _column(table, "effectiveDateTime"),
            _column(table, "effectiveInstant"),
            pc.struct_field(_column(table, "effectivePeriod"), "start"),
            _column(table, "issued"),
        )
    )
    ok = live & has_part & ~bad_part & _np(pc.is_valid(patient)) & (times != _NAT)
    order = np.lexsort((np.arange(len(part_row)), part_row))  # own code first, then components
    return _Decided(
        ok=ok,
        unknown=live & ~has_part & ~panel,
        unknown_label=label,
        skipped=skipped,
        status=_np(status),
        patient_id=patient,
        time=times,
        part_row=part_row[order],
        part_variable=part_var[order].astype(np.int8),
        part_value=value[order],
    )


# ------------------------------------------------------------------------------- the reader
@dataclass
class _Where:
    """The file being read and how its lines map to the export's line numbers."""

    file: ExportFile
    offset: int  # lines of the files before this one
    first_line: int = 1  # of the current chunk, in the file

    def ordinal(self, k: int | Any) -> Any:
        return self.offset + self.first_line + k

    def rejection(self, k: int, exc: RowRejected) -> Rejection:
        n = self.first_line + k
        return Rejection(
            int(self.offset + n), exc.kind, f"{self.file.name}, line {n:,}: {exc.reason}"
        )


def _new_block(rejections: list[Rejection] | None = None) -> LongBlock:
    return LongBlock(
        lines=np.empty(0, np.int64),
        patient_id=pa.array([], pa.string()),
        timestamp=np.empty(0, "datetime64[us]"),
        variable=np.empty(0, np.int8),
        value=np.empty(0),
        rejections=rejections or [],
    )


def _patient_chunk(buf: bytes, lines: _Lines, where: _Where, index: PatientIndex) -> LongBlock:
    block = _new_block()
    records = []
    for k in range(len(lines)):
        if lines.blank[k]:
            block.skipped["blank line"] += 1
            continue
        block.counts["resources"] += 1
        try:
            record = check_patient(load_line(buf[lines.starts[k] : lines.ends[k]]))
        except RowRejected as exc:
            block.rejections.append(where.rejection(k, exc))
            continue
        records.append(record)
        block.counts["patients"] += 1
        block.counts["patients_without_birth_date"] += record.birth_date is None
        block.counts["patients_without_sex"] += record.sex is None
    index.add(records)
    return block


def _observation_lines(
    buf: bytes, lines: _Lines, where: _Where, block: LongBlock, acc: _Accepted, ks: Any
) -> None:
    """The reference checks, line by line, for lines ``ks`` of the chunk."""
    for k in ks:
        k = int(k)
        try:
            outcome = check_observation(load_line(buf[lines.starts[k] : lines.ends[k]]))
        except RowRejected as exc:
            block.rejections.append(where.rejection(k, exc))
            continue
        if isinstance(outcome, Skipped):
            block.skipped[outcome.reason] += 1
        elif isinstance(outcome, UnknownCode):
            block.unknown_codes[outcome.label] += 1
        else:
            acc.add_record(int(where.ordinal(k)), outcome)
            block.counts["observations_accepted"] += 1


def _parse_block(buf: bytes) -> pa.Table | None:
    try:
        return pajson.read_json(
            io.BytesIO(buf),
            read_options=pajson.ReadOptions(use_threads=False, block_size=len(buf) + 1),
            parse_options=_PARSE,
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return None


def _joined(buf: bytes, lines: _Lines, ks: Any) -> bytes:
    if len(ks) == len(lines) and not lines.blank.any():
        return buf
    view = memoryview(buf)
    return b"\n".join(view[lines.starts[k] : lines.ends[k]] for k in ks.tolist())


def _is_json(raw: bytes | memoryview) -> bool:
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return True


_SMALLEST_SPLIT = 32


def _split_parse(buf: bytes, lines: _Lines, ks: Any) -> list[tuple[pa.Table, Any]]:
    """Parsed pieces of lines ``ks``: halves are tried until a failing piece is small (its
    lines then go to the reference checks). A few bad lines cost a few parses each."""
    table = _parse_block(_joined(buf, lines, ks))
    if table is not None and table.num_rows == len(ks):
        return [(table, ks)]
    if len(ks) <= _SMALLEST_SPLIT:
        return []
    mid = len(ks) // 2
    return _split_parse(buf, lines, ks[:mid]) + _split_parse(buf, lines, ks[mid:])


def _bulk(buf: bytes, lines: _Lines, solid: Any) -> tuple[pa.Table | None, Any]:
    """The lines pyarrow can take in bulk, and their parse. Lines that are not one JSON object
    each are left out first; when the parse still fails, lines orjson refuses (a broken line
    that looks whole); then lines in pieces that fail (a string where a number belongs)."""
    bulk = solid[lines.shaped[solid]]
    if not len(bulk):
        return None, bulk
    table = _parse_block(_joined(buf, lines, bulk))
    if table is not None and table.num_rows == len(bulk):
        return table, bulk
    view = memoryview(buf)
    bulk = np.array(
        [k for k in bulk.tolist() if _is_json(view[lines.starts[k] : lines.ends[k]])],
        dtype=np.int64,
    )
    pieces = _split_parse(buf, lines, bulk) if len(bulk) else []
    if not pieces:
        return None, bulk[:0]
    table = pa.concat_tables([t for t, _ in pieces])
    return table, np.concatenate([ks for _, ks in pieces])


def _observation_chunk(
    buf: bytes, lines: _Lines, where: _Where, vectorised: bool
) -> tuple[LongBlock, _Accepted]:
    block = _new_block()
    acc = _Accepted()
    solid = np.flatnonzero(~lines.blank)
    if blank := int(lines.blank.sum()):
        block.skipped["blank line"] += blank
    block.counts["resources"] += len(solid)
    table, bulk = _bulk(buf, lines, solid) if vectorised else (None, solid[:0])
    if table is None:
        _observation_lines(buf, lines, where, block, acc, solid)
        return block, acc
    d = _decide(table)
    for status, n in Counter(d.status[d.skipped].tolist()).items():
        block.skipped[f"status {status}"] += n
    for label, n in Counter(d.unknown_label[d.unknown].tolist()).items():
        block.unknown_codes[label] += n
    ok_parts = d.ok[d.part_row]
    rows = d.part_row[ok_parts]
    acc.lines.append(where.ordinal(bulk[rows]).astype(np.int64))
    acc.pids.append(d.patient_id.take(pa.array(rows)))
    acc.times.append(d.time[rows])
    acc.variables.append(d.part_variable[ok_parts])
    acc.values.append(d.part_value[ok_parts])
    block.counts["observations_accepted"] += int(d.ok.sum())
    rest = np.union1d(np.setdiff1d(solid, bulk), bulk[~(d.ok | d.unknown | d.skipped)])
    _observation_lines(buf, lines, where, block, acc, rest)
    return block, acc


class _Derived:
    """Adds age and sex rows for each new (patient, time) of a block."""

    def __init__(self, index: PatientIndex) -> None:
        self.index = index
        self.previous: set[tuple[int, int]] = set()

    def block(self, block: LongBlock, acc: _Accepted) -> LongBlock:
        lines, pid, times, variables, values = acc.arrays()
        encoded = pc.dictionary_encode(pid)
        patient = self.index.lookup(encoded.dictionary.to_pylist())[_np(encoded.indices)]
        block.counts["measurements_from_observations"] += len(lines)
        block.counts["measurements_without_patient"] += int((patient < 0).sum())
        known = np.flatnonzero(patient >= 0)
        order = known[np.lexsort((lines[known], times[known], patient[known]))]
        new = np.ones(len(order), dtype=bool)
        new[1:] = (patient[order][1:] != patient[order][:-1]) | (
            times[order][1:] != times[order][:-1]
        )
        firsts = order[new]  # one row per (patient, time): its first line
        pairs = list(zip(patient[firsts].tolist(), times[firsts].tolist(), strict=True))
        fresh = np.array([p not in self.previous for p in pairs], dtype=bool)
        self.previous = set(pairs)
        firsts = firsts[fresh] if len(firsts) else firsts
        p = patient[firsts]
        birth = self.index.birth[p].astype(np.int64)
        sex = self.index.sex[p]
        day = np.floor_divide(times[firsts], _US_PER_DAY)
        has_birth = birth != _NO_BIRTH
        age = np.where(has_birth, _completed_years(np.where(has_birth, birth, 0), day), -1)
        age_ok = has_birth & (age >= VARIABLES["age"].low) & (age <= VARIABLES["age"].high)
        block.counts["ages_out_of_range"] += int((has_birth & ~age_ok).sum())
        a = firsts[age_ok]
        s = firsts[sex >= 0]
        block.counts["derived_age"] += len(a)
        block.counts["derived_sex"] += len(s)
        all_lines = np.r_[lines, lines[a], lines[s]]
        keep = np.argsort(all_lines, kind="stable")
        block.lines = all_lines[keep]
        block.patient_id = pa.concat_arrays(
            [pid, pid.take(pa.array(a)), pid.take(pa.array(s))]
        ).take(pa.array(keep))
        block.timestamp = np.r_[times, times[a], times[s]][keep].astype("datetime64[us]")
        block.variable = np.r_[
            variables, np.full(len(a), _AGE, np.int8), np.full(len(s), _SEX, np.int8)
        ][keep].astype(np.int8)
        block.value = np.r_[values, age[age_ok].astype(np.float64), sex[sex >= 0]][keep].astype(
            np.float64
        )
        return block


def read_fhir(
    path: Path,
    *,
    block_size: int = 8 << 20,
    on_bytes: Callable[[int], None] | None = None,
    vectorised: bool = True,
    export: FhirExport | None = None,
) -> Iterator[LongBlock]:
    """Validated blocks of a FHIR export (``vectorised=False``: every line by the reference
    checks, for tests). Raises :class:`~core.errors.InputError` for a path that is no
    export."""
    export = export or open_export(Path(path))
    index = PatientIndex()
    derived = _Derived(index)
    done = 0
    offset = 0
    frozen = False
    with export.opener() as open_file:
        for f in export.files:
            if f.resource_type == "Observation" and not frozen:
                index.freeze()  # every Patient file is read: sort the index once
                frozen = True

            def progress(n: int, base: int = done) -> None:
                if on_bytes is not None:
                    on_bytes(base + n)

            where = _Where(f, offset)
            with open_stream(open_file(f), Path(f.name), on_bytes=progress) as source:
                for buf in _chunks(source.stream, block_size, f.name):
                    lines = _line_index(buf)
                    if f.resource_type == "Patient":
                        yield _patient_chunk(buf, lines, where, index)
                    else:
                        block, acc = _observation_chunk(buf, lines, where, vectorised)
                        yield derived.block(block, acc)
                    where.first_line += len(lines)
                done += source.progress()
            offset += where.first_line - 1
