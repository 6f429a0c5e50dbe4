"""Turn uploaded files into model input, or say precisely why one cannot be.

Every bad file is a ``Rejection`` (serving/errors.py) naming its reason; nothing here raises
anything else for bad bytes. Decoding runs in worker threads, in two lanes
(serving/resources.py): small files a few at a time, large ones one at a time at a lower
priority, so that small photos never queue behind large ones.
"""

from __future__ import annotations

import asyncio
import functools
import io
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio
import numpy as np
from PIL import Image

from serving.contract import load_image
from serving.errors import Rejection
from serving.resources import large_decode_pool, small_decode_limiter
from serving.settings import ACCEPTED_FORMATS, LARGE_UPLOAD_BYTES


@dataclass(frozen=True)
class UploadLimits:
    """The card's limits on one uploaded file (params.yaml `serve`)."""

    max_upload_bytes: int
    min_side: int
    max_pixels: int


@dataclass(frozen=True)
class SentFile:
    """An uploaded file: its name as sent, and how to read its bytes."""

    filename: str
    read: Callable[[], Awaitable[bytes]]


def held(filename: str, data: bytes) -> SentFile:
    """A SentFile whose bytes are already read."""

    async def read() -> bytes:
        return data

    return SentFile(filename, read)


def accepted_formats() -> str:
    """ACCEPTED_FORMATS as a phrase: "JPEG, PNG, ... or TIFF"."""
    *others, last = ACCEPTED_FORMATS
    return f"{', '.join(others)} or {last}" if others else last


def decode_upload(data: bytes, image_size: int, limits: UploadLimits) -> np.ndarray:
    """``(image_size, image_size, 3)`` uint8 array from an uploaded file's bytes."""
    if not data:
        raise Rejection("empty_file", "the upload is empty")
    if len(data) > limits.max_upload_bytes:
        raise Rejection("file_too_large", f"the upload exceeds {limits.max_upload_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Reads the header only, with the decoders of the accepted formats only.
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Rejection(
            "too_many_pixels", f"the image has more than {limits.max_pixels} pixels"
        ) from None
    except Exception:
        raise Rejection("not_an_image", f"the upload is not a {accepted_formats()} image") from None

    width, height = image.size
    if width * height > limits.max_pixels:
        raise Rejection(
            "too_many_pixels",
            f"the image is {width}x{height}: more than {limits.max_pixels} pixels",
        )
    if min(width, height) < limits.min_side:
        raise Rejection(
            "image_too_small",
            f"the image is {width}x{height}: each side must be at least {limits.min_side} px",
        )
    try:
        return load_image(image, image_size)
    except Exception:
        raise Rejection("corrupt_image", "the image data is corrupt or truncated") from None


async def decoded(files: list[SentFile], image_size: int, limits: UploadLimits) -> list[np.ndarray]:
    """Model input from each file, read one at a time; Rejection (4xx) naming a file that
    fails (``file 2 (broken.jpg): ...`` when there are several)."""
    arrays = []
    for index, file in enumerate(files):
        try:
            data = await file.read()
            # In a worker thread: decoding a photo must not hold up the event loop, and so
            # every other request.
            decode = functools.partial(decode_upload, data, image_size, limits)
            if len(data) > LARGE_UPLOAD_BYTES:
                loop = asyncio.get_running_loop()
                arrays.append(await loop.run_in_executor(large_decode_pool(), decode))
            else:
                arrays.append(
                    await anyio.to_thread.run_sync(decode, limiter=small_decode_limiter())
                )
        except Rejection as rejection:
            if len(files) > 1:
                rejection.message = f"file {index + 1} ({file.filename}): {rejection.message}"
            raise
    return arrays
