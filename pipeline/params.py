"""``params.yaml``, the single home of every tunable, read one typed section at a time.

Each section is a frozen dataclass whose fields are that section's keys: ``TrainParams.load()``
reads ``train``. A missing, unknown (misspelt) or mistyped key is a ``ParamsError`` that names
it, before any work starts. dvc.yaml's declared paths are read here too (``pipeline_paths``).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import ClassVar, Self

import yaml

from pipeline.stage import StageError

PARAMS_FILE = "params.yaml"


class ParamsError(StageError, ValueError):
    """params.yaml does not hold what a stage reads; the message names the key."""


def read_params_file(path: Path | str = PARAMS_FILE) -> dict:
    with open(path) as handle:
        return yaml.safe_load(handle)


def classes(path: Path | str = PARAMS_FILE) -> list[str]:
    """The class names; index 1 is the positive class."""
    names = read_params_file(path).get("classes")
    if not (isinstance(names, list) and len(names) == 2 and all(isinstance(n, str) for n in names)):
        raise ParamsError(f"{path}: classes must be a list of two names, not {names!r}")
    return names


def _accepts(annotation, value) -> bool:
    """Whether ``value`` (as YAML loaded it) has the field's declared type."""
    if isinstance(annotation, types.GenericAlias):  # list[str]
        (item,) = typing.get_args(annotation)
        return isinstance(value, list) and all(_accepts(item, v) for v in value)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


class Section:
    """A section of params.yaml. Each subclass is a frozen dataclass whose fields are the
    section's keys; its ``name`` is the class name without ``Params``, in lower case."""

    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # A section nested in another names itself with its path (``promote.live``).
        cls.name = cls.__dict__.get("name") or cls.__name__.removesuffix("Params").lower()
        dataclasses.dataclass(frozen=True)(cls)

    @classmethod
    def from_dict(cls, values: dict, where: str = PARAMS_FILE) -> Self:
        if not isinstance(values, dict):
            raise ParamsError(f"{where}: {cls.name} must be a mapping of parameters")
        fields = {field.name: field for field in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        for key in values:
            if key not in fields:
                close = difflib.get_close_matches(str(key), fields, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ParamsError(f"{where}: {cls.name}.{key} is not a parameter{hint}")
        values = dict(values)
        for key, field in fields.items():
            if key not in values:
                if field.default is dataclasses.MISSING:
                    raise ParamsError(f"{where}: {cls.name}.{key} is missing")
            elif isinstance(hints[key], type) and issubclass(hints[key], Section):
                values[key] = hints[key].from_dict(values[key], where)
            elif not _accepts(hints[key], values[key]):
                expected = getattr(hints[key], "__name__", str(hints[key]))
                raise ParamsError(
                    f"{where}: {cls.name}.{key} must be {expected}, not {values[key]!r}"
                )
        try:
            return cls(**values)
        except ParamsError as error:  # a value out of its range (__post_init__)
            raise ParamsError(f"{where}: {error}") from None

    @classmethod
    def load(cls, path: Path | str = PARAMS_FILE) -> Self:
        return cls.from_dict(read_params_file(path).get(cls.name), str(path))

    def to_dict(self) -> dict:
        """The section as params.yaml holds it (lists stay lists)."""
        return dataclasses.asdict(self)


class DownloadParams(Section):
    """Where the photos come from, and how hard to try (stages/download.py)."""

    base_url: str
    min_per_class: int
    workers: int
    timeout_seconds: float
    retries: int
    backoff_seconds: float
    shard_photos: int  # photos per tar shard of the raw directory (pipeline/shards.py)

    def __post_init__(self) -> None:
        if self.shard_photos < 1:
            raise ParamsError(f"download.shard_photos must be at least 1, not {self.shard_photos}")


class SplitParams(Section):
    """The stratified split of the photos (stages/split.py)."""

    seed: int
    val_ratio: float
    test_ratio: float

    def __post_init__(self) -> None:
        val, test = self.val_ratio, self.test_ratio
        if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
            raise ParamsError(
                f"split ratios must be in [0, 1) and leave room for training "
                f"(val_ratio={val}, test_ratio={test})"
            )


class PreprocessParams(Section):
    """The model's input size, in pixels a side."""

    image_size: int


class FeaturesParams(Section):
    """The frozen backbone and the views of each photo it computes features of."""

    seed: int
    weights: str
    batch_size: int
    augment_copies: int
    novelty_layers: list[str]


class TrainParams(Section):
    """The head, its early stopping, optional fine-tuning and the "neither" threshold."""

    seed: int
    batch_size: int
    epochs: int
    patience: int
    learning_rate: float
    dropout: float
    label_smoothing: float
    neither_quantile: float
    fine_tune_layers: int
    fine_tune_epochs: int
    fine_tune_learning_rate: float


class CrossvalParams(Section):
    """The opt-in cross-validation of training recipes, and the label-noise report."""

    folds: int
    seed: int
    recipes: list[str]
    label_smoothing: float
    fine_tune_layers: int
    fine_tune_epochs: int
    fine_tune_learning_rate: float
    noise_recipe: str
    noise_confidence: float


class QuantizeParams(Section):
    """The calibration photos of the ``openvino-int8`` export (pipeline/quantize.py)."""

    calibration_photos: int  # drawn from the train split, never val or test
    seed: int

    def __post_init__(self) -> None:
        if self.calibration_photos < 1:
            raise ParamsError(
                f"quantize.calibration_photos must be at least 1, not {self.calibration_photos}"
            )


class EvaluateParams(Section):
    """The decision threshold the bento carries."""

    threshold: float

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ParamsError(f"evaluate.threshold must be between 0 and 1, not {self.threshold}")


class ServeParams(Section):
    """The serving engine and upload limits, carried by the bento's model card."""

    engine: str
    max_upload_bytes: int
    min_side: int
    max_pixels: int
    max_batch_files: int


# A Prometheus duration (https://prometheus.io/docs/prometheus/latest/querying/basics/): units
# from the largest to the smallest, each at most once, as PromQL's range selectors take it.
DURATION_UNITS = {"y": 31536000, "w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1, "ms": 0.001}
_DURATION = re.compile("".join(rf"(?:(\d+){unit})?" for unit in DURATION_UNITS) + "$")


def duration_seconds(text: str) -> float:
    """Seconds in the Prometheus duration ``text`` (``1d``, ``12h``, ``1h30m``); ParamsError
    when it is not one, or is zero."""
    match = _DURATION.match(text) if text else None
    counts = match.groups() if match else (None,) * len(DURATION_UNITS)
    seconds = sum(
        int(n) * DURATION_UNITS[u] for n, u in zip(counts, DURATION_UNITS, strict=True) if n
    )
    if not seconds:
        raise ParamsError(
            f"{text!r} is not a Prometheus duration longer than 0 (such as 1d, 12h or 1h30m)"
        )
    return seconds


class LivePromoteParams(Section):
    """The live-evidence gate of `dandelion promote --live` (pipeline/live_evidence.py)."""

    name: ClassVar[str] = "promote.live"
    window: str
    min_answers: int
    min_agreement: float
    latency_tolerance: float
    error_tolerance: float
    production_accuracy: bool
    min_feedback: int

    def __post_init__(self) -> None:
        try:
            duration_seconds(self.window)
        except ParamsError as error:
            raise ParamsError(f"{self.name}.window: {error}") from None
        for key in ("min_answers", "min_feedback"):
            if getattr(self, key) < 1:
                raise ParamsError(f"{self.name}.{key} must be at least 1, not {getattr(self, key)}")
        for key in ("min_agreement", "error_tolerance"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ParamsError(
                    f"{self.name}.{key} is a share: between 0 and 1, not {getattr(self, key)}"
                )
        if self.latency_tolerance < 0:
            raise ParamsError(
                f"{self.name}.latency_tolerance must be 0 or more, not {self.latency_tolerance}"
            )


class PromoteParams(Section):
    """The champion gate of `dandelion promote`, and its live-evidence gate (``live``)."""

    metric: str
    min_improvement: float
    live: LivePromoteParams


class PredictBatchParams(Section):
    """`dandelion predict-batch` (pipeline/batch_predict.py): how its work is cut up."""

    name: ClassVar[str] = "predict_batch"
    # Photos per chunk: each chunk's answers are written as soon as it is scored, so a run
    # that stops loses at most one chunk's work; on Ray, a chunk is what a worker takes.
    chunk_photos: int

    def __post_init__(self) -> None:
        if self.chunk_photos < 1:
            raise ParamsError(
                f"predict_batch.chunk_photos must be at least 1, not {self.chunk_photos}"
            )


def pipeline_paths(dvc_yaml: Path | str = "dvc.yaml") -> dict[str, str]:
    """The pipeline's paths (catalogue, model_dir, ...), declared once in dvc.yaml's ``vars``."""
    with open(dvc_yaml) as handle:
        return yaml.safe_load(handle)["vars"][0]
