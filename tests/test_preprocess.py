"""Preprocess stage: every image becomes an upright, fixed-size RGB array."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from support import make_image

from stages import preprocess


def encoded(image: Image.Image, fmt: str, **save_args) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize(
    "source",
    [
        pytest.param(lambda: io.BytesIO(make_image()), id="rgb-jpeg"),
        pytest.param(lambda: io.BytesIO(make_image(mode="L")), id="grayscale"),
        pytest.param(lambda: io.BytesIO(make_image(mode="CMYK")), id="cmyk-jpeg"),
        pytest.param(lambda: io.BytesIO(make_image(mode="P", fmt="GIF")), id="palette-gif"),
        pytest.param(lambda: io.BytesIO(make_image(mode="RGBA", fmt="PNG")), id="rgba-png"),
    ],
)
def test_any_mode_becomes_rgb_of_the_requested_size(source):
    array = preprocess.load_image(source(), 32)
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert (preprocess.load_image(encoded(image, "PNG"), 4) == 255).all()


def test_exif_orientation_is_applied():
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    upright = preprocess.load_image(encoded(wide, "JPEG", exif=exif), 20)
    # After rotating clockwise the blue half is on top.
    top, bottom = upright[2, 10], upright[17, 10]
    assert top[2] > 200 and top[0] < 60
    assert bottom[0] > 200 and bottom[2] < 60


def test_preprocess_split_maps_labels_to_class_indices(tmp_path):
    paths = []
    for i, color in enumerate([(250, 220, 0), (30, 160, 30)]):
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(make_image(color=color))
        paths.append(str(path))
    arrays = preprocess.preprocess_split(paths, ["dandelion", "grass"], ["grass", "dandelion"], 16)
    assert arrays["images"].shape == (2, 16, 16, 3)
    assert arrays["labels"].tolist() == [1, 0]
    assert arrays["paths"].tolist() == paths


def test_unknown_label_is_an_error(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(make_image())
    with pytest.raises(ValueError, match=r"labels \['tulip'\] are not in params 'classes'"):
        preprocess.preprocess_split([str(path)], ["tulip"], ["grass", "dandelion"], 16)
