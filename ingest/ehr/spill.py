"""Group a streamed extract's measurements by patient without holding the extract in memory.

A warehouse extract is ordered however its query left it: one patient's rows can be scattered
over gigabytes. The ingest therefore hash-partitions the accepted measurements by patient into
``n`` bucket files (Arrow IPC, one record batch per block and bucket), as a Grace hash join
does: every row of a patient lands in the same bucket, so each bucket is a complete, independent
scoring batch of about ``file size / n`` bytes, and the ingest's memory is one block.

The bucket of a patient is a keyed hash of the identifier (BLAKE2b, 64 bits), stable across
processes and machines, so a re-run of an interrupted ingest reproduces the same buckets.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from ingest.ehr.reader import LongBlock

SCHEMA = pa.schema(
    [
        ("patient_id", pa.string()),
        ("timestamp", pa.timestamp("us")),
        ("variable", pa.int8()),
        ("value", pa.float64()),
        ("line", pa.int64()),
    ]
)
_KEY = b"medbatch-ehr-bucket"


def bucket_count(size_bytes: int, bucket_bytes: int, max_buckets: int) -> int:
    """Buckets for an extract of ``size_bytes``: about ``bucket_bytes`` of CSV each."""
    return max(1, min(max_buckets, -(-size_bytes // bucket_bytes)))


def buckets_of(patient_ids: list[str], n: int) -> npt.NDArray[np.int64]:
    """The bucket of each identifier (deterministic)."""
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8, key=_KEY).digest(), "little")
            % n
            for p in patient_ids
        ),
        dtype=np.int64,
        count=len(patient_ids),
    )


@dataclass(frozen=True)
class Bucket:
    index: int
    path: Path
    rows: int


class BucketSpill:
    """Append blocks of measurements to ``n`` bucket files under ``directory`` (emptied first)."""

    def __init__(self, directory: Path, n: int) -> None:
        self.directory = directory
        self.n = n
        shutil.rmtree(directory, ignore_errors=True)  # leftovers of an interrupted run
        directory.mkdir(parents=True)
        self._writers: dict[int, ipc.RecordBatchFileWriter] = {}
        self._rows = np.zeros(n, dtype=np.int64)

    def path(self, index: int) -> Path:
        return self.directory / f"bucket-{index:04d}.arrow"

    def add(self, block: LongBlock) -> None:
        if len(block):
            self.add_table(block_table(block))

    def add_table(self, table: pa.Table) -> None:
        """Append measurements already in :data:`SCHEMA` (a block, or rows of an early bucket)."""
        if not table.num_rows:
            return
        encoded = pc.dictionary_encode(table.column("patient_id").combine_chunks())
        unique_bucket = buckets_of(encoded.dictionary.to_pylist(), self.n)
        bucket = unique_bucket[encoded.indices.to_numpy(zero_copy_only=False)]
        order = np.argsort(bucket, kind="stable")
        sorted_buckets = bucket[order]
        starts = np.flatnonzero(np.r_[True, sorted_buckets[1:] != sorted_buckets[:-1]])
        ends = np.r_[starts[1:], len(order)]
        table = table.take(pa.array(order))
        for start, end in zip(starts, ends, strict=True):
            index = int(sorted_buckets[start])
            writer = self._writers.get(index)
            if writer is None:
                writer = self._writers[index] = ipc.new_file(str(self.path(index)), SCHEMA)
            for batch in table.slice(int(start), int(end - start)).to_batches():
                writer.write_batch(batch)
            self._rows[index] += end - start

    def close(self) -> list[Bucket]:
        """Finish every file (fsync'd: the scoring jobs that name them are committed next)."""
        buckets = []
        for index, writer in sorted(self._writers.items()):
            writer.close()
            with self.path(index).open("rb") as fh:
                os.fsync(fh.fileno())
            buckets.append(Bucket(index, self.path(index), int(self._rows[index])))
        self._writers.clear()
        return buckets


def block_table(block: LongBlock) -> pa.Table:
    """A block's accepted measurements as a table in :data:`SCHEMA`, in file order."""
    return pa.table(
        [
            block.patient_id,
            pa.array(block.timestamp, pa.timestamp("us")),
            pa.array(block.variable, pa.int8()),
            pa.array(block.value, pa.float64()),
            pa.array(block.lines, pa.int64()),
        ],
        schema=SCHEMA,
    )


def read_bucket(path: Path | pa.Buffer) -> pa.Table:
    """A bucket's measurements sorted by patient, then time (the scoring order); ``path`` is
    the bucket file, or its bytes fetched from object storage."""
    with ipc.open_file(path if isinstance(path, pa.Buffer) else str(path)) as reader:
        table = reader.read_all()
    return table.sort_by([("patient_id", "ascending"), ("timestamp", "ascending")])
