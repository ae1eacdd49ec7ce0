"""The column-wise reader agrees row for row with the reference row checks of schema.py."""

from __future__ import annotations

import csv
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from ingest.ehr.reader import VARIABLE_CODES, read_long, read_wide
from ingest.ehr.schema import RowRejected, check_long_row, check_wide_row, parse_wide_header
from medbatch.synth.ehr import write_long_csv, write_wide_csv

NAMES = {code: name for name, code in VARIABLE_CODES.items()}


@pytest.fixture(scope="module")
def extract(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ehr") / "extract.csv"
    write_long_csv(path, 300, seed=7, messiness=0.05)
    return path


def _oracle(path: Path) -> tuple[dict[int, tuple[str, datetime, str, float]], dict[int, str]]:
    accepted, rejected = {}, {}
    with path.open(newline="") as f:
        for line, fields in enumerate(csv.reader(f), start=1):
            if line == 1:
                continue
            try:
                m = check_long_row(fields)
            except RowRejected as exc:
                rejected[line] = exc.kind
                continue
            accepted[line] = (m.patient_id, m.timestamp, m.variable, m.value)
    return accepted, rejected


def _read(path: Path, block_size: int) -> tuple[dict[int, tuple], dict[int, str]]:
    accepted: dict[int, tuple] = {}
    rejected: dict[int, str] = {}
    for block in read_long(path, block_size=block_size):
        pids = block.patient_id.to_pylist()
        for i, line in enumerate(block.lines.tolist()):
            when = block.timestamp[i].astype("datetime64[us]").item()
            accepted[line] = (pids[i], when, NAMES[int(block.variable[i])], float(block.value[i]))
        for r in block.rejections:
            assert r.reason, r
            rejected[r.line] = r.kind
    return accepted, rejected


@pytest.mark.parametrize("block_size", [1 << 12, 1 << 16, 8 << 20])
def test_every_row_is_accepted_or_rejected_as_the_reference_checks_say(
    extract: Path, block_size: int
) -> None:
    want_ok, want_bad = _oracle(extract)
    got_ok, got_bad = _read(extract, block_size)
    assert got_bad == want_bad
    defects = {
        int(r["line"]): r["kind"]
        for r in csv.DictReader(extract.with_name(extract.name + ".defects.csv").open())
    }
    assert got_bad == defects  # and both agree with what the generator broke on purpose
    assert got_ok.keys() == want_ok.keys()
    for line, (pid, when, name, value) in want_ok.items():
        g = got_ok[line]
        if when.tzinfo is not None:
            when = when.astimezone(UTC).replace(tzinfo=None)
        assert (g[0], g[1], g[2]) == (pid, when, name), line
        assert np.isclose(g[3], value, rtol=1e-12), line


def test_impossible_calendar_dates_are_rejected_not_rolled_over(tmp_path: Path) -> None:
    path = tmp_path / "dates.csv"
    path.write_text(
        "patient_id,timestamp,variable,value,unit\n"
        "MRN1,2021-02-30,hba1c,7.0,%\n"
        "MRN1,2021-02-28T24:00:00,hba1c,7.0,%\n"
        "MRN1,2021-02-28T08:30,hba1c,53,mmol/mol\n"
        "\n"
        "MRN1,2021-03-01T08:30:00+01:00,glucose,180,mg/dL\n"
    )
    (block,) = list(read_long(path))
    assert block.lines.tolist() == [4, 6]
    assert [(r.line, r.kind) for r in block.rejections] == [
        (2, "unparseable_time"),
        (3, "unparseable_time"),
        (5, "blank_line"),
    ]
    assert block.value[0] == pytest.approx(7.0, abs=0.05)  # 53 mmol/mol
    assert block.value[1] == pytest.approx(9.99, abs=0.01)  # 180 mg/dL
    assert block.timestamp[1] == np.datetime64("2021-03-01T07:30:00")  # +01:00 stored as UTC


@pytest.mark.parametrize("block_size", [1 << 12, 8 << 20])
def test_wide_rows_are_accepted_or_rejected_whole_as_the_reference_checks_say(
    tmp_path: Path, block_size: int
) -> None:
    path = tmp_path / "wide.csv"
    write_wide_csv(path, 300, seed=11, messiness=0.05)
    want_ok: list[tuple] = []
    want_bad: dict[int, str] = {}
    with path.open(newline="") as f:
        rows = csv.reader(f)
        columns = [parse_wide_header(h) for h in next(rows)[2:]]
        for line, fields in enumerate(rows, start=2):
            try:
                found = check_wide_row(fields, columns)
            except RowRejected as exc:
                want_bad[line] = exc.kind
                continue
            want_ok += [(line, m.patient_id, m.timestamp, m.variable, m.value) for m in found]

    got_ok: list[tuple] = []
    got_bad: dict[int, str] = {}
    for block in read_wide(path, block_size=block_size):
        pids = block.patient_id.to_pylist()
        for i, line in enumerate(block.lines.tolist()):
            got_ok.append(
                (
                    line,
                    pids[i],
                    block.timestamp[i].astype("datetime64[us]").item(),
                    NAMES[int(block.variable[i])],
                    float(block.value[i]),
                )
            )
        got_bad.update({r.line: r.kind for r in block.rejections})
    defects = {
        int(r["line"]): r["kind"]
        for r in csv.DictReader(path.with_name(path.name + ".defects.csv").open())
    }
    assert got_bad == want_bad == defects
    assert len(got_ok) == len(want_ok)
    for got, want in zip(sorted(got_ok), sorted(want_ok), strict=True):
        assert got[:4] == want[:4]
        assert np.isclose(got[4], want[4], rtol=1e-12)


# Timestamps as modern exports write them: UTC offsets (both spellings), Z, fractions, a blank
# instead of T, no seconds; and near misses the reference rejects (or reads its own way).
_FAST_FORMS = [
    "2023-01-27T19:00:00+02:00",
    "2023-01-27T19:00:00Z",
    "2023-01-27T19:00Z",
    "2023-01-27 19:00:00-05:30",
    "2023-01-27T19:00:00+0200",
    "2023-01-27T19:00:00.5+01:00",
    "2023-01-27T19:00:00.123456Z",
    "2023-01-27T19:00:00.12",
    "2023-01-27T00:30:00+01:00",  # the day before in UTC
    "2024-02-29T23:59:59-23:59",  # a leap day, the widest offset: the next day in UTC
    "2023-12-31T23:30:00-01:00",  # the next year in UTC
    "2023-01-27T19:00:00-00:00",
    "2023-01-27T19:00:00",
    "2023-01-27 19:00",
    "2023-01-27",
    " 2023-01-27T19:00:00+02:00 ",
]
_NEAR_MISSES = [
    "2023-01-27T19:00:00+24:00",
    "2023-01-27T19:00:00+23:60",
    "2023-01-27T19:00:00+02",
    "2023-01-27T24:00:00Z",
    "2023-01-27T19:60:00Z",
    "2023-01-27T19:00:60Z",
    "2023-02-29T19:00:00Z",
    "2023-01-27T19:00:00.1234567Z",
    "2023-01-27t19:00:00z",
    "2023-01-27T19:00:00 +02:00",
    "2023-01-27Z",
    "2023-01-27+02:00",  # Python reads this as 02:00 that day: the per-row path keeps that
    "2023-01-27T19",
    "27/01/2023 19:00",
    "",
    "2023-01-27T19:00:00.",
    "2023-01-27T19:00:00.Z",
    "2023-01-27T19:00.5",
    "0000-01-01",
    "2023-00-10",
    "2023-13-01",
    "2023-01-00",
    "2023-04-31T10:00:00Z",
    "2023-01-27T19:00:00+02:0",
    "2023-01-27T19:00:00+02:000",
    "2023-01-27T19:00:00Z0",
    "2023-01-27T19:00:00.123456789",
    "2023-01-27T19:00:00.123456+05:30:00",
    "\uff12023-01-27",  # a full-width digit: a digit to Python's regex, not to datetime
    "2023-01-27T19:00:00+05:30 ",
]


def _reference(text: str) -> np.datetime64 | None:
    from ingest.ehr.reader import _utc
    from ingest.ehr.schema import parse_timestamp

    try:
        return _utc(parse_timestamp(text))
    except RowRejected:
        return None


def test_offsets_z_and_mixed_iso_forms_take_the_vectorised_path_normalised_to_utc() -> None:
    import pyarrow as pa

    from ingest.ehr.reader import _parse_times

    got = _parse_times(pa.array(_FAST_FORMS + _NEAR_MISSES))
    fast, near = got[: len(_FAST_FORMS)], got[len(_FAST_FORMS) :]
    missed = [s for s, t in zip(_FAST_FORMS, fast, strict=True) if np.isnat(t)]
    assert not missed
    assert fast.tolist() == [_reference(s).item() for s in _FAST_FORMS]  # type: ignore[union-attr]
    assert fast[0] == np.datetime64("2023-01-27T17:00:00")
    assert fast[9] == np.datetime64("2024-03-01T23:58:59")
    # Whatever the vectorised path accepts among the near misses, it reads as the reference does;
    # the rest is NaT, left to the per-row check (which rejects it or, for a date with an offset,
    # reads it as Python does).
    for text, t in zip(_NEAR_MISSES, near, strict=True):
        assert np.isnat(t) or t == _reference(text), text


def test_random_edits_of_iso_stamps_are_read_as_the_reference_or_left_to_it() -> None:
    import pyarrow as pa

    from ingest.ehr.reader import _parse_times

    rng = np.random.default_rng(2026)
    alphabet = list("0123456789:-+.TZ t")
    texts = []
    for _ in range(20_000):
        chars = list(_FAST_FORMS[int(rng.integers(len(_FAST_FORMS)))].strip())
        for _ in range(int(rng.integers(1, 3))):
            i = int(rng.integers(len(chars) + 1))
            edit = int(rng.integers(3))
            if edit == 0 and i < len(chars):
                del chars[i]
            elif edit == 1:
                chars.insert(i, alphabet[int(rng.integers(len(alphabet)))])
            elif i < len(chars):
                chars[i] = alphabet[int(rng.integers(len(alphabet)))]
        texts.append("".join(chars))
    got = _parse_times(pa.array(texts))
    accepted = 0
    for text, t in zip(texts, got, strict=True):
        want = _reference(text)
        if want is not None and not (len(text.strip()) == 10 or "+" in text[:11]):
            accepted += 1
        assert np.isnat(t) or t == want, text
    assert accepted > 1000  # the edits leave many valid stamps
    assert (~np.isnat(got)).sum() >= 0.95 * accepted


def test_a_file_of_mixed_timestamp_forms_reads_as_the_per_row_reference(tmp_path: Path) -> None:
    rng = np.random.default_rng(18)
    forms = _FAST_FORMS + _NEAR_MISSES
    path = tmp_path / "mixed.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "timestamp", "variable", "value", "unit"])
        for i in range(3000):
            base = forms[int(rng.integers(len(forms)))]
            # shift the day so the distinct stamps are many, keeping every form's shape
            day = 1 + int(rng.integers(28))
            text = base.replace("-27", f"-{day:02d}", 1) if "-27" in base else base
            w.writerow([f"P{i % 97}", text, "hba1c", f"{5 + (i % 50) / 10:.1f}", "%"])
    want_ok, want_bad = _oracle(path)
    for block_size in (1 << 12, 8 << 20):
        got_ok, got_bad = _read(path, block_size)
        assert got_bad == want_bad
        assert got_ok.keys() == want_ok.keys()
        for line, (pid, when, name, value) in want_ok.items():
            if when.tzinfo is not None:
                when = when.astimezone(UTC).replace(tzinfo=None)
            assert got_ok[line][:3] == (pid, when, name), line
            assert got_ok[line][3] == value
    assert len(want_ok) > 900 and len(want_bad) > 900
