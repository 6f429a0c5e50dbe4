"""``dandelion replay``: score a prediction log's kept photos again with any model.

The log (serving/prediction_log.py) is a directory or an ``s3://`` store; the model a bento
archive (``.bento``: its model card decides, as the service it packages would) or an export
directory (``data/export``: the decision rule, input size and upload limits come from
params.yaml, as evaluate and the package stage read them). Each kept photo is decoded exactly
as the service decodes an upload (serving/decoding.py) and scored by the same engine loader
(serving/engines.py), so replaying a log with the model that answered it agrees on every
photo. One CSV row per logged record; a record whose photo was not kept gets its row too,
with the replayed columns empty, and is counted and named in the summary.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.params import EvaluateParams, PreprocessParams, ServeParams, classes
from pipeline.stage import StageError
from serving.contract import MODEL_NAME, NOVELTY, PROBABILITY, DecisionRule, ModelCard
from serving.decoding import UploadLimits, decode_upload
from serving.engines import Scorer, load_engine
from serving.errors import Rejection
from serving.prediction_log import LogSource

COLUMNS = (
    "answer_id",
    "photo_sha256",
    "model_version",
    "role",
    "shadow",
    "label",
    "neither",
    "score",
    "replayed_label",
    "replayed_neither",
    "replayed_score",
    "agree",
    "note",
)
NO_PHOTO = "no photo kept"
LISTED = 20  # records without a photo the summary names; the CSV has them all
BENTO_MODEL_FILE = re.compile(rf"models/{re.escape(MODEL_NAME)}/[^/]+/([^/]+)")


class ReplayError(StageError):
    pass


@dataclass(frozen=True)
class ReplayModel:
    """A model to replay with: what decides, how photos are decoded for it, its engine."""

    name: str  # as the summary names it
    rule: DecisionRule
    image_size: int
    limits: UploadLimits
    score: Scorer


def card_limits(serve: Mapping) -> UploadLimits:
    return UploadLimits(serve["max_upload_bytes"], serve["min_side"], serve["max_pixels"])


@contextlib.contextmanager
def opened_model(path: Path, params: Path) -> Iterator[ReplayModel]:
    """The model of a bento archive or an export directory (its rule from ``params``)."""
    if path.is_dir():
        serve = ServeParams.load(params)
        yield ReplayModel(
            name=f"the export {path}",
            rule=DecisionRule(tuple(classes(params)), EvaluateParams.load(params).threshold),
            image_size=PreprocessParams.load(params).image_size,
            limits=card_limits(serve.to_dict()),
            score=load_engine(path),
        )
        return
    if not path.is_file():
        raise ReplayError(f"{path}: no such bento archive or export directory")
    with tempfile.TemporaryDirectory(prefix="dandelion-replay-") as scratch:
        card = extract_bento_model(path, Path(scratch))
        yield ReplayModel(
            name=f"the bento {path} ({MODEL_NAME}:{card.version})",
            rule=card.rule,
            image_size=card.image_size,
            limits=card_limits(card.serve),
            score=load_engine(scratch),
        )


def extract_bento_model(archive: Path, directory: Path) -> ModelCard:
    """Write the model files of a bento archive into ``directory``; its card."""
    try:
        with tarfile.open(archive) as tar:
            metadata = None
            for member in tar.getmembers():
                match = BENTO_MODEL_FILE.fullmatch(member.name)
                if not (match and member.isfile()):
                    continue
                data = tar.extractfile(member).read()
                if match[1] == "model.yaml":
                    if metadata is not None:
                        raise ReplayError(f"{archive} holds more than one {MODEL_NAME} model")
                    metadata = yaml.safe_load(data)["metadata"]
                else:  # a file name alone: nothing outside ``directory``
                    (directory / match[1]).write_bytes(data)
    except (tarfile.TarError, OSError, KeyError, TypeError, yaml.YAMLError) as error:
        raise ReplayError(f"{archive} is not a bento archive: {error}") from None
    if metadata is None:
        raise ReplayError(f"{archive} holds no {MODEL_NAME} model (models/{MODEL_NAME}/*/)")
    try:
        return ModelCard.from_metadata(metadata)
    except (TypeError, ValueError) as error:
        raise ReplayError(f"{archive}: {error}") from None


def replayed_answer(model: ReplayModel, photo: bytes) -> dict:
    """The model's answer for a photo, decoded and decided as the service does; Rejection if
    the service would refuse the photo."""
    image = decode_upload(photo, model.image_size, model.limits)
    outputs = model.score(image[None])[0]
    score = float(outputs[PROBABILITY])
    verdict = model.rule.verdict(score, float(outputs[NOVELTY]))
    return {"label": verdict["label"], "neither": verdict["neither"], "score": score}


def replay_rows(log: LogSource, model: ReplayModel) -> Iterator[dict]:
    """A row for each record of ``log``: as logged, and as ``model`` answers its photo."""
    answers: dict[str, dict | str] = {}  # by photo: a record per answer, a photo per answer
    for record in log.records():
        sha256 = record.get("photo_sha256")
        row = {
            "answer_id": record.get("answer_id"),
            "photo_sha256": sha256,
            **{key: record.get(key) for key in ("model_version", "role", "shadow")},
            **{key: record.get(key) for key in ("label", "neither", "score")},
        }
        if sha256 not in answers:
            photo = log.photo(sha256)
            try:
                answers[sha256] = NO_PHOTO if photo is None else replayed_answer(model, photo)
            except Rejection as rejection:  # kept, and refused now: another model's limits
                answers[sha256] = f"refused: {rejection.message}"
        answer = answers[sha256]
        if isinstance(answer, str):
            yield {**row, "note": answer}
            continue
        agree = answer["label"] == record.get("label") and answer["neither"] == record.get(
            "neither"
        )
        yield {
            **row,
            **{f"replayed_{key}": value for key, value in answer.items()},
            "agree": agree,
            "note": "",
        }


def replay(
    source: str,
    model_path: Path,
    out: Path,
    params: Path = Path("params.yaml"),
    environ: Mapping[str, str] = os.environ,
) -> str:
    """Replay the log at ``source`` with the model at ``model_path``, rows into ``out``; the
    summary."""
    try:
        log = LogSource.open(source, environ)
    except (FileNotFoundError, ValueError) as error:
        raise ReplayError(str(error)) from None
    total, agreed, by_version = 0, 0, Counter()
    agreed_by_version, unreplayed = Counter(), []
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        with opened_model(model_path, params) as model:
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "w", newline="") as handle:
                writer = csv.DictWriter(handle, COLUMNS)
                writer.writeheader()
                for row in replay_rows(log, model):
                    writer.writerow(row)
                    total += 1
                    if row["note"]:
                        unreplayed.append(row)
                        continue
                    by_version[row["model_version"]] += 1
                    agreed_by_version[row["model_version"]] += row["agree"]
                    agreed += row["agree"]
    # An unreadable export, a damaged log line, a store that fails: said, not a traceback.
    except (OSError, ValueError, BotoCoreError, ClientError) as error:
        raise ReplayError(f"{source}: {error}") from None
    replayed = total - len(unreplayed)
    lines = [
        f"replay: {total} records of {log}, replayed with {model.name}, rows in {out}",
        *(
            f"  logged by {version}: {agreed_by_version[version]}/{count} agree"
            for version, count in sorted(by_version.items())
        ),
    ]
    without = [row for row in unreplayed if row["note"] == NO_PHOTO]
    for row in unreplayed[:LISTED]:
        lines.append(f"  not replayed: answer {row['answer_id']}: {row['note']}")
    if len(unreplayed) > LISTED:
        lines.append(f"  ... and {len(unreplayed) - LISTED} more (their note in {out})")
    agreement = f"{agreed / replayed:.4f}" if replayed else "n/a"
    lines.append(
        f"replayed {replayed}, agreement {agreement} ({agreed}/{replayed}), "
        f"{len(without)} without a photo"
        + (f", {len(unreplayed) - len(without)} refused" if len(unreplayed) > len(without) else "")
    )
    return "\n".join(lines)
