"""The train/serve contract: image decoding, the decision rule and the model card."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from serving import contract
from tests.support.images import make_image


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
    array = contract.load_image(source(), 32)
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert (contract.load_image(encoded(image, "PNG"), 4) == 255).all()


def test_exif_orientation_is_applied():
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    upright = contract.load_image(encoded(wide, "JPEG", exif=exif), 20)
    # After rotating clockwise the blue half is on top.
    top, bottom = upright[2, 10], upright[17, 10]
    assert top[2] > 200 and top[0] < 60
    assert bottom[0] > 200 and bottom[2] < 60


def test_sixteen_bit_images_are_scaled_not_clipped():
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024).astype(np.uint16)
    array = contract.load_image(encoded(Image.fromarray(ramp), "PNG"), 8)
    assert array[..., 0].max() > 200 and array[..., 0].min() == 0  # not saturated at 255
    assert (array[..., 0] == array[..., 1]).all()  # gray stays gray


def test_animated_images_contribute_their_first_frame():
    frames = [Image.new("RGB", (8, 8), (0, 0, 255)), Image.new("RGB", (8, 8), (255, 0, 0))]
    gif = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    pixel = contract.load_image(gif, 4)[0, 0]
    assert pixel[2] > 200 and pixel[0] < 60


def full_decode(data: bytes, size: int) -> np.ndarray:
    """load_image's steps without the reduced-scale JPEG decoding."""
    image = contract.to_rgb(Image.open(io.BytesIO(data)))
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def smooth_photo(side: int) -> bytes:
    """A JPEG with gradients and a few shapes, like a photo's content at ``side`` px."""
    y, x = np.mgrid[0:side, 0:side] / side
    pixels = np.stack([x * 255, y * 255, (1 - x) * (1 - y) * 255], axis=-1).astype(np.uint8)
    pixels[side // 4 : side // 2, side // 4 : side // 2] = (250, 220, 30)
    return encoded(Image.fromarray(pixels), "JPEG", quality=90).getvalue()


def test_jpegs_below_four_times_the_input_size_decode_exactly_as_in_full():
    # Halving them would leave less than twice the input size. The dataset's photos are at
    # most 500 px: training input must not change.
    for side in (300, 500, 4 * 224 - 1):
        data = smooth_photo(side)
        assert np.array_equal(contract.load_image(io.BytesIO(data), 224), full_decode(data, 224))


def test_a_large_jpeg_decodes_at_reduced_scale_to_nearly_the_same_input():
    data = smooth_photo(2000)
    reduced = contract.load_image(io.BytesIO(data), 224).astype(int)
    full = full_decode(data, 224).astype(int)
    assert not np.array_equal(reduced, full)  # the reduced-scale path was taken
    assert np.abs(reduced - full).mean() < 2  # and it sees the same picture


def test_rule_labels_at_the_threshold_and_reports_the_chosen_probability():
    rule = contract.DecisionRule(("grass", "dandelion"), 0.6)
    assert rule.positive == "dandelion"
    assert rule.predict(np.array([0.59, 0.6, 0.61])).tolist() == [0, 1, 1]
    verdict = rule.verdict(0.55, 0.3)  # above 0.5 yet below the threshold: grass
    assert verdict["label"] == "grass"
    assert verdict["confidence"] == pytest.approx(0.45)
    assert verdict["probabilities"] == pytest.approx({"dandelion": 0.55, "grass": 0.45})
    assert verdict["neither"] is False and verdict["novelty"] == pytest.approx(0.3)


def test_a_photo_is_neither_class_only_beyond_the_novelty_threshold():
    rule = contract.DecisionRule(("grass", "dandelion"), 0.5)
    assert rule.neither(np.float32([0.2, 1.0, np.nextafter(np.float32(1), 2), 40])).tolist() == [
        False,
        False,
        True,
        True,
    ]
    verdict = rule.verdict(0.99, 7.5)
    assert verdict["neither"] is True and verdict["label"] == "dandelion"


def test_rule_decides_one_score_exactly_as_an_array_of_float32_scores():
    """The service sees Python floats, evaluate float32 arrays: both round alike."""
    rng = np.random.default_rng(0)
    # float32(0.7) is just below 0.7: compared in float64 it would be grass, in float32 dandelion.
    scores = np.append(rng.random(2000), 0.7).astype(np.float32)
    for threshold in (0.5, 0.7, float(scores[7]), float(np.nextafter(scores[7], 1))):
        rule = contract.DecisionRule(("grass", "dandelion"), threshold)
        one_by_one = [int(rule.predict(float(score))) for score in scores]
        assert one_by_one == rule.predict(scores).tolist()


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.1, 1.5])
def test_rule_rejects_a_threshold_that_cannot_separate(threshold):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        contract.DecisionRule(("grass", "dandelion"), threshold)


def test_model_card_round_trips_and_names_missing_metadata():
    card = contract.ModelCard(
        version="abc",
        model_sha256="0" * 64,
        engine="openvino",
        dvc_md5="0" * 32 + ".dir",
        classes=["grass", "dandelion"],
        threshold=0.6,
        image_size=224,
        serve={"max_upload_bytes": 1, "min_side": 1, "max_pixels": 1, "max_batch_files": 1},
        train_params={"seed": 42},
        test_metrics={"accuracy": 0.9},
    )
    assert contract.ModelCard.from_metadata(card.to_metadata()) == card
    assert card.rule == contract.DecisionRule(("grass", "dandelion"), 0.6)
    old = {key: value for key, value in card.to_metadata().items() if key != "threshold"}
    with pytest.raises(ValueError, match=r"lacks \['threshold'\].*dvc repro"):
        contract.ModelCard.from_metadata(old)
