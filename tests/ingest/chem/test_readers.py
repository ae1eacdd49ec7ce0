"""Library readers: every format, line numbers that point at the right line, bounded memory."""

from __future__ import annotations

import gzip
import tracemalloc
from pathlib import Path

import pytest
from rdkit import Chem

from core.errors import InputError
from ingest.chem.readers import LibraryReader


def _read(path: Path, **kw: object) -> list:
    with LibraryReader(path, **kw) as reader:  # type: ignore[arg-type]
        return list(reader)


def test_smi_with_header_comments_and_blank_lines(tmp_path: Path) -> None:
    p = tmp_path / "lib.smi"
    p.write_text("# a comment\nsmiles name\nCCO ethanol\n\nc1ccccc1\tbenzene ring\nC\n")
    recs = _read(p)
    assert [(r.line_no, r.text, r.name) for r in recs] == [
        (3, "CCO", "ethanol"),
        (5, "c1ccccc1", "benzene ring"),
        (6, "C", None),
    ]


def test_csv_column_choice_is_case_insensitive(tmp_path: Path) -> None:
    p = tmp_path / "lib.csv"
    p.write_text('ID,Structure,mw\nA1,CCO,46\n"A,2",c1ccccc1,78\n')
    recs = _read(p, smiles_column="structure", id_column="id")
    assert [(r.line_no, r.text, r.name) for r in recs] == [(2, "CCO", "A1"), (3, "c1ccccc1", "A,2")]


def test_csv_missing_column_names_the_columns(tmp_path: Path) -> None:
    p = tmp_path / "lib.csv"
    p.write_text("id,structure\n1,CCO\n")
    with pytest.raises(InputError, match=r"no smiles column 'smiles'.*id, structure"):
        _read(p)


def test_tsv_and_gzip(tmp_path: Path) -> None:
    p = tmp_path / "lib.tsv.gz"
    with gzip.open(p, "wt") as fh:
        fh.write("name\tsmiles\nx\tCCN\ny\tCCC\n")
    assert [r.text for r in _read(p)] == ["CCN", "CCC"]


def test_sdf_records_start_lines_and_names(tmp_path: Path) -> None:
    blocks = []
    for name, smi in [("ethanol", "CCO"), ("benzene", "c1ccccc1")]:
        mol = Chem.MolFromSmiles(smi)
        mol.SetProp("_Name", name)
        mol.SetProp("CAT", f"cat-{name}")
        blocks.append(Chem.MolToMolBlock(mol) + f">  <CAT>\ncat-{name}\n\n$$$$\n")
    p = tmp_path / "lib.sdf"
    p.write_text("".join(blocks))
    recs = _read(p)
    assert [r.name for r in recs] == ["ethanol", "benzene"]
    assert recs[0].line_no == 1 and recs[1].line_no == blocks[0].count("\n") + 1
    assert all(r.molblock and "M  END" in r.text and "CAT" not in r.text for r in recs)
    assert [r.name for r in _read(p, id_column="CAT")] == ["cat-ethanol", "cat-benzene"]


def test_truncated_gzip_is_an_input_error(tmp_path: Path) -> None:
    p = tmp_path / "lib.smi.gz"
    data = gzip.compress(("CCO x\n" * 20000).encode())
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="damaged or truncated"):
        _read(p)


def test_unknown_suffix(tmp_path: Path) -> None:
    p = tmp_path / "lib.xlsx"
    p.write_text("x")
    with pytest.raises(InputError, match="unknown library format"):
        LibraryReader(p)


@pytest.mark.slow
def test_million_rows_stream_in_bounded_memory(tmp_path: Path) -> None:
    p = tmp_path / "big.smi.gz"
    with gzip.open(p, "wt", compresslevel=1) as fh:
        for i in range(1_000_000):
            fh.write(f"CC(=O)Oc1ccccc1C(=O)O\tmol-{i}\n")
    unzipped_bytes = 1_000_000 * len("CC(=O)Oc1ccccc1C(=O)O\tmol-000000\n")
    tracemalloc.start()
    count = 0
    with LibraryReader(p) as reader:
        for _ in reader:
            count += 1
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 1_000_000
    assert peak < 5_000_000 < unzipped_bytes, f"peak {peak} bytes: the reader holds the file"
