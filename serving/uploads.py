"""Turn an uploaded file into model input, or say precisely why it cannot be one.

Every rejection is an ``UploadError`` carrying the HTTP status the client gets; the service
turns it into a JSON 4xx answer. Nothing here raises anything else for bad bytes.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from serving.contract import load_image


class UploadError(Exception):
    """A request the service answers with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class UploadLimits:
    max_upload_bytes: int
    min_side: int
    max_pixels: int


def decode_upload(data: bytes, image_size: int, limits: UploadLimits) -> np.ndarray:
    """``(image_size, image_size, 3)`` uint8 array from an uploaded file's bytes."""
    if not data:
        raise UploadError(400, "the upload is empty")
    if len(data) > limits.max_upload_bytes:
        raise UploadError(413, f"the upload exceeds {limits.max_upload_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UploadError(413, f"the image has more than {limits.max_pixels} pixels") from None
    except Exception:
        raise UploadError(415, "the upload is not an image Pillow can read") from None

    width, height = image.size
    if width * height > limits.max_pixels:
        raise UploadError(
            413, f"the image is {width}x{height}: more than {limits.max_pixels} pixels"
        )
    if min(width, height) < limits.min_side:
        raise UploadError(
            422, f"the image is {width}x{height}: each side must be at least {limits.min_side} px"
        )
    try:
        return load_image(image, image_size)
    except Exception:
        raise UploadError(422, "the image data is corrupt or truncated") from None
