"""The train↔serve contract: everything training, evaluation, packaging and serving must agree on.

- names: the model's name in BentoML and MLflow, its file, the per-photo predictions file;
- the metadata a packaged model carries (``ModelCard``), which is all the service reads;
- the model's two outputs per photo (``PROBABILITY``, ``NOVELTY`` columns) and the decision
  rule (``DecisionRule``): which class is positive, the threshold on its score, and "neither";
- image decoding (``load_image``): how any picture becomes the model's input.

Only NumPy and Pillow here: the service imports this module, and no stage module, so the
bento ships it and nothing else of the pipeline.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, ImageSequence

MODEL_NAME = "dandelion-vs-grass"  # BentoML model and bento, MLflow experiment and registered model
MODEL_FILE = "classifier.keras"  # inside the train stage's model directory
PREDICTIONS_FILE = "predictions.csv"  # evaluate's verdict on every test photo
WHITE = (255, 255, 255)
# The model's output per photo, shape (N, 2): P(classes[1]), and its novelty, the squared
# Mahalanobis distance of its backbone features from the training photos' in units of the
# threshold (pipeline/novelty.py): above 1, the photo is unlike anything the model was trained
# on, and probably neither class.
PROBABILITY, NOVELTY = 0, 1


@dataclass(frozen=True)
class DecisionRule:
    """A photo is ``classes[1]`` (the positive class) when its score reaches ``threshold``.

    Scores are compared as float32, the model's output type, so that evaluate (NumPy
    arrays) and the service (one float at a time) round the threshold identically.
    """

    classes: tuple[str, str]
    threshold: float

    def __post_init__(self):
        if len(self.classes) != 2:
            raise ValueError(f"a binary classifier needs 2 classes, not {list(self.classes)}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be strictly between 0 and 1, not {self.threshold}")

    @property
    def positive(self) -> str:
        return self.classes[1]

    def predict(self, scores) -> np.ndarray:
        """Class index (0 or 1) for each score = P(positive class)."""
        return (np.asarray(scores, dtype=np.float32) >= np.float32(self.threshold)).astype(int)

    @staticmethod
    def neither(novelty) -> np.ndarray:
        """Whether each photo is probably neither class: novelty above 1 (see NOVELTY)."""
        return np.asarray(novelty, dtype=np.float32) > np.float32(1.0)

    def verdict(self, score: float, novelty: float) -> dict:
        """The answer for one photo: label, its probability, both probabilities, and whether
        the photo is probably neither class (then the label is only the nearer class)."""
        label = self.classes[int(self.predict(score))]
        probabilities = {self.classes[1]: float(score), self.classes[0]: 1.0 - float(score)}
        return {
            "label": label,
            "confidence": probabilities[label],
            "probabilities": probabilities,
            "neither": bool(self.neither(novelty)),
            "novelty": float(novelty),
        }


@dataclass(frozen=True)
class ModelCard:
    """The metadata stored with a packaged model; the service reads nothing else.

    Everything here is a function of what Git and DVC track (no run ids, no timestamps), so
    the same inputs package into the same bytes.
    """

    version: str  # content-derived; also the bento's version
    model_sha256: str  # of MODEL_FILE; MLflow tags runs and registered versions with it
    engine: str  # serving/engines.py: which engine the shipped export is for
    dvc_md5: str  # DVC's hash of the export directory (what is served), as dvc.lock records it
    classes: list[str]
    threshold: float
    image_size: int
    serve: dict  # params.yaml `serve`: upload limits
    train_params: dict  # params.yaml `train`, with `features` (the backbone's) under its name
    test_metrics: dict  # evaluate's metrics of exactly this model

    @property
    def rule(self) -> DecisionRule:
        return DecisionRule(tuple(self.classes), self.threshold)

    def to_metadata(self) -> dict:
        return asdict(self)

    @classmethod
    def from_metadata(cls, metadata: dict) -> ModelCard:
        names = [field.name for field in fields(cls)]
        missing = [name for name in names if name not in metadata]
        if missing:
            raise ValueError(
                f"the packaged model's metadata lacks {missing}: it was packaged by an older "
                "version of this project; rebuild it with `dvc repro`"
            )
        return cls(**{name: metadata[name] for name in names})


def to_8bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit integer images (e.g. 16-bit PNG) scaled to 8 bits, not clipped."""
    if image.mode.startswith("I;16") or image.mode == "I":
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), "L")
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB version of any Pillow image; transparent areas become white."""
    image = ImageOps.exif_transpose(to_8bit(image))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: str | Path | BinaryIO | Image.Image, image_size: int) -> np.ndarray:
    """Decode ``source`` to a ``(image_size, image_size, 3)`` uint8 RGB array.

    Animated images (GIF, APNG, WebP) contribute their first frame.
    """
    image = source if isinstance(source, Image.Image) else Image.open(source)
    # A JPEG decodes at the smallest DCT scale (1/2, 1/4, 1/8) that still has twice the input
    # size: a phone photo decodes many times faster (docs/serving.md, *Faults and overload*),
    # and the resize below is what shrinks it further, as for any photo. No photo in the
    # dataset is large enough to be scaled, so training data is decoded exactly as before.
    image.draft(None, (2 * image_size, 2 * image_size))
    first_frame = next(ImageSequence.Iterator(image))
    rgb = to_rgb(first_frame).resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)
