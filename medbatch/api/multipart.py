"""Multipart request bodies parsed as they stream in (python-multipart's push parser), each part
handed to a sink as it arrives: uploads go to disk without the whole body ever being held, and
a body over its limit is refused as soon as it passes the limit."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import anyio
from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from medbatch.api.problems import HttpProblem


@dataclass
class Part:
    """One part's headers (names lower-cased) and what its Content-Disposition says."""

    headers: dict[str, str] = field(default_factory=dict)

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()

    def _disposition(self) -> dict[bytes, bytes]:
        return parse_options_header(self.headers.get("content-disposition", ""))[1]

    @property
    def name(self) -> str | None:
        value = self._disposition().get(b"name")
        return value.decode("utf-8", "replace") if value is not None else None

    @property
    def filename(self) -> str | None:
        value = self._disposition().get(b"filename")
        return value.decode("utf-8", "replace") if value is not None else None


class Sink(Protocol):
    """Where one part's data goes: ``close`` when the part is complete, ``abort`` when the body
    broke off inside it (nothing half-written may stay)."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


@dataclass
class _State:
    part: Part = field(default_factory=Part)
    sink: Sink | None = None
    header_name: bytes = b""
    header_value: bytes = b""
    ended: bool = False


def boundary_of(request: Request, media_type: str) -> bytes:
    """The boundary of a ``media_type`` body; 415 for another content type, 400 without one."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    if ctype.decode("latin-1").lower() != media_type:
        raise HttpProblem(
            415,
            f"the body must be {media_type}, not "
            f"{ctype.decode('latin-1') or 'without a Content-Type'}",
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise HttpProblem(400, f"the {media_type} Content-Type header has no boundary parameter")
    return boundary


async def read_multipart(
    request: Request, boundary: bytes, open_part: Callable[[Part], Sink], *, max_body: int
) -> int:
    """Parse the body, writing each part to the sink ``open_part`` gives for its headers; the
    body's size. Raises 413 past ``max_body`` bytes and 400 for a body that ends before its
    closing boundary (a truncated upload). Sinks run in a worker thread (they may write)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_body:
        raise HttpProblem(413, f"the body is {int(declared):,} bytes; the limit is {max_body:,}")
    state = _State()

    def on_part_begin() -> None:
        state.part = Part()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state.header_name += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state.header_value += data[start:end]

    def on_header_end() -> None:
        name = state.header_name.decode("latin-1").strip().lower()
        state.part.headers[name] = state.header_value.decode("latin-1").strip()
        state.header_name, state.header_value = b"", b""

    def on_headers_finished() -> None:
        state.sink = open_part(state.part)

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state.sink is not None:
            state.sink.write(data[start:end])

    def on_part_end() -> None:
        if state.sink is not None:
            state.sink.close()
        state.sink = None

    def on_end() -> None:
        state.ended = True

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_end": on_end,
        },
    )
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body:
                raise HttpProblem(413, f"the body passed the limit of {max_body:,} bytes")
            if chunk:
                await anyio.to_thread.run_sync(parser.write, chunk)
    except HttpProblem:
        raise
    except Exception as exc:  # a malformed body: the parser says where
        if type(exc).__module__.startswith("python_multipart"):
            raise HttpProblem(400, f"malformed multipart body: {exc}") from exc
        raise
    finally:
        if state.sink is not None:  # cut off (or refused) inside a part
            state.sink.abort()
            state.sink = None
    if not state.ended:
        raise HttpProblem(
            400, "the multipart body ended before its closing boundary (truncated upload)"
        )
    return size
