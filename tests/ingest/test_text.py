"""Text as Windows tools write it (a UTF-8 byte-order mark, CRLF, UTF-16, gzip) reads exactly like
plain UTF-8: through the shared opener, every library reader and both EHR extract readers."""

from __future__ import annotations

import codecs
import gzip
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from rdkit import Chem

from core.errors import InputError
from ingest.chem.readers import LibraryReader
from ingest.ehr.reader import detect_format, read_extract
from ingest.text import open_text, read_first_line, sniff_encoding, text_size
from medbatch.synth.ehr import write_long_csv, write_wide_csv


def _encode(text: str, variant: str) -> bytes:
    """The bytes a tool would write for ``text`` (LF line ends) in one of the variants."""
    if "crlf" in variant:
        text = text.replace("\n", "\r\n")
    if "utf16" in variant:
        data = codecs.BOM_UTF16_LE + text.encode("utf-16-le")
    elif "utf16be" in variant:
        data = codecs.BOM_UTF16_BE + text.encode("utf-16-be")
    else:
        data = text.encode("utf-8")
    if "bom" in variant:
        data = codecs.BOM_UTF8 + data
    if variant.endswith("gz"):
        data = gzip.compress(data, mtime=0)
    return data


VARIANTS = ["bom", "crlf", "bom-crlf", "bom-gz", "bom-crlf-gz", "utf16", "utf16-crlf-gz"]


def _write(folder: Path, name: str, text: str, variant: str) -> Path:
    path = folder / (name + (".gz" if variant.endswith("gz") else ""))
    path.write_bytes(_encode(text, variant))
    return path


# --- the shared opener -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("head", "codec", "bom"),
    [
        (b"patient_id,timestamp", "utf-8", 0),
        (codecs.BOM_UTF8 + b"patient_id", "utf-8", 3),
        (codecs.BOM_UTF16_LE + "pa".encode("utf-16-le"), "utf-16-le", 2),
        (codecs.BOM_UTF16_BE + "pa".encode("utf-16-be"), "utf-16-be", 2),
        (codecs.BOM_UTF32_LE + "pa".encode("utf-32-le"), "utf-32-le", 4),
        ("smiles,name".encode("utf-16-le"), "utf-16-le", 0),
        ("smiles,name".encode("utf-16-be"), "utf-16-be", 0),
        ("Ca\u00e9".encode("latin-1"), "utf-8", 0),  # not UTF-8: the reader reports it
    ],
)
def test_sniff_encoding(head: bytes, codec: str, bom: int) -> None:
    found = sniff_encoding(head)
    assert (found.codec, found.bom_bytes) == (codec, bom)


@pytest.mark.parametrize("variant", [*VARIANTS, "utf16be"])
def test_open_text_gives_utf8_without_bom_and_keeps_lines(tmp_path: Path, variant: str) -> None:
    text = "smiles,name\nCCO,éthanol\n\nc1ccccc1,benzène\n" * 2000  # several blocks
    path = _write(tmp_path, "lib.csv", text, variant)
    seen: list[int] = []
    with open_text(path, on_bytes=seen.append) as source:
        data = source.stream.read()
        assert source.gzipped == variant.endswith("gz")
        assert source.encoding.transcoded == ("utf16" in variant)
    expected = text.replace("\n", "\r\n") if "crlf" in variant else text
    assert data.decode("utf-8") == expected
    assert seen[-1] == path.stat().st_size  # progress counts the stored bytes


def test_invalid_utf16_names_the_encoding(tmp_path: Path) -> None:
    path = tmp_path / "broken.csv"
    path.write_bytes(codecs.BOM_UTF16_LE + "smiles\n".encode("utf-16-le") + b"\x00\xdc")
    with open_text(path) as source, pytest.raises(InputError, match="not valid UTF-16-LE"):
        source.stream.read()


def test_text_size_of_gzip_is_the_uncompressed_size(tmp_path: Path) -> None:
    text = "patient_id,timestamp,variable,value,unit\n" * 10_000
    path = _write(tmp_path, "x.csv", text, "bom-gz")
    assert path.stat().st_size < 10_000
    assert text_size(path) == len(text) + 3
    plain = _write(tmp_path, "y.csv", text, "bom")
    assert text_size(plain) == plain.stat().st_size


def test_first_line_without_bom_and_line_end(tmp_path: Path) -> None:
    path = _write(tmp_path, "x.csv", "patient_id,timestamp\nP1,2024\n", "bom-crlf-gz")
    assert read_first_line(path) == "patient_id,timestamp"
    latin = tmp_path / "latin.csv"
    latin.write_bytes("patient_id,d\u00e9but\n".encode("latin-1"))
    with pytest.raises(InputError, match="not UTF-8 text"):
        read_first_line(latin)


# --- library readers ---------------------------------------------------------------------------
def _records(path: Path, **kw: object) -> list[tuple[int, str, str | None]]:
    with LibraryReader(path, **kw) as reader:  # type: ignore[arg-type]
        return [(r.line_no, r.text.replace("\r\n", "\n"), r.name) for r in reader]


def _sdf_text() -> str:
    blocks = []
    for name, smi in [("ethanol", "CCO"), ("caffeine", "Cn1cnc2c1c(=O)n(C)c(=O)n2C")]:
        mol = Chem.MolFromSmiles(smi)
        mol.SetProp("_Name", name)
        blocks.append(Chem.MolToMolBlock(mol) + f">  <ID>\nid-{name}\n\n$$$$\n")
    return "".join(blocks)


LIBRARIES: dict[str, tuple[str, dict[str, object]]] = {
    "lib.smi": ("CCO ethanol\nC1CC( broken\n\nc1ccccc1 benzene\n", {}),
    "lib.csv": ('smiles,name\nCCO,ethanol\n"c1ccccc1","benzene, ring"\n', {"id_column": "name"}),
    "lib.tsv": ("name\tsmiles\nethanol\tCCO\nbenzene\tc1ccccc1\n", {"id_column": "name"}),
    "lib.sdf": (_sdf_text(), {"id_column": "ID"}),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", list(LIBRARIES))
def test_library_readers_read_every_variant_like_plain_utf8(
    tmp_path: Path, name: str, variant: str
) -> None:
    text, options = LIBRARIES[name]
    plain = tmp_path / "plain" / name
    plain.parent.mkdir()
    plain.write_text(text, encoding="utf-8")
    expected = _records(plain, **options)
    assert expected and expected[0][1] != ""
    assert _records(_write(tmp_path, name, text, variant), **options) == expected


def test_sdf_with_crlf_parses_to_the_same_molecules(tmp_path: Path) -> None:
    path = _write(tmp_path, "lib.sdf", _sdf_text(), "bom-crlf")
    with LibraryReader(path, id_column="ID") as reader:
        smiles = [Chem.MolToSmiles(Chem.MolFromMolBlock(r.text)) for r in reader]
    assert smiles == ["CCO", "Cn1c(=O)c2c(ncn2C)n(C)c1=O"]


def test_bom_csv_finds_its_first_column(tmp_path: Path) -> None:
    # Was: "no smiles column 'smiles'; the columns are \ufeffsmiles, name".
    path = _write(tmp_path, "lib.csv", "smiles,name\nCCO,ethanol\n", "bom")
    assert _records(path) == [(2, "CCO", None)]


# --- EHR extract readers -----------------------------------------------------------------------
def _blocks(path: Path) -> tuple[list[tuple], list[tuple[int, str]]]:
    rows: list[tuple] = []
    rejections: list[tuple[int, str]] = []
    for block in read_extract(path, block_size=1 << 16):
        pids = block.patient_id.to_pylist()
        rows += [
            (int(line), pids[i], block.timestamp[i], int(block.variable[i]), block.value[i])
            for i, line in enumerate(block.lines.tolist())
        ]
        rejections += [(r.line, r.kind) for r in block.rejections]
    return rows, rejections


WRITERS: dict[str, Callable[..., object]] = {"long": write_long_csv, "wide": write_wide_csv}


@pytest.fixture(scope="module", params=list(WRITERS))
def extract_text(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    path = tmp_path_factory.mktemp("ehr") / "extract.csv"
    WRITERS[request.param](path, 120, seed=3, messiness=0.05)
    text = path.read_text(encoding="utf-8")
    assert "\r" not in text
    return request.param, text, _blocks(path)


@pytest.mark.parametrize("variant", VARIANTS)
def test_ehr_readers_read_every_variant_like_plain_utf8(
    tmp_path: Path, extract_text: tuple, variant: str
) -> None:
    fmt, text, (rows, rejections) = extract_text
    path = _write(tmp_path, "extract.csv", text, variant)
    assert detect_format(path) == fmt
    got_rows, got_rejections = _blocks(path)
    assert got_rejections == rejections  # the same lines, for the same reasons
    assert len(got_rows) == len(rows) > 1000
    for got, want in zip(got_rows, rows, strict=True):
        assert got[:4] == want[:4]
        assert np.isclose(got[4], want[4])


def test_ehr_file_in_another_encoding_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "extract.csv"
    path.write_bytes("patient_id,timestamp,variable,value,unit\n".encode("cp1252") + b"\xff\n")
    assert detect_format(path) == "long"  # the header is ASCII
    latin = tmp_path / "latin.csv"
    latin.write_bytes("patient_id,horodatage,variable,valeur,unit\u00e9\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"not UTF-8 text.*re-export it as UTF-8"):
        detect_format(latin)


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"PK\x03\x04" + b"\x00" * 60, "Excel workbook"),
        (b"%PDF-1.7\n%\xe2\xe3", "PDF"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 8, "PNG image"),
        (b"\x00" * 128 + b"DICM" + b"\x02\x00", "DICOM file"),
        (b"smiles\nCCO\x00\x01\x02\n", "binary data"),
    ],
)
def test_files_that_are_not_text_are_refused_saying_what_they_are(
    tmp_path: Path, data: bytes, what: str
) -> None:
    for path in (tmp_path / "lib.smi", tmp_path / "lib.smi.gz"):
        path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
        with pytest.raises(InputError, match=what):
            open_text(path)
        with pytest.raises(InputError, match=what), LibraryReader(path) as reader:
            list(reader)
