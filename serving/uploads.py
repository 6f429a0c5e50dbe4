"""Turn an uploaded file into model input, or say precisely why it cannot be one.

Every rejection is an ``UploadError`` naming one of the ``REJECTIONS`` reasons, which fixes the
HTTP status the client gets; the service turns it into a JSON answer and counts it on /metrics
by reason and status. Nothing here raises anything else for bad bytes.
"""

from __future__ import annotations

import io
import warnings
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
    "truncated_multipart": 400,
    "missing_file": 422,
    "not_a_file": 422,
    "empty_file": 400,
    "file_too_large": 413,
    "too_many_pixels": 413,
    "not_an_image": 415,
    "image_too_small": 422,
    "corrupt_image": 422,
    "model_unavailable": 503,
}


# How much of a multipart body's end is kept to find its closing boundary (epilogue room).
CLOSING_BOUNDARY_WINDOW = 1024


class UploadError(Exception):
    """A request answered with ``REJECTIONS[reason]`` and ``{"error": message}``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.status = REJECTIONS[reason]
        self.message = message


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


async def read_form(request: Request, most: int) -> FormData:
    """The multipart form, read whole or refused: a body that ends before its closing
    boundary (a client cut off mid-upload) is a 400, never a form missing its last files."""
    tail = bytearray()

    async def stream():
        async for chunk in request.stream():
            tail[:] = (bytes(tail) + chunk)[-CLOSING_BOUNDARY_WINDOW:]
            yield chunk

    boundary = parse_options_header(request.headers.get("content-type"))[1].get(b"boundary")
    if not boundary:
        raise UploadError("malformed_multipart", "the multipart content type names no boundary")
    try:
        parser = MultiPartParser(request.headers, stream(), max_files=most, max_fields=most + 16)
        form = await parser.parse()
    except MultiPartException as exc:  # too many files or fields, a part too large
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
