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
