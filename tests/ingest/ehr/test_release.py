"""Early release of patients while an extract is read: every accepted row is scored exactly with
its patient's other rows, whatever the order of the file."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from ingest.ehr.blocks import LongBlock
from ingest.ehr.reader import read_extract
from ingest.ehr.release import MIN_BUCKET_ROWS, GroupedRelease
from ingest.ehr.spill import BucketSpill, read_bucket
from medbatch.synth.ehr import write_long_csv


def _block(rows: list[tuple[str, int]]) -> LongBlock:
    """Rows of (patient, line) in file order."""
    return LongBlock(
        lines=np.array([line for _, line in rows], dtype=np.int64),
        patient_id=pa.array([p for p, _ in rows], pa.string()),
        timestamp=np.array([line for _, line in rows], dtype="datetime64[s]").astype(
            "datetime64[us]"
        ),
        variable=np.zeros(len(rows), dtype=np.int8),
        value=np.ones(len(rows), dtype=np.float64),
    )


def _file(order: list[str], rows_each: int) -> list[tuple[str, int]]:
    line = iter(range(2, 10**9))
    return [(p, next(line)) for p in order for _ in range(rows_each)]


def _run(
    tmp_path: Path, rows: list[tuple[str, int]], block_rows: int, bucket_rows: int
) -> tuple[GroupedRelease, list[Path], list[Path]]:
    """Feed ``rows`` in blocks; the release, its early bucket files and the hash bucket files."""
    spill = BucketSpill(tmp_path / "spill", 3)
    release = GroupedRelease(tmp_path / "early", spill)
    early = []
    for start in range(0, len(rows), block_rows):
        early += release.add(_block(rows[start : start + block_rows]), bucket_rows)
    early += release.close()
    return release, [b.path for b in early], [b.path for b in spill.close()]


def _patients_rows(paths: list[Path]) -> list[dict[str, set[int]]]:
    out = []
    for path in paths:
        table = read_bucket(path)
        rows: dict[str, set[int]] = {}
        for p, line in zip(
            table.column("patient_id").to_pylist(), table.column("line").to_pylist(), strict=True
        ):
            rows.setdefault(p, set()).add(line)
        out.append(rows)
    return out


def test_a_grouped_file_is_released_in_complete_patients_before_its_end(tmp_path: Path) -> None:
    patients = [f"P{i:05d}" for i in range(400)]
    rows = _file(patients, 37)  # 37 rows each: patients straddle the 1,000-row blocks
    release, early, late = _run(tmp_path, rows, 1000, MIN_BUCKET_ROWS)
    assert release.grouped and not release.reopened and late == []
    buckets = _patients_rows(early)
    assert len(buckets) == len(rows) // MIN_BUCKET_ROWS + 1
    seen: Counter[str] = Counter()
    for bucket in buckets:
        seen.update(bucket.keys())
        for p, lines in bucket.items():
            assert len(lines) == 37, f"{p} released incomplete"
    assert set(seen) == set(patients) and max(seen.values()) == 1
    # every bucket but the last was released at its size, not at the end of the file
    sizes = [read_bucket(p).num_rows for p in early]
    assert all(MIN_BUCKET_ROWS <= s < MIN_BUCKET_ROWS + 1000 for s in sizes[:-1])


def test_a_patient_seen_again_before_release_sends_everything_to_hash_buckets(
    tmp_path: Path,
) -> None:
    order = [f"P{i:03d}" for i in range(50)]
    rows = _file(order, 10) + _file(["P003"], 2)  # P003 again, long before any release
    release, early, late = _run(tmp_path, rows, 64, 10**6)
    assert not release.grouped and early == [] and not release.reopened
    merged: dict[str, set[int]] = {}
    for bucket in _patients_rows(late):
        for p, lines in bucket.items():
            assert p not in merged, "patient split over hash buckets"
            merged[p] = lines
    assert sum(len(v) for v in merged.values()) == len(rows)
    assert len(merged["P003"]) == 12


def test_a_released_patient_seen_again_is_rescored_on_all_its_rows(tmp_path: Path) -> None:
    order = [f"P{i:05d}" for i in range(600)]
    rows = _file(order, 20) + _file(["P00007", "P00599", "NEW"], 3) + _file(["P00010"], 1)
    release, early, late = _run(tmp_path, rows, 500, MIN_BUCKET_ROWS)
    assert not release.grouped
    assert release.reopened == {"P00007", "P00010"}  # P00599 was never released: not reopened
    early_rows = _patients_rows(early)
    late_rows: dict[str, set[int]] = {}
    for bucket in _patients_rows(late):
        late_rows.update(bucket)
    # a reopened patient's late bucket holds all its rows: its early rows and the later ones
    assert len(late_rows["P00007"]) == 23 and len(late_rows["P00010"]) == 21
    assert len(late_rows["P00599"]) == 23 and len(late_rows["NEW"]) == 3
    # every other patient is scored once, complete, from wherever it went
    for p in order:
        if p in release.reopened:
            continue
        where = [b[p] for b in early_rows if p in b] + ([late_rows[p]] if p in late_rows else [])
        assert len(where) == 1 and len(where[0]) in (20, 23), p


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_any_order_scores_every_row_with_all_its_patients_rows(tmp_path: Path, seed: int) -> None:
    """Random files, mostly grouped with a few rows moved: the final bucket of each patient (its
    late bucket if it has one, else its only early bucket) holds exactly its rows."""
    rng = random.Random(seed)
    rows = _file([f"P{i:04d}" for i in range(300)], 30)
    for _ in range(rng.randint(0, 4)):
        rows.append(rows.pop(rng.randrange(len(rows))))
    release, early, late = _run(tmp_path, rows, rng.randint(50, 900), MIN_BUCKET_ROWS)
    final: dict[str, set[int]] = {}
    for bucket in _patients_rows(early):
        for p, lines in bucket.items():
            assert p not in final
            final[p] = lines
    for bucket in _patients_rows(late):
        for p, lines in bucket.items():
            assert p not in final or p in release.reopened
            final[p] = lines
    expected: dict[str, set[int]] = {}
    for p, line in rows:
        expected.setdefault(p, set()).add(line)
    assert final == expected


def test_a_real_extract_read_in_blocks_is_released_whole(tmp_path: Path) -> None:
    extract = tmp_path / "extract.csv"
    write_long_csv(extract, 200, seed=3)  # the generator writes each patient's rows together
    spill = BucketSpill(tmp_path / "spill", 3)
    release = GroupedRelease(tmp_path / "early", spill)
    accepted = 0
    early = []
    for block in read_extract(extract, block_size=1 << 16):
        accepted += len(block)
        early += release.add(block, MIN_BUCKET_ROWS)
    early += release.close()
    assert release.grouped and len(early) > 1 and spill.close() == []
    total = 0
    for bucket in early:
        with ipc.open_file(str(bucket.path)) as reader:
            total += reader.read_all().num_rows
    assert total == accepted
