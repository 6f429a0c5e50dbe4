"""Turn an uploaded file into model input, or say precisely why it cannot be one.

Every rejection is an ``UploadError`` naming one of the ``REJECTIONS`` reasons, which fixes the
HTTP status the client gets; the service turns it into a JSON answer and counts it on /metrics
by reason and status. Nothing here raises anything else for bad bytes.
"""

from __future__ import annotations

import asyncio
import io
import time
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
from PIL import Image
from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from serving.contract import load_image

# Why a request gets no prediction -> the HTTP status it is answered with. The reasons are
# the `reason` label of classifier_rejected_uploads_total: a short, fixed set (the message,
# which names sizes and fields, would make a label of unbounded cardinality).
REJECTIONS = {
    "not_multipart": 415,
    "no_content_length": 411,
    "bad_content_length": 400,
    "request_too_large": 413,
    "malformed_multipart": 400,
    "too_many_files": 400,
    "truncated_multipart": 400,
    "missing_file": 422,
    "not_a_file": 422,
    "empty_file": 400,
    "file_too_large": 413,
    "too_many_pixels": 413,
    "not_an_image": 415,
    "image_too_small": 422,
    "corrupt_image": 422,
    "slow_upload": 408,
    "overloaded": 503,
    "shutting_down": 503,
    "model_unavailable": 503,
}
# Seconds a client should wait before sending again after a 503 (the Retry-After header).
RETRY_AFTER_SECONDS = 1


# How much of a multipart body's end is kept to find its closing boundary (epilogue room).
CLOSING_BOUNDARY_WINDOW = 1024

# A body must keep arriving: no pause longer than STALL_SECONDS, and after the first
# STALL_SECONDS at least MIN_BYTES_PER_SECOND on average. Slower clients get 408 within
# seconds, instead of holding a connection until the 60 s traffic timeout. 32 KiB/s is a
# slow mobile uplink; a full 10 MB photo at that rate would exceed the traffic timeout anyway.
STALL_SECONDS = 5.0
MIN_BYTES_PER_SECOND = 32 * 1024


class UploadError(Exception):
    """A request answered with ``REJECTIONS[reason]`` and ``{"error": message}``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.status = REJECTIONS[reason]
        self.message = message

    @property
    def headers(self) -> dict[str, str]:
        if self.status == 503:  # the service is fine, only busy: say when to come back
            return {"Retry-After": str(RETRY_AFTER_SECONDS)}
        if self.status == 408:  # the rest of the body may still come: do not reuse the line
            return {"Connection": "close"}
        return {}


@dataclass(frozen=True)
class UploadLimits:
    max_upload_bytes: int
    min_side: int
    max_pixels: int


def decode_upload(data: bytes, image_size: int, limits: UploadLimits) -> np.ndarray:
    """``(image_size, image_size, 3)`` uint8 array from an uploaded file's bytes."""
    if not data:
        raise UploadError("empty_file", "the upload is empty")
    if len(data) > limits.max_upload_bytes:
        raise UploadError("file_too_large", f"the upload exceeds {limits.max_upload_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError(
            "too_many_pixels", f"the image has more than {limits.max_pixels} pixels"
        ) from None
    except Exception:
        raise UploadError("not_an_image", "the upload is not an image Pillow can read") from None

    width, height = image.size
    if width * height > limits.max_pixels:
        raise UploadError(
            "too_many_pixels",
            f"the image is {width}x{height}: more than {limits.max_pixels} pixels",
        )
    if min(width, height) < limits.min_side:
        raise UploadError(
            "image_too_small",
            f"the image is {width}x{height}: each side must be at least {limits.min_side} px",
        )
    try:
        return load_image(image, image_size)
    except Exception:
        raise UploadError("corrupt_image", "the image data is corrupt or truncated") from None


async def paced_body(request: Request) -> AsyncIterator[bytes]:
    """The request body's chunks, or UploadError 408 as soon as it stalls for STALL_SECONDS
    or falls behind MIN_BYTES_PER_SECOND (after the first STALL_SECONDS)."""
    chunks = aiter(request.stream())
    started, received = time.monotonic(), 0
    while True:
        # The next chunk must come before the pause limit and before the average rate
        # falls below the minimum: received bytes >= (elapsed - STALL_SECONDS) * rate.
        behind_at = started + STALL_SECONDS + received / MIN_BYTES_PER_SECOND
        wait = min(STALL_SECONDS, behind_at - time.monotonic())
        try:
            async with asyncio.timeout(max(wait, 0.0)):  # cheaper than wait_for: no new task
                chunk = await anext(chunks)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise UploadError(
                "slow_upload",
                f"the request body arrived too slowly ({received} bytes in "
                f"{time.monotonic() - started:.1f} s; pauses of at most {STALL_SECONDS:g} s and "
                f"at least {MIN_BYTES_PER_SECOND // 1024} KiB/s are accepted)",
            ) from None
        received += len(chunk)
        yield chunk


async def read_form(request: Request, most: int) -> FormData:
    """The multipart form, read whole or refused: a body that ends before its closing
    boundary (a client cut off mid-upload) is a 400, never a form missing its last files;
    a body that stalls or trickles is a 408 (``paced_body``)."""
    tail = bytearray()

    async def stream():
        async for chunk in paced_body(request):
            tail[:] = (tail + chunk[-CLOSING_BOUNDARY_WINDOW:])[-CLOSING_BOUNDARY_WINDOW:]
            yield chunk

    boundary = parse_options_header(request.headers.get("content-type"))[1].get(b"boundary")
    if not boundary:
        raise UploadError("malformed_multipart", "the multipart content type names no boundary")
    try:
        parser = MultiPartParser(request.headers, stream(), max_files=most, max_fields=most + 16)
        form = await parser.parse()
    except UploadError:  # from paced_body: too slow
        raise
    except MultiPartException as exc:  # too many files or fields, a part too large
        if exc.message.startswith("Too many files"):  # Starlette's words for max_files
            raise UploadError(
                "too_many_files", f"too many files: at most {most} per request"
            ) from None
        raise UploadError(
            "malformed_multipart", f"unreadable multipart body: {exc.message}"
        ) from None
    except Exception as exc:  # bytes that are not multipart, a client gone mid-body
        raise UploadError("malformed_multipart", f"unreadable multipart body: {exc!r}") from None
    if b"--" + boundary + b"--" not in tail:
        await form.close()
        raise UploadError(
            "truncated_multipart",
            "the multipart body is truncated (it ends before its closing boundary): "
            "send the whole request again",
        )
    return form
