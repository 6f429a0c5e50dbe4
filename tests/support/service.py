"""The served model: its photos, what evaluate decided for them, `bentoml serve` of a bento, and
the example answers the docs show."""

from __future__ import annotations

import contextlib
import csv
import json
import re
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests

from pipeline.shards import SplitPhotos
from pipeline.splits import TEST, read_split
from serving.settings import ANSWER_DECIMALS
from tests.support.http import free_port
from tests.support.paths import (
    DATASET_MIRROR,
    EVALUATE_METRICS,
    EVALUATE_PREDICTIONS,
    PIPELINE_PATHS,
    REPO_ROOT,
)
from tests.support.processes import running_server


def own_metrics_home(store_home: Path, home: Path) -> Path:
    """A BentoML home at ``home`` that serves ``store_home``'s bentos and models but keeps its
    own metrics: every `bentoml serve` empties its home's prometheus_multiproc_dir when it
    starts, which freezes the /metrics of a server already running on the same home."""
    home.mkdir(parents=True, exist_ok=True)
    for store in ("bentos", "models"):
        (home / store).symlink_to(store_home / store, target_is_directory=True)
    return home


def split_photos(workspace: Path) -> list[tuple[str, str]]:
    """(label, path in the shared mirror) of every photo in the pipeline's test split."""
    with open(workspace / PIPELINE_PATHS["split_csv"], newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] == "test"]
    return [
        (row["label"], str(DATASET_MIRROR / "data" / row["label"] / row["path"].split("/")[-1]))
        for row in rows
    ]


def split_photo_bytes(workspace: Path, split: str = TEST) -> list[tuple[str, bytes]]:
    """(label, bytes) of every photo in the pipeline's ``split`` of ``workspace``, read as the
    stages read them: data/raw's photos from its tar shards (pipeline/shards.py)."""
    photos = SplitPhotos(PIPELINE_PATHS["raw_dir"], workspace)
    rows = read_split(workspace / PIPELINE_PATHS["split_csv"])
    return [(row.label, photos.read(row.path)) for row in rows if row.split == split]


@dataclass(frozen=True)
class Prediction:
    """One row of evaluate's predictions file, with the photo's path in the shared mirror."""

    photo: str
    label: str
    predicted: str
    score: float
    novelty: float


def evaluated_predictions(workspace: Path) -> list[Prediction]:
    """What evaluate decided for every test photo (data/raw/<label>/<file> -> the mirror)."""
    with open(workspace / EVALUATE_PREDICTIONS, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [
        Prediction(
            str(DATASET_MIRROR / "data" / Path(row["path"]).relative_to(PIPELINE_PATHS["raw_dir"])),
            row["label"],
            row["predicted"],
            float(row["score"]),
            float(row["novelty"]),
        )
        for row in rows
    ]


@dataclass(frozen=True)
class RunningService:
    url: str
    metrics: dict  # what evaluate reported (test split) for the served model
    workspace: Path


@contextlib.contextmanager
def serving(bento_tag: str, workspace: Path, env: dict, log_dir: Path) -> Iterator[RunningService]:
    """`bentoml serve bento_tag` on a free loopback port, for the model ``workspace`` evaluated."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "bentoml", "serve", bento_tag]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    with running_server(command, url, log_dir / "serve.log", env=env):
        metrics = json.loads((workspace / EVALUATE_METRICS).read_text())["test"]
        yield RunningService(url, metrics, workspace)


def served_answers(url: str, photos: list[str], workers: int = 8) -> list[dict]:
    """`POST /predict` of every photo (bounded: one request each), the JSON answers in order."""

    def predict(photo: str) -> dict:
        with open(photo, "rb") as handle:
            response = requests.post(f"{url}/predict", files={"image": handle}, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(predict, photos))


# The most a number an answer shows (rounded to ANSWER_DECIMALS) differs from the one the
# service decided on and counted in its metrics.
ROUNDING = 0.5 * 10**-ANSWER_DECIMALS

# The pages whose example answer of /predict (their one ```json block) is a served answer.
EXAMPLE_ANSWER_PAGES = ("README.md", "docs/serving.md")


def example_answer(page: str) -> str:
    """The JSON text of ``page``'s example answer."""
    blocks = re.findall(r"```json\n(.*?)\n```", (REPO_ROOT / page).read_text(), re.DOTALL)
    assert len(blocks) == 1, f"{page}: {len(blocks)} JSON examples"
    return blocks[0]


def answer_shape(text: str):
    """A JSON answer's keys, recursively, and each value's type; each number as how it is
    written: plain decimals with at most ANSWER_DECIMALS places, or else its literal."""
    plain = re.compile(rf"-?\d+\.\d{{1,{ANSWER_DECIMALS}}}")

    def number(literal: str) -> tuple[str, str]:
        return "number", "plain decimal" if plain.fullmatch(literal) else literal

    def shape(value):
        if isinstance(value, dict):
            return {key: shape(item) for key, item in value.items()}
        if isinstance(value, list):
            return [shape(item) for item in value]
        return value if isinstance(value, tuple) else type(value).__name__

    return shape(json.loads(text, parse_float=number, parse_int=number))


def without_ids(answer: dict) -> dict:
    """An answer (or a batch's) without its answer_id(s), which are new for every answer."""
    if "predictions" in answer:
        return {**answer, "predictions": [without_ids(p) for p in answer["predictions"]]}
    return {key: value for key, value in answer.items() if key != "answer_id"}
