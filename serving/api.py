"""The API's description: its answers, its errors, its uploads, and its two OpenAPI documents.

/openapi.json is FastAPI's document of the service's routes, which Swagger UI at /docs
shows; /docs.json is BentoML's, which adds the typed endpoints, health and metrics. Both carry
this project's title, description and contact, and the served model's version and upload
limits: ``ApiDocuments`` makes them for the card a front serves, when it starts.
"""

from __future__ import annotations

from typing import Any

import bentoml
from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

from serving.contract import ModelCard
from serving.decoding import SentFile, accepted_formats
from serving.errors import FEEDBACK_REJECTIONS, PREDICTION_ONLY, REJECTIONS, handle_errors
from serving.settings import ANSWER_DECIMALS, FEEDBACK_ROUTE, MAX_COMMENT_CHARS, NEITHER_LABEL
from serving.uploads import Upload

# /openapi.json's and /docs.json's info: a few lines, not the README; the project's contact.
API_TITLE = "Dandelion vs grass"
API_DESCRIPTION = (
    "Classifies a photo as dandelion or grass, and says when it is probably neither. "
    "The model and its decision threshold are exactly those whose test metrics "
    "/model-info reports, built by the project's DVC pipeline. "
    'Errors are JSON: `{"error": "..."}`.'
)
API_CONTACT = {"name": "Dandelion vs grass maintainers"}
# The Swagger UI assets BentoML ships (and serves at /static_content), so /docs needs no CDN.
SWAGGER_ASSETS = "./static_content"


ROUNDED = (
    f"rounded to {ANSWER_DECIMALS} decimals, after the decision (which uses the unrounded "
    "value, as the pipeline's evaluate stage does)"
)


class Prediction(BaseModel):
    label: str = Field(description="the class whose probability reaches the model's threshold")
    confidence: float = Field(description=f"the probability of `label`, {ROUNDED}")
    probabilities: dict[str, float] = Field(
        description=f"the probability of each class, {ROUNDED}; they sum to 1"
    )
    neither: bool = Field(description="the photo is probably neither class (`novelty` > 1)")
    novelty: float = Field(
        description=f"how unlike the training photos the photo is (1: limit), {ROUNDED}"
    )
    model_version: str = Field(description="the served model's version (/model-info)")
    answer_id: str = Field(
        description="this answer's own id (a random UUID), which feedback quotes (POST /feedback)"
    )


class FilePrediction(Prediction):
    filename: str = Field(description="the file's name, as sent")


class BatchPredictions(BaseModel):
    predictions: list[FilePrediction] = Field(description="one per file, in the order sent")


class ModelInfo(BaseModel):
    model: str = Field(description="the model's BentoML tag")
    git_revision: str = Field(description="the commit deployed (GIT_REVISION), or 'unknown'")
    git_dirty: bool | None = Field(
        description="tracked files differed from that commit when it was deployed "
        "(GIT_REVISION ends in '-dirty', as `git describe --dirty` prints it); null if unknown"
    )
    version: str
    model_sha256: str
    engine: str
    dvc_md5: str
    classes: list[str]
    threshold: float
    image_size: int
    train_params: dict[str, Any] = Field(description="params.yaml `train`, with `features`")
    test_metrics: dict[str, float]
    max_batch_files: int = Field(description="the most files /predict_batch takes at once")


class ErrorAnswer(BaseModel):
    error: str


class FeedbackReceipt(BaseModel):
    photo_sha256: str = Field(description="the photo's sha256: the feedback's key in the store")
    label: str = Field(description="the label given")
    answer_id: str | None = Field(description="the answer corrected, as quoted; null if none")


def rounded(verdict: dict, positive: str) -> dict:
    """``verdict`` (DecisionRule.verdict) as answered: its numbers to ANSWER_DECIMALS decimals.

    Only ever after the decision: a score of 0.49996 under a 0.5 threshold is the negative
    class, though it reads 0.5. The other class's probability is 1 minus the rounded one of
    ``positive``, so the two always sum to 1 (each rounded on its own, both could round up at
    a tie, and sum to 1.0001).
    """
    score = round(verdict["probabilities"][positive], ANSWER_DECIMALS)
    probabilities = {
        name: score if name == positive else round(1 - score, ANSWER_DECIMALS)
        for name in verdict["probabilities"]
    }
    return {
        **verdict,
        "confidence": probabilities[verdict["label"]],
        "probabilities": probabilities,
        "novelty": round(verdict["novelty"], ANSWER_DECIMALS),
    }


def batch_answer(files: list[SentFile], answers: list[dict]) -> dict:
    """A BatchPredictions: each file's answer, with its name as sent."""
    return {
        "predictions": [
            {"filename": file.filename, **answer}
            for file, answer in zip(files, answers, strict=True)
        ]
    }


def front_app() -> FastAPI:
    """The FastAPI app of the front's routes, every error answered as JSON. Its OpenAPI
    document and Swagger UI are the front's own routes, made for the card it serves."""
    app = FastAPI(
        title=API_TITLE,
        description=API_DESCRIPTION,
        contact=API_CONTACT,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    handle_errors(app)
    return app


def instance_in_event_loop(views: type) -> None:
    """BentoML hands each class-view route of ``views`` its service instance through a
    dependency on ``bentoml.get_current_service``, set as the default of each view's first
    parameter; FastAPI runs a plain function dependency in a worker thread, one thread hop per
    request for a module global. The default becomes ``current_service``, a coroutine, which
    runs in the event loop; FastAPI reads it when it builds the routes, at their first request.
    (Not an app's dependency override: FastAPI rebuilds an overridden dependency for every
    request.)"""
    for view in vars(views).values():
        signature = getattr(view, "__signature__", None)
        if signature is None or not signature.parameters:
            continue
        first, *others = signature.parameters.values()
        if getattr(first.default, "dependency", None) is bentoml.get_current_service:
            first = first.replace(default=Depends(current_service))
            view.__signature__ = signature.replace(parameters=[first, *others])


async def current_service() -> Any:
    return bentoml.get_current_service()


def error_responses(feedback: bool = False) -> dict[int, dict]:
    """OpenAPI's error answers of the prediction endpoints (or ``feedback``'s): each status
    with its reasons."""
    excluded = PREDICTION_ONLY if feedback else FEEDBACK_REJECTIONS
    reasons: dict[int, list[str]] = {}
    for reason, status in REJECTIONS.items():
        if reason not in excluded:
            reasons.setdefault(status, []).append(reason)
    return {
        status: {"model": ErrorAnswer, "description": ", ".join(names)}
        for status, names in sorted(reasons.items())
    }


def multipart_upload(upload: Upload, description: str) -> dict:
    """The OpenAPI request body of ``upload``: up to ``most`` files in its multipart field.

    Declared by hand rather than with FastAPI's typed `UploadFile` parameters: those make
    FastAPI read and parse the whole body before the handler runs, which would lose the checks
    made while the body arrives (pace 408, size 413, admission and drain 503; docs/serving.md).
    """
    file = {"type": "string", "format": "binary"}
    most = upload.most
    schema = (
        file if most == 1 else {"type": "array", "items": file, "minItems": 1, "maxItems": most}
    )
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [upload.field],
                    "properties": {upload.field: {**schema, "description": description}},
                }
            }
        },
    }


def with_feedback_fields(body: dict, labels: list[str]) -> None:
    """Add a feedback's text fields (serving/feedback.py) to its multipart ``body``."""
    schema = body["content"]["multipart/form-data"]["schema"]
    schema["required"].append("label")
    schema["properties"].update(
        {
            "label": {"type": "string", "enum": labels, "description": "the right label"},
            "answer_id": {
                "type": "string",
                "format": "uuid",
                "description": "the `answer_id` of the answer this corrects or confirms",
            },
            "model_version": {
                "type": "string",
                "description": "the `model_version` of that answer",
            },
            "comment": {
                "type": "string",
                "maxLength": MAX_COMMENT_CHARS,
                "description": "a note for the reviewer",
            },
        }
    )


class ApiDocuments:
    """The OpenAPI documents of a front serving ``card``, whose FastAPI routes take
    ``uploads`` (path -> Upload), made when asked."""

    def __init__(self, card: ModelCard, uploads: dict[str, Upload]) -> None:
        self.card = card
        self.uploads = uploads
        self.limits = (
            f"a {accepted_formats()} photo; at most {card.serve['max_upload_bytes']} "
            f"bytes, each side at least {card.serve['min_side']} px"
        )

    def info(self) -> dict:
        return {
            "title": API_TITLE,
            "description": API_DESCRIPTION,
            "contact": API_CONTACT,
            "version": self.card.version,
        }

    def with_uploads(self, document: dict) -> dict:
        for path, upload in self.uploads.items():
            body = multipart_upload(upload, self.limits)
            if path == FEEDBACK_ROUTE:
                with_feedback_fields(body, [*self.card.classes, NEITHER_LABEL])
            document["paths"][path]["post"]["requestBody"] = body
        return document

    def openapi(self, app: FastAPI) -> dict:
        """FastAPI's document of ``app``'s routes (/openapi.json)."""
        document = get_openapi(
            openapi_version=app.openapi_version, routes=app.routes, **self.info()
        )
        return self.with_uploads(document)

    def bentoml(self, service) -> dict:
        """BentoML's document of ``service`` (/docs.json), with this project's info."""
        document = service.openapi_spec.asdict()
        document["info"].update(self.info())
        return self.with_uploads(document)
