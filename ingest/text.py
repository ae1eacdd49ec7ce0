"""Text files as every reader sees them: UTF-8 bytes, decompressed, without a byte-order mark.

Spreadsheet and database exports on Windows (Excel's "CSV UTF-8", SQL Server and SSMS,
PowerShell's ``Export-Csv``) start their files with the UTF-8 byte-order mark ``EF BB BF``, and
Excel's "Unicode text" writes UTF-16. A reader that decodes the bytes itself sees ``\\ufeff``
glued to the first header or SMILES. So every reader of text (library files, EHR extracts, the
drop-folder scan, uploads) opens its file here, once: gzip is undone, the encoding is sniffed
from the first bytes, a UTF-8 BOM is dropped, and UTF-16/UTF-32 are transcoded to UTF-8 on the
fly by the standard codecs, block by block (memory stays bounded). Lines are neither added nor
removed, so line numbers in rejections stay those of the file; CRLF line ends pass through for
the CSV parsers, which accept them.
"""

from __future__ import annotations

import codecs
import gzip
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from core.errors import InputError

GZIP_MAGIC = b"\x1f\x8b"

#: (byte-order mark, codec that decodes the rest, name shown to people), longest first: the
#: UTF-32 LE mark begins with the UTF-16 LE one.
_BOMS: tuple[tuple[bytes, str, str], ...] = (
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32 (little endian)"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32 (big endian)"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8 with a byte-order mark"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16 (little endian)"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16 (big endian)"),
)
_SNIFF_BYTES = 512
#: Files people mistake for text exports, by their first bytes.
_BINARY_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", "a ZIP archive or an Excel workbook (.xlsx); save the sheet as 'CSV UTF-8'"),
    (b"\xd0\xcf\x11\xe0", "an old Excel/Office file (.xls); save the sheet as 'CSV UTF-8'"),
    (b"%PDF", "a PDF document"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"BZh", "a bzip2 archive; only gzip (.gz) is read"),
    (b"\xfd7zXZ", "an xz archive; only gzip (.gz) is read"),
    (b"(\xb5/\xfd", "a zstd archive; only gzip (.gz) is read"),
)


@dataclass(frozen=True)
class Encoding:
    """What the first bytes of a file said: the codec of its text and how many bytes of
    byte-order mark precede it."""

    codec: str  # a Python codec name; "utf-8" needs no transcoding
    bom_bytes: int
    label: str  # for people: "UTF-8", "UTF-16 (little endian)", …

    @property
    def transcoded(self) -> bool:
        return self.codec != "utf-8"


UTF8 = Encoding("utf-8", 0, "UTF-8")


def refuse_binary(name: str, head: bytes, encoding: Encoding) -> None:
    """:class:`InputError` when the first bytes are not text (a workbook, an image, a DICOM
    file, another compression) — better said at once than as a thousand unreadable rows."""
    for magic, what in _BINARY_MAGIC:
        if head.startswith(magic):
            raise InputError(f"{name}: this is {what}, not a text file")
    if head[128:132] == b"DICM":
        raise InputError(f"{name}: this is a DICOM file, not a text file; send it to the listener")
    if not encoding.transcoded and b"\x00" in head:
        raise InputError(f"{name}: binary data, not a text file (NUL bytes in the first lines)")


def sniff_encoding(head: bytes) -> Encoding:
    """The encoding the first bytes of a (decompressed) text file are in.

    A byte-order mark decides; without one, NUL bytes in every other position of the first line
    are UTF-16 without a mark (text from some exporters); anything else is read as UTF-8, and a
    byte that is not UTF-8 is the reader's to report.
    """
    for bom, codec, label in _BOMS:
        if head.startswith(bom):
            return Encoding(codec, len(bom), label)
    sample = head[: len(head) - len(head) % 2]
    if len(sample) >= 4 and b"\x00" in sample:
        odd_nul = sample[1::2].count(0) >= len(sample) // 4 and not sample[0::2].count(0)
        even_nul = sample[0::2].count(0) >= len(sample) // 4 and not sample[1::2].count(0)
        if odd_nul:
            return Encoding("utf-16-le", 0, "UTF-16 (little endian, no byte-order mark)")
        if even_nul:
            return Encoding("utf-16-be", 0, "UTF-16 (big endian, no byte-order mark)")
    return UTF8


class _Counting(io.RawIOBase):
    """The stored bytes (a file, or a member of an archive), reporting how many have been
    consumed (progress bars measure the file as stored, also when it is gzipped)."""

    def __init__(self, raw: IO[bytes], on_bytes: Callable[[int], None] | None) -> None:
        self._fh = raw
        self._on_bytes = on_bytes
        self.done = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = self._fh.readinto(buffer) or 0  # type: ignore[attr-defined]
        self.done += n
        if self._on_bytes is not None:
            self._on_bytes(self.done)
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


class _Transcoded(io.RawIOBase):
    """UTF-8 bytes of a binary stream in another encoding, decoded block by block."""

    def __init__(self, inner: IO[bytes], codec: str, block: int = 1 << 16) -> None:
        self._inner = inner
        self._decoder = codecs.getincrementaldecoder(codec)(errors="strict")
        self._codec = codec
        self._block = block
        self._pending = b""
        self._eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._pending and not self._eof:
            raw = self._inner.read(self._block)
            self._eof = not raw
            try:
                self._pending = self._decoder.decode(raw, final=self._eof).encode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(
                    f"the file is not valid {self._codec.upper()} text ({exc.reason}); "
                    "re-export it as UTF-8 (in Excel: Save As → 'CSV UTF-8')"
                ) from exc
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        self._inner.close()
        super().close()


@dataclass
class TextSource:
    """An opened text file: ``stream`` gives its text as UTF-8 bytes without a byte-order mark.

    ``progress()`` is the number of bytes of the stored file consumed so far; ``encoding`` and
    ``gzipped`` say what was found.
    """

    path: Path
    stream: BinaryIO
    encoding: Encoding
    gzipped: bool
    _counter: _Counting

    def progress(self) -> int:
        return self._counter.done

    def text(self, errors: str = "strict") -> IO[str]:
        """The same content as a text stream (``newline=""``: CRLF reaches the parser intact)."""
        return io.TextIOWrapper(self.stream, encoding="utf-8", errors=errors, newline="")

    def close(self) -> None:
        self.stream.close()

    def __enter__(self) -> TextSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_text(
    path: Path, *, on_bytes: Callable[[int], None] | None = None, buffer: int = 1 << 20
) -> TextSource:
    """Open ``path`` (optionally gzipped) as UTF-8 bytes without a byte-order mark.

    ``on_bytes`` is called with the stored bytes consumed so far as the stream is read. Raises
    :class:`InputError` for a gzip file that is damaged before its first bytes of text.
    """
    return open_stream(Path(path).open("rb"), Path(path), on_bytes=on_bytes, buffer=buffer)


def open_stream(
    raw_stream: IO[bytes],
    name: Path,
    *,
    on_bytes: Callable[[int], None] | None = None,
    buffer: int = 1 << 20,
) -> TextSource:
    """:func:`open_text` for an already opened binary stream (a member of a .zip or .tar read
    in place); ``name`` is what messages call it. The stream is closed with the source."""
    counter = _Counting(raw_stream, on_bytes)
    raw: IO[bytes] = io.BufferedReader(counter, buffer)
    try:
        gzipped = raw.peek(2)[:2] == GZIP_MAGIC  # type: ignore[attr-defined]
        if gzipped:
            raw = io.BufferedReader(gzip.GzipFile(fileobj=raw), buffer)  # type: ignore[arg-type]
        head = raw.peek(_SNIFF_BYTES)[:_SNIFF_BYTES]  # type: ignore[attr-defined]
    except (OSError, EOFError) as exc:
        raw.close()
        raise InputError(f"{name.name}: the file is damaged or truncated ({exc})") from exc
    encoding = sniff_encoding(head)
    try:
        refuse_binary(name.name, head, encoding)
    except InputError:
        raw.close()
        raise
    if encoding.bom_bytes:
        raw.read(encoding.bom_bytes)
    stream: IO[bytes] = raw
    if encoding.transcoded:
        stream = io.BufferedReader(_Transcoded(raw, encoding.codec), buffer)
    return TextSource(name, stream, encoding, gzipped, counter)  # type: ignore[arg-type]


def read_first_line(path: Path) -> str:
    """The first line of a text file, decoded as above (header sniffing; CR/LF stripped).

    Raises :class:`InputError` naming the problem when the line is not UTF-8 text.
    """
    with open_text(path) as source:
        raw = source.stream.readline()
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{Path(path).name}: not UTF-8 text ({exc.reason} at byte {exc.start} of the first "
            "line); re-export it as UTF-8 (in Excel: Save As → 'CSV UTF-8')"
        ) from exc
    return line.rstrip("\r\n")


def text_size(path: Path) -> int:
    """Bytes of text in the file: its size, or for gzip the size its trailer records (ISIZE,
    the uncompressed length modulo 4 GiB; taken as the smallest such length not below the
    compressed size). Sizing work by the stored bytes of a gzipped extract would undercount it
    five- to tenfold."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as fh:
        if fh.read(2) != GZIP_MAGIC or size < 18:
            return size
        fh.seek(-4, io.SEEK_END)
        isize = int.from_bytes(fh.read(4), "little")
    while isize < size:
        isize += 1 << 32
    return isize
