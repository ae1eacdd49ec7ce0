"""Release patients for scoring while the extract is still read, when it is grouped by patient.

Hash buckets (:mod:`ingest.ehr.spill`) are complete only at the end of the file: one patient's
rows may sit anywhere in it. Warehouse extracts are, however, usually written in the query's
order, one patient's rows together. While that holds, a patient whose rows have been followed by
another patient's is complete, and :class:`GroupedRelease` hands such patients out in *early
buckets* that can be scored while the ingest goes on, so reading and scoring overlap.

Whether the file is grouped is only known at its end, so the release is checked as it goes: the
first accepted row of a patient already released (or seen before another patient) ends the
release. From there on every row goes to the hash buckets, and a released patient who turns up
again (*reopened*) has the rows of its early bucket copied into the hash buckets too; its late
scoring job then replaces the early, partial score (``supersede``). Every patient is therefore
scored on all of its rows, whatever the order of the file; an extract's scores are final when it
is ``done``, as before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from ingest.ehr.blocks import LongBlock
from ingest.ehr.spill import SCHEMA, BucketSpill, block_table

#: Bytes of one long-format CSV row (``P0001234,2023-01-27T19:00:00+02:00,glucose,5.6,mmol/L``):
#: an early bucket holds ``ehr_bucket_bytes`` of such rows, the size hash buckets are planned at
#: (FHIR exports are planned by their long-CSV equivalent too). A fixed figure, not one measured
#: while reading: pyarrow reads ahead, so bytes read so far over-count what was parsed.
LONG_ROW_BYTES = 48

#: Early buckets never hold fewer rows than this (each one is a scoring job with its own
#: transactions and Triton round trips).
MIN_BUCKET_ROWS = 4096


@dataclass(frozen=True)
class EarlyBucket:
    index: int
    path: Path  # the ingest's own copy, kept until the ingest ends
    rows: int
    patients: int


class GroupedRelease:
    """Split a stream of blocks (in file order) into early buckets of complete patients while the
    file is grouped by patient, and into ``spill``'s hash buckets once it is not.

    ``directory`` holds the early buckets the ingest writes (emptied first); a caller hands each
    returned :class:`EarlyBucket` to a scoring job and must keep the file until :meth:`close`.
    """

    def __init__(self, directory: Path, spill: BucketSpill, *, enabled: bool = True) -> None:
        self.directory = directory
        self.spill = spill
        self.grouped = enabled
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("early-*.arrow"):
            stale.unlink()
        self._buffer: list[pa.Table] = []  # rows not released yet, in file order
        self._buffered = 0
        self._open: str | None = None  # the patient whose rows may go on in the next block
        self._open_rows = 0  # its rows at the end of the buffer
        self._closed: set[str] = set()  # complete patients still in the buffer
        self._released: dict[str, int] = {}  # patient → early bucket
        self.reopened: set[str] = set()
        self.buckets: list[EarlyBucket] = []

    def add(self, block: LongBlock, bucket_rows: int) -> list[EarlyBucket]:
        """Take one block; the early buckets it completes (``bucket_rows`` rows or more each)."""
        if not len(block):
            return []
        table = block_table(block)
        if not self.grouped:
            self._to_spill(table)
            return []
        pid = table.column("patient_id").combine_chunks()
        if len(pid) > 1:
            change = pc.not_equal(pid.slice(1), pid.slice(0, len(pid) - 1))
            starts = pc.indices_nonzero(change).to_pylist()
            run_starts = [0, *(s + 1 for s in starts)]
        else:
            run_starts = [0]
        runs: list[str] = pid.take(pa.array(run_starts)).to_pylist()
        continues = runs[0] == self._open
        fresh = runs[1:] if continues else runs
        if (
            len(set(fresh)) != len(fresh)
            or self._open in fresh
            or any(p in self._closed or p in self._released for p in fresh)
        ):
            self._ungroup(table)
            return []
        if self._open is not None and not continues:
            self._closed.add(self._open)
        self._closed.update(runs[:-1])
        self._open_rows = (
            self._open_rows + len(pid)
            if continues and len(runs) == 1
            else len(pid) - run_starts[-1]
        )
        self._open = runs[-1]
        self._buffer.append(table)
        self._buffered += len(pid)
        if self._buffered - self._open_rows >= max(bucket_rows, MIN_BUCKET_ROWS):
            return [self._release(self._buffered - self._open_rows)]
        return []

    def close(self) -> list[EarlyBucket]:
        """The end of the file: the last early bucket while still grouped (every patient is
        complete now); otherwise the rows of reopened patients copied into the hash buckets."""
        if self.grouped:
            if self._open is not None:
                self._closed.add(self._open)
                self._open, self._open_rows = None, 0
            return [self._release(self._buffered)] if self._buffered else []
        if self.reopened:
            wanted = pa.array(sorted(self.reopened), pa.string())
            for index in sorted({self._released[p] for p in self.reopened}):
                with ipc.open_file(str(self._path(index))) as reader:
                    rows = reader.read_all()
                self.spill.add_table(rows.filter(pc.is_in(rows.column("patient_id"), wanted)))
        return []

    def _release(self, rows: int) -> EarlyBucket:
        """Write the first ``rows`` buffered rows (complete patients) as the next early bucket."""
        table = pa.concat_tables(self._buffer)
        head, tail = table.slice(0, rows), table.slice(rows)
        self._buffer = [tail] if tail.num_rows else []
        self._buffered = tail.num_rows
        index = len(self.buckets)
        path = self._path(index)
        with ipc.new_file(str(path), SCHEMA) as writer:
            writer.write_table(head)
        with path.open("rb") as fh:
            os.fsync(fh.fileno())
        for patient in self._closed:
            self._released[patient] = index
        bucket = EarlyBucket(index, path, rows, len(self._closed))
        self._closed = set()
        self.buckets.append(bucket)
        return bucket

    def _ungroup(self, table: pa.Table) -> None:
        """The file is not grouped by patient: everything not released goes to the hash buckets."""
        self.grouped = False
        for held in self._buffer:
            self.spill.add_table(held)
        self._buffer, self._buffered = [], 0
        self._open, self._open_rows, self._closed = None, 0, set()
        self._to_spill(table)

    def _to_spill(self, table: pa.Table) -> None:
        if self._released:
            seen = pc.unique(table.column("patient_id")).to_pylist()
            self.reopened.update(p for p in seen if p in self._released)
        self.spill.add_table(table)

    def _path(self, index: int) -> Path:
        return self.directory / f"early-{index:04d}.arrow"
