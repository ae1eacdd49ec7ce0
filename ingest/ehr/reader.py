"""Stream a long-format EHR extract in blocks, validated column-wise with pyarrow.

A nightly extract can be gigabytes, so it is never loaded whole: pyarrow's streaming CSV reader
hands over blocks of rows as string columns, and every check of :mod:`ingest.ehr.schema` runs
on whole columns (regular expressions, ``strptime``, one conversion per distinct
variable/unit pair) instead of row by row. The row-by-row checks in ``schema.py`` stay the
reference semantics: for every row this module accepts or rejects exactly as
:func:`ingest.ehr.schema.check_long_row` does, with the same reason kind (tested).

Physical line numbers are kept for the rejection report: pyarrow drops blank lines unless told
not to, so blank and malformed lines come back through ``invalid_row_handler`` with their line
number, and accepted rows are numbered around them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
from pyarrow import csv as pacsv

from core.errors import InputError
from ingest.ehr.blocks import VARIABLE_CODES, LongBlock, Rejection
from ingest.ehr.formats import detect_format, header_fields
from ingest.ehr.schema import (
    LONG_COLUMNS,
    WIDE_KEY_COLUMNS,
    RowRejected,
    Variable,
    check_long_row,
    check_wide_row,
    convert,
    parse_timestamp,
    parse_wide_header,
    variable,
)
from ingest.text import open_text

_NUMBER = r"^\s*[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?\s*$"


class _LineTracker:
    """Lines pyarrow skipped (blank, wrong field count), so parsed rows can be numbered.

    The reader may parse ahead of the block being checked, so skipped lines are consumed by
    line number as the rows are numbered, not by the block they were reported with.
    """

    def __init__(self) -> None:
        self.skipped: list[tuple[int, str]] = []
        self.consumed = 0

    def __call__(self, row: pacsv.InvalidRow) -> str:
        if row.number is None:  # only with multi-threaded parsing, which is off
            raise InputError("the CSV reader lost track of line numbers")
        self.skipped.append((int(row.number), row.text))
        return "skip"

    def take_before(self, first_line: int, n_rows: int) -> list[tuple[int, str]]:
        """The skipped lines among the ``n_rows`` parsed rows that start at ``first_line``."""
        taken: list[tuple[int, str]] = []
        while self.consumed < len(self.skipped) and self.skipped[self.consumed][
            0
        ] < first_line + n_rows + len(taken):
            taken.append(self.skipped[self.consumed])
            self.consumed += 1
        return taken

    def rest(self) -> list[tuple[int, str]]:
        out = self.skipped[self.consumed :]
        self.consumed = len(self.skipped)
        return out


RowCheck = Callable[[Sequence[str]], object]


def _reject_line(number: int, text: str, check: RowCheck) -> Rejection:
    try:
        check(text.split(","))
    except RowRejected as exc:
        return Rejection(number, exc.kind, exc.reason)
    return Rejection(number, "malformed", "malformed CSV line")  # e.g. an unbalanced quote


def _number_lines(
    tracker: _LineTracker, first_line: int, n: int, check: RowCheck
) -> tuple[npt.NDArray[np.int64], list[Rejection], int]:
    """Physical line of each of ``n`` parsed rows (skipped lines interleave), the rejections of
    the skipped lines among them, and the line after the block."""
    skipped = tracker.take_before(first_line, n)
    span = np.arange(first_line, first_line + n + len(skipped), dtype=np.int64)
    lines = np.setdiff1d(span, np.array([k for k, _ in skipped], dtype=np.int64))
    return lines, [_reject_line(k, t, check) for k, t in skipped], first_line + n + len(skipped)


def _numbers(col: pa.Array) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """Plain decimals of a string column (NaN elsewhere) and where they parsed."""
    ok = pc.fill_null(pc.match_substring_regex(col, _NUMBER), False).to_numpy(zero_copy_only=False)
    values = np.full(len(col), np.nan)
    if ok.any():
        values[ok] = pc.cast(
            pc.utf8_trim_whitespace(pc.filter(col, pa.array(ok))), pa.float64()
        ).to_numpy(zero_copy_only=False)
    return values, ok


def _in_range(canonical: npt.NDArray[np.float64], v: Variable) -> npt.NDArray[np.bool_]:
    if v.flag:
        return (canonical == 0.0) | (canonical == 1.0)
    return (canonical >= v.low) & (canonical <= v.high)


def _utc(stamp: datetime) -> np.datetime64:
    if stamp.tzinfo is not None:  # an explicit offset: stored as UTC
        stamp = stamp.astimezone(UTC).replace(tzinfo=None)
    return np.datetime64(stamp, "us")


#: Longest stamp the vectorised path reads: ``2024-03-05T08:42:00.123456+05:30`` is 32 bytes.
_STAMP_BYTES = 32
_US = 1_000_000


def _byte_matrix(strings: pa.Array) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]]:
    """Each string's first :data:`_STAMP_BYTES` bytes as a row (0-padded), and its length; a
    gather over Arrow's buffers, no Python object per string."""
    wide = pa.types.is_large_string(strings.type)
    offsets = np.frombuffer(strings.buffers()[1], dtype=np.int64 if wide else np.int32)[
        strings.offset : strings.offset + len(strings) + 1
    ].astype(np.int64)
    data = strings.buffers()[2]
    flat = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(1, np.uint8)
    flat = np.r_[flat, np.uint8(0)]  # one zero byte to point past-the-end reads at
    lengths = np.diff(offsets)
    pos = offsets[:-1, None] + np.arange(_STAMP_BYTES)
    inside = np.arange(_STAMP_BYTES) < lengths[:, None]
    return np.where(inside, flat[np.where(inside, pos, len(flat) - 1)], 0).astype(np.uint8), lengths


def _parse_distinct(stamps: pa.Array) -> npt.NDArray[np.datetime64]:
    """Distinct, trimmed ISO 8601 strings → datetime64[us], offsets normalised to UTC; NaT where
    the vectorised forms do not fit (the per-row reference decides those rows).

    The forms are those :func:`ingest.ehr.schema.parse_timestamp` accepts: ``YYYY-MM-DD``, then
    optionally ``T`` or a blank, ``hh:mm``, ``:ss``, ``.f`` (1–6 digits) and an offset (``Z``,
    ``±hh:mm``, ``±hhmm``). Read by byte position on a matrix of the strings and checked by
    number (month, days in that month, hours, minutes, seconds, offset), with no strptime and no
    strftime round trip (which cost a second per 300k stamps). A date alone with an offset is
    left to the per-row path: Python reads ``2024-03-05+02:00`` as 02:00 that day, and the
    reference semantics are Python's.
    """
    n = len(stamps)
    c, length = _byte_matrix(stamps)
    rows = np.arange(n)
    digit = (c >= 48) & (c <= 57)
    value = c.astype(np.int64) - 48

    def num(start: int, width: int) -> npt.NDArray[np.int64]:
        out = np.zeros(n, dtype=np.int64)
        for k in range(start, start + width):
            out = out * 10 + value[:, k]
        return out

    def digits(start: int, width: int) -> npt.NDArray[np.bool_]:
        return np.all(digit[:, start : start + width], axis=1)

    ok = (length >= 10) & (length <= _STAMP_BYTES)
    ok &= digits(0, 4) & (c[:, 4] == ord("-")) & digits(5, 2) & (c[:, 7] == ord("-"))
    ok &= digits(8, 2)
    date_only = length == 10
    timed = (
        ((c[:, 10] == ord("T")) | (c[:, 10] == ord(" ")))
        & digits(11, 2)
        & (c[:, 13] == ord(":"))
        & digits(14, 2)
    )
    ok &= date_only | timed
    # seconds, a fraction, an offset: positions vary, so read them at each row's own cursor
    has_sec = timed & (c[:, 16] == ord(":")) & digits(17, 2)
    cursor = np.where(has_sec, 19, 16)
    has_frac = has_sec & (c[:, 19] == ord("."))
    frac_digits = np.zeros(n, dtype=np.int64)
    micros = np.zeros(n, dtype=np.int64)
    running = has_frac.copy()
    for k in range(6):
        at = np.minimum(20 + k, _STAMP_BYTES - 1)
        running &= digit[:, at] & (20 + k < length)
        frac_digits += running
        micros += np.where(running, value[:, at] * 10 ** (5 - k), 0)
    ok &= ~has_frac | (frac_digits >= 1)
    cursor = np.where(has_frac, 20 + frac_digits, cursor)
    at = np.minimum(cursor[:, None] + np.arange(6), _STAMP_BYTES - 1)
    t = c[rows[:, None], at]
    t_digit = digit[rows[:, None], at]
    t_value = value[rows[:, None], at]
    rest = length - cursor
    no_tz = rest == 0
    zulu = (rest == 1) & (t[:, 0] == ord("Z"))
    signed = (t[:, 0] == ord("+")) | (t[:, 0] == ord("-"))
    colon = signed & (rest == 6) & t_digit[:, 1] & t_digit[:, 2] & (t[:, 3] == ord(":"))
    colon &= t_digit[:, 4] & t_digit[:, 5]
    plain = signed & (rest == 5) & np.all(t_digit[:, 1:5], axis=1)
    off_h = t_value[:, 1] * 10 + t_value[:, 2]
    off_m = np.where(colon, t_value[:, 4] * 10 + t_value[:, 5], t_value[:, 3] * 10 + t_value[:, 4])
    with_offset = colon | plain
    ok &= np.where(date_only, True, no_tz | zulu | with_offset)
    ok &= ~with_offset | ((off_h < 24) & (off_m < 60))

    year, month, day = num(0, 4), num(5, 2), num(8, 2)
    hour = np.where(timed, num(11, 2), 0)
    minute = np.where(timed, num(14, 2), 0)
    second = np.where(has_sec, num(17, 2), 0)
    ok &= (year >= 1) & (month >= 1) & (month <= 12) & (hour < 24) & (minute < 60)
    ok &= second < 60
    months = np.where(ok, (year - 1970) * 12 + month - 1, 0).astype("datetime64[M]")
    first = months.astype("datetime64[D]").astype(np.int64)
    in_month = (months + 1).astype("datetime64[D]").astype(np.int64) - first
    ok &= (day >= 1) & (day <= in_month)
    offset = np.where(with_offset, np.where(t[:, 0] == ord("-"), -1, 1) * (off_h * 60 + off_m), 0)
    seconds = (first + day - 1) * 86400 + hour * 3600 + (minute - offset) * 60 + second
    us = seconds * _US + micros
    # the reference cannot shift a stamp out of years 1–9999 (Python's datetime): per row
    ok &= (us >= _FIRST_US) & (us < _END_US)
    return np.where(ok, us, np.iinfo(np.int64).min).astype("datetime64[us]")


_FIRST_US = int(np.datetime64("0001-01-01T00:00:00", "us").astype(np.int64))
_END_US = int(np.datetime64("10000-01-01T00:00:00", "us").astype(np.int64))


def _parse_times(text: pa.Array) -> npt.NDArray[np.datetime64]:
    """ISO 8601 column → datetime64[us] (UTC where an offset or ``Z`` is given); NaT where no
    vectorised form fits (the per-row check decides those rows later).

    Each distinct string is parsed once: a visit's measurements share one timestamp, so a block
    holds ~10× fewer distinct stamps than rows, and parsing was most of the ingest's time. The
    forms with an offset (``2023-01-27T19:00:00+02:00``, ``…Z``), a fraction of a second or
    without seconds take this path too: most modern exports write them.
    """
    encoded = pc.dictionary_encode(pc.utf8_trim_whitespace(text))
    return _parse_distinct(encoded.dictionary)[encoded.indices.to_numpy(zero_copy_only=False)]


def _present(pid: pa.Array) -> npt.NDArray[np.bool_]:
    return pc.fill_null(
        pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(pid)), 0), False
    ).to_numpy(zero_copy_only=False)


def _check_block(table: pa.Table, first_line: int, tracker: _LineTracker) -> tuple[LongBlock, int]:
    n = table.num_rows
    lines, rejections, line = _number_lines(tracker, first_line, n, check_long_row)
    pid, when, var, val, unit = (table.column(c).combine_chunks() for c in LONG_COLUMNS)
    pid_ok = _present(pid)
    times = _parse_times(when)
    values, number_ok = _numbers(val)

    # One conversion per distinct (variable, unit) pair.
    keys = pc.binary_join_element_wise(var, unit, "\x1f")
    encoded = pc.dictionary_encode(keys)
    pairs = encoded.dictionary.to_pylist()
    indices = encoded.indices.to_numpy(zero_copy_only=False)
    codes = np.full(len(pairs), -1, dtype=np.int8)
    scale = np.full(len(pairs), np.nan)
    offset = np.zeros(len(pairs))
    low = np.full(len(pairs), np.nan)
    high = np.full(len(pairs), np.nan)
    flag = np.zeros(len(pairs), dtype=bool)
    for k, pair in enumerate(pairs):
        name, unit_text = pair.split("\x1f", 1)
        try:
            v = variable(name)
            conv = v.conversion(unit_text)
        except RowRejected:
            continue
        codes[k] = VARIABLE_CODES[v.name]
        scale[k], offset[k] = conv.scale, conv.offset
        low[k], high[k], flag[k] = v.low, v.high, v.flag
    canonical = values * scale[indices] + offset[indices]
    in_range = np.where(
        flag[indices],
        (canonical == 0.0) | (canonical == 1.0),
        (canonical >= low[indices]) & (canonical <= high[indices]),
    )
    ok = (
        pid_ok
        & ~np.isnat(times)
        & (codes[indices] >= 0)
        & number_ok
        & np.isfinite(canonical)
        & in_range
    )
    bad = np.flatnonzero(~ok)
    if len(bad):
        # Rejected rows are few: the reference checks give each its exact reason (and accept the
        # rare valid row no vectorised time form covers, such as a date with an offset).
        rows = table.take(pa.array(bad)).to_pylist()
        rescued: list[int] = []
        rescued_times: list[np.datetime64] = []
        for i, fields in zip(bad, rows, strict=True):
            try:
                m = check_long_row([fields[c] or "" for c in LONG_COLUMNS])
            except RowRejected as exc:
                rejections.append(Rejection(int(lines[i]), exc.kind, exc.reason))
                continue
            rescued.append(int(i))
            rescued_times.append(_utc(parse_timestamp(fields["timestamp"])))
            canonical[i] = convert(m.variable, float(fields["value"]), fields["unit"])
        if rescued:
            ok[rescued] = True
            times[rescued] = rescued_times
    keep = np.flatnonzero(ok)
    block = LongBlock(
        lines=lines[keep],
        patient_id=pc.utf8_trim_whitespace(pc.take(pid, pa.array(keep))),
        timestamp=times[keep],
        variable=codes[indices[keep]],
        value=canonical[keep],
        rejections=sorted(rejections, key=lambda r: r.line),
    )
    return block, line


def _check_wide_block(
    table: pa.Table, first_line: int, tracker: _LineTracker, columns: list[tuple[str, str]]
) -> tuple[LongBlock, int]:
    n = table.num_rows
    check = partial(check_wide_row, columns=columns)
    lines, rejections, line = _number_lines(tracker, first_line, n, check)
    pid = table.column(0).combine_chunks()
    times = _parse_times(table.column(1).combine_chunks())
    ok = _present(pid) & ~np.isnat(times)
    cells: list[tuple[npt.NDArray[np.bool_], npt.NDArray[np.float64]]] = []
    for j, (name, unit) in enumerate(columns):
        col = table.column(2 + j).combine_chunks()
        empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0).to_numpy(
            zero_copy_only=False
        )
        values, number_ok = _numbers(col)
        v = variable(name)
        conv = v.conversion(unit)
        canonical = values * conv.scale + conv.offset
        ok &= empty | (number_ok & np.isfinite(canonical) & _in_range(canonical, v))
        cells.append((~empty, canonical))
    bad = np.flatnonzero(~ok)
    if len(bad):  # exact reasons from the reference check; rare valid forms rescued
        for i, fields in zip(bad, table.take(pa.array(bad)).to_pylist(), strict=True):
            try:
                check([fields[c] or "" for c in table.column_names])
            except RowRejected as exc:
                rejections.append(Rejection(int(lines[i]), exc.kind, exc.reason))
                continue
            ok[i] = True
            times[i] = _utc(parse_timestamp(fields[table.column_names[1]]))
    parts = [
        (np.flatnonzero(ok & measured), VARIABLE_CODES[name], canonical)
        for (name, _), (measured, canonical) in zip(columns, cells, strict=True)
    ]
    rows = np.concatenate([idx for idx, _, _ in parts])
    order = np.argsort(rows, kind="stable")  # back to file order, visit by visit
    rows = rows[order]
    block = LongBlock(
        lines=lines[rows],
        patient_id=pc.utf8_trim_whitespace(pc.take(pid, pa.array(rows))),
        timestamp=times[rows],
        variable=np.concatenate([np.full(len(idx), code, dtype=np.int8) for idx, code, _ in parts])[
            order
        ],
        value=np.concatenate([canonical[idx] for idx, _, canonical in parts])[order],
        rejections=sorted(rejections, key=lambda r: r.line),
    )
    return block, line


def _source(path: Path, on_bytes: Callable[[int], None] | None) -> BinaryIO:
    """The file as a Python stream of UTF-8 bytes (gzip undone, a byte-order mark dropped, UTF-16
    transcoded: :mod:`ingest.text`). Not the path: given a path, pyarrow's streaming reader reads
    ahead without bound (measured: a 200 MB extract entirely in memory before the first block
    was handed over); from a stream it reads one block at a time, as fast."""
    return open_text(path, on_bytes=on_bytes).stream


def read_extract(
    path: Path,
    fmt: str | None = None,
    *,
    block_size: int = 8 << 20,
    on_bytes: Callable[[int], None] | None = None,
) -> Iterator[LongBlock]:
    """Validated blocks of a long or wide extract or a FHIR export (``fmt`` None: from the
    content)."""
    fmt = fmt or detect_format(path)
    if fmt == "long":
        return read_long(path, block_size=block_size, on_bytes=on_bytes)
    if fmt == "wide":
        return read_wide(path, block_size=block_size, on_bytes=on_bytes)
    if fmt == "fhir":
        from ingest.ehr.fhir_reader import NDJSON_BLOCK_FACTOR, read_fhir

        return read_fhir(path, block_size=block_size * NDJSON_BLOCK_FACTOR, on_bytes=on_bytes)
    raise InputError(f"unknown extract format {fmt!r}: long, wide or fhir")


def read_wide(
    path: Path, *, block_size: int = 8 << 20, on_bytes: Callable[[int], None] | None = None
) -> Iterator[LongBlock]:
    """Yield validated blocks of a wide extract (``patient_id,timestamp,<variable> (<unit>)…``)
    as measurements, one per filled cell; a row with any bad cell is rejected whole."""
    header = header_fields(path)
    if [h.strip() for h in header[:2]] != list(WIDE_KEY_COLUMNS) or len(header) < 3:
        raise InputError(
            f"{path.name}: not a wide extract: the header must start with "
            f"{', '.join(WIDE_KEY_COLUMNS)} and name at least one variable"
        )
    try:
        columns = [parse_wide_header(h) for h in header[2:]]
    except RowRejected as exc:
        raise InputError(f"{path.name}: {exc.reason}") from exc
    tracker = _LineTracker()
    source = _source(path, on_bytes)
    reader = pacsv.open_csv(
        source,
        read_options=pacsv.ReadOptions(block_size=block_size, use_threads=False),
        parse_options=pacsv.ParseOptions(ignore_empty_lines=False, invalid_row_handler=tracker),
        convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in header}, strings_can_be_null=False
        ),
    )
    next_line = 2
    try:
        for batch in reader:
            table = pa.Table.from_batches([batch])
            block, next_line = _check_wide_block(table, next_line, tracker, columns)
            yield block
    finally:
        source.close()
    if rest := tracker.rest():
        yield _empty_block(
            [_reject_line(n, t, partial(check_wide_row, columns=columns)) for n, t in rest]
        )


def _empty_block(rejections: list[Rejection]) -> LongBlock:
    return LongBlock(
        lines=np.empty(0, np.int64),
        patient_id=pa.array([], pa.string()),
        timestamp=np.empty(0, "datetime64[us]"),
        variable=np.empty(0, np.int8),
        value=np.empty(0),
        rejections=rejections,
    )


def read_long(
    path: Path, *, block_size: int = 8 << 20, on_bytes: Callable[[int], None] | None = None
) -> Iterator[LongBlock]:
    """Yield validated blocks of a long-format extract (bounded memory: one block at a time)."""
    tracker = _LineTracker()
    source = _source(path, on_bytes)
    try:
        reader = pacsv.open_csv(
            source,
            read_options=pacsv.ReadOptions(block_size=block_size, use_threads=False),
            parse_options=pacsv.ParseOptions(ignore_empty_lines=False, invalid_row_handler=tracker),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in LONG_COLUMNS},
                include_columns=list(LONG_COLUMNS),
                strings_can_be_null=False,
            ),
        )
    except (pa.ArrowInvalid, KeyError) as exc:
        source.close()
        raise InputError(
            f"{path.name}: not a long-format extract ({', '.join(LONG_COLUMNS)}): {exc}"
        ) from exc
    next_line = 2
    try:
        for batch in reader:
            block, next_line = _check_block(pa.Table.from_batches([batch]), next_line, tracker)
            yield block
    finally:
        source.close()
    if rest := tracker.rest():  # lines skipped after the last parsed row
        yield _empty_block([_reject_line(n, t, check_long_row) for n, t in rest])
