"""The typed endpoints' gate: what the FastAPI routes check while reading a body, checked on the
typed BentoML routes while BentoML reads it.

BentoML parses a typed endpoint's whole multipart body before the endpoint runs, and would
answer malformed input in its own way (a 400 of pydantic's errors, a 500 for text in a file
field, which it tries to fetch as a URL). This ASGI middleware, on the typed routes only:

- before any byte of the body: the check the FastAPI routes make (``Admission.accepted``:
  drain 503, headers 4xx, open-request counting, the large-request turn);
- on each chunk, as BentoML receives it: the same pace and multipart rules (``PartWatch``).
  The first rule broken stops the body there; the client gets that ``Rejection``, and
  BentoML's own answer to the interrupted body is dropped.

The endpoint then gets its files with the names they were sent with (``sent_files``).
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from pathlib import Path

import anyio
import bentoml
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.decoding import SentFile
from serving.errors import Rejection, rejection_response
from serving.uploads import Pace, PartWatch, malformed, paced

# The names of the upload field's files as sent, in order, for the typed endpoint's answer
# (BentoML hands it temporary files, with names of their own).
sent_filenames: ContextVar[list[str]] = ContextVar("sent_filenames")


def sent_files(paths: list[Path]) -> list[SentFile]:
    """A typed endpoint's files, named as they were sent."""
    names = sent_filenames.get(None) or [path.name for path in paths]
    return [SentFile(n, anyio.Path(p).read_bytes) for n, p in zip(names, paths, strict=True)]


class TypedUploads:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        # BentoML logs what interrupts a typed endpoint with its traceback, as a server error;
        # a broken rule is the client's, answered and counted like any rejection.
        bentoml_errors = logging.getLogger("bentoml._internal.server.http_app")
        if not any(isinstance(f, QuietRejections) for f in bentoml_errors.filters):
            bentoml_errors.addFilter(QuietRejections())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        front = bentoml.get_current_service()
        upload = front.typed_uploads.get(scope["path"])
        if upload is None:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            async with front.admission.accepted(headers, upload):
                watch = upload.watch(headers)
                token = sent_filenames.set(watch.filenames)
                try:
                    await self.watched(scope, receive, send, watch, front.pace)
                finally:
                    sent_filenames.reset(token)
        except Rejection as rejection:  # before the body: nothing was sent yet
            await rejection_response(rejection)(scope, receive, send)

    async def watched(
        self, scope: Scope, receive: Receive, send: Send, watch: PartWatch, pace: Pace
    ) -> None:
        chunks = paced(Request(scope, receive).stream(), pace)
        refused: Rejection | None = None
        ended = False

        async def receive_watched() -> Message:
            nonlocal refused, ended
            if ended:  # after the body: whatever the server says (a disconnect)
                return await receive()
            try:
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    watch.finish()
                    ended = True
                    return {"type": "http.request", "body": b"", "more_body": False}
                watch.feed(chunk)
            except Rejection as rejection:
                refused = rejection
                raise
            except Exception as exc:  # a client gone mid-body: as the FastAPI routes say it
                refused = malformed(repr(exc))
                raise refused from None
            return {"type": "http.request", "body": chunk, "more_body": True}

        async def send_answer(message: Message) -> None:
            if refused is None:
                await send(message)
            elif message["type"] == "http.response.start":  # BentoML's, to a broken body
                await rejection_response(refused)(scope, receive, send)

        await self.app(scope, receive_watched, send_answer)


class QuietRejections(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], Rejection))
