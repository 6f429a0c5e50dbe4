"""Small generated images."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def make_image(color=(200, 180, 40), size=(64, 48), mode="RGB", fmt="JPEG", seed=0) -> bytes:
    """A small image with some texture, encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(color) + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()
