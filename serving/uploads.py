"""Reading an upload: the rules a prediction request's headers and multipart body must follow.

An ``Upload`` says what a route takes: at most ``most`` files in one multipart ``field``.
Every rule broken is a ``Rejection`` (serving/errors.py) with the same reason and message
on both kinds of route:

- the FastAPI routes read the body themselves (``Upload.read``): at a minimum pace
  (``paced``, 408), whole or not at all (a body cut before its closing boundary is a 400),
  with at most ``most`` files;
- on the typed BentoML routes, BentoML reads and parses the body; ``PartWatch`` checks the
  same rules on the bytes as BentoML receives them, keeping none of them
  (serving/gate.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.datastructures import FormData, Headers
from starlette.formparsers import MultiPartException
from starlette.formparsers import MultiPartParser as FormParser
from starlette.requests import Request

from serving.contract import ModelCard
from serving.decoding import SentFile, UploadLimits
from serving.errors import Rejection
from serving.settings import (
    CLOSING_BOUNDARY_WINDOW,
    EXTRA_FORM_FIELDS,
    IMAGE_FIELD,
    IMAGES_FIELD,
    MIN_BYTES_PER_SECOND,
    MULTIPART_OVERHEAD_BYTES,
    STALL_SECONDS,
)


@dataclass(frozen=True)
class Pace:
    """A body must keep arriving: no pause over ``stall_seconds``, and after the first
    ``stall_seconds`` at least ``min_bytes_per_second`` on average (serving/settings.py)."""

    stall_seconds: float = STALL_SECONDS
    min_bytes_per_second: float = MIN_BYTES_PER_SECOND


async def paced(chunks: AsyncIterator[bytes], pace: Pace) -> AsyncIterator[bytes]:
    """The body's chunks, or Rejection 408 as soon as it breaks ``pace``."""
    started, received = time.monotonic(), 0
    while True:
        # The next chunk must come before the pause limit and before the average rate
        # falls below the minimum: received bytes >= (elapsed - stall) * rate.
        behind_at = started + pace.stall_seconds + received / pace.min_bytes_per_second
        wait = min(pace.stall_seconds, behind_at - time.monotonic())
        try:
            async with asyncio.timeout(max(wait, 0.0)):  # cheaper than wait_for: no new task
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise Rejection(
                "slow_upload",
                f"the request body arrived too slowly ({received} bytes in "
                f"{time.monotonic() - started:.1f} s; pauses of at most {pace.stall_seconds:g} s"
                f" and at least {pace.min_bytes_per_second // 1024:g} KiB/s are accepted)",
            ) from None
        received += len(chunk)
        yield chunk


class ClosingBoundary:
    """Whether a multipart body ended with its closing boundary: a body cut short (a client
    gone mid-upload) must never pass for a form that simply has fewer files."""

    def __init__(self, boundary: bytes) -> None:
        self.closing = b"--" + boundary + b"--"
        self.tail = b""

    def feed(self, chunk: bytes) -> None:
        self.tail = (self.tail + chunk[-CLOSING_BOUNDARY_WINDOW:])[-CLOSING_BOUNDARY_WINDOW:]

    def check(self) -> None:
        if self.closing not in self.tail:
            raise Rejection(
                "truncated_multipart",
                "the multipart body is truncated (it ends before its closing boundary): "
                "send the whole request again",
            )


@dataclass(frozen=True)
class Upload:
    """What a route takes: at most ``most`` files, in the multipart ``field``; ``hint`` ends
    the too-many-files message (where to send more)."""

    field: str
    most: int
    limits: UploadLimits
    hint: str = ""

    def check_headers(self, headers: Headers) -> None:
        """Rejection (4xx) for a request that cannot hold the files, before its body is read."""
        if not headers.get("content-type", "").startswith("multipart/form-data"):
            raise Rejection(
                "not_multipart",
                f"send multipart/form-data with the file in the field '{self.field}'",
            )
        length = headers.get("content-length")
        if length is None:
            raise Rejection("no_content_length", "the request needs a Content-Length header")
        if not length.isdigit():
            raise Rejection("bad_content_length", f"Content-Length is not a number: {length!r}")
        if int(length) > self.most * self.limits.max_upload_bytes + MULTIPART_OVERHEAD_BYTES:
            raise Rejection(
                "request_too_large",
                f"the request exceeds the upload limit "
                f"({self.limits.max_upload_bytes} bytes per image)",
            )

    def boundary(self, headers: Headers) -> bytes:
        boundary = parse_options_header(headers.get("content-type"))[1].get(b"boundary")
        if not boundary:
            raise Rejection("malformed_multipart", "the multipart content type names no boundary")
        return boundary

    def too_many_files(self) -> Rejection:
        return Rejection(
            "too_many_files",
            f"too many files: at most {self.most} per request in the field '{self.field}'"
            f"{self.hint}",
        )

    def missing_file(self, fields_sent: list[str]) -> Rejection:
        return Rejection(
            "missing_file",
            f"no file in the multipart field '{self.field}' "
            f"(fields sent: {sorted(set(fields_sent)) or 'none'})",
        )

    def not_a_file(self) -> Rejection:
        return Rejection("not_a_file", f"the field '{self.field}' must hold a file, not text")

    @contextlib.asynccontextmanager
    async def read(self, request: Request, pace: Pace) -> AsyncIterator[list[SentFile]]:
        """The files sent in the field, read whole; their temporary files closed on leaving."""
        async with self.form(request, pace) as form:
            yield self.files(form)

    @contextlib.asynccontextmanager
    async def form(self, request: Request, pace: Pace) -> AsyncIterator[FormData]:
        """The whole form (its files and text fields); its temporary files closed on leaving."""
        form = await read_form(request, self, pace)
        try:
            yield form
        finally:
            await form.close()

    def files(self, form: FormData) -> list[SentFile]:
        """The files of ``form`` in the field, or Rejection (4xx) if it holds none or text."""
        files = form.getlist(self.field)
        if not files:
            raise self.missing_file(list(form.keys()))
        if not all(hasattr(file, "read") for file in files):
            raise self.not_a_file()
        return [SentFile(file.filename, file.read) for file in files]

    def watch(self, headers: Headers) -> PartWatch:
        return PartWatch(self, self.boundary(headers))


def card_uploads(card: ModelCard) -> tuple[Upload, Upload]:
    """What /predict and /predict_batch take, by the card's limits (params.yaml `serve`)."""
    limits = UploadLimits(**{key: card.serve[key] for key in UploadLimits.__dataclass_fields__})
    single = Upload(IMAGE_FIELD, 1, limits, hint=" (send several photos to /predict_batch)")
    return single, Upload(IMAGES_FIELD, card.serve["max_batch_files"], limits)


async def read_form(request: Request, upload: Upload, pace: Pace) -> FormData:
    """The multipart form, read whole or refused: a body that ends before its closing
    boundary (a client cut off mid-upload) is a 400, never a form missing its last files;
    a body that stalls or trickles is a 408 (``paced``)."""
    closing = ClosingBoundary(upload.boundary(request.headers))

    async def stream() -> AsyncIterator[bytes]:
        async for chunk in paced(request.stream(), pace):
            closing.feed(chunk)
            yield chunk

    most = upload.most
    try:
        parser = FormParser(
            request.headers, stream(), max_files=most, max_fields=most + EXTRA_FORM_FIELDS
        )
        form = await parser.parse()
    except Rejection:  # from paced: too slow
        raise
    except MultiPartException as exc:  # too many files or fields, a part too large
        if exc.message.startswith("Too many files"):  # Starlette's words for max_files
            raise upload.too_many_files() from None
        raise malformed(exc.message) from None
    except Exception as exc:  # bytes that are not multipart, a client gone mid-body
        raise malformed(repr(exc)) from None
    try:
        closing.check()
    except Rejection:
        await form.close()
        raise
    return form


def malformed(why: str) -> Rejection:
    return Rejection("malformed_multipart", f"unreadable multipart body: {why}")


class PartWatch:
    """The rules ``Upload.read`` applies, checked on a multipart body as it streams past
    (``feed`` each chunk, then ``finish``), keeping only the names of its parts."""

    def __init__(self, upload: Upload, boundary: bytes) -> None:
        self.upload = upload
        self.closing = ClosingBoundary(boundary)
        self.fields_sent: list[str] = []
        self.filenames: list[str] = []  # the field's files, in the order sent
        self.files = 0  # in any field: the limit counts them all, as Starlette's max_files
        self.header = [b"", b""]  # the part header being read: name, value
        self.disposition = b""
        callbacks = {
            "on_part_begin": self.part_begins,
            "on_header_field": lambda data, start, end: self.extend(0, data[start:end]),
            "on_header_value": lambda data, start, end: self.extend(1, data[start:end]),
            "on_header_end": self.header_ends,
            "on_headers_finished": self.headers_finished,
        }
        self.parser = MultipartParser(boundary, callbacks)

    def feed(self, chunk: bytes) -> None:
        self.closing.feed(chunk)
        try:
            self.parser.write(chunk)
        except Rejection:
            raise
        except Exception as exc:  # python-multipart's parse errors
            raise malformed(str(exc)) from None

    def finish(self) -> None:
        self.closing.check()
        if self.upload.field not in self.fields_sent:
            raise self.upload.missing_file(self.fields_sent)

    def part_begins(self) -> None:
        self.disposition = b""

    def extend(self, which: int, data: bytes) -> None:
        self.header[which] += data

    def header_ends(self) -> None:
        name, value = self.header
        if name.lower() == b"content-disposition":
            self.disposition = value
        self.header = [b"", b""]

    def headers_finished(self) -> None:
        options = parse_options_header(self.disposition)[1]
        if b"name" not in options:
            raise malformed("a part's Content-Disposition names no field")
        name = text(options[b"name"])
        self.fields_sent.append(name)
        if b"filename" not in options:
            if name == self.upload.field:
                raise self.upload.not_a_file()
            return
        self.files += 1
        if self.files > self.upload.most:
            raise self.upload.too_many_files()
        if name == self.upload.field:
            self.filenames.append(text(options[b"filename"]))


def text(value: bytes) -> str:
    """A header parameter as Starlette decodes it: UTF-8, else Latin-1."""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")
