"""BentoML service: the champion dandelion-vs-grass classifier over HTTP.

The HTTP front (uploads, JSON answers, the page, the API's description) runs the model as its
engine requires (serving/engines.py SERVICES; the package stage picks one per bento):
``DandelionService`` runs the engine (OpenVINO) in its own process, which batching would not
speed up; ``BatchingDandelionService`` calls ``Classifier``, a model service that batches
concurrent requests for the engine (Keras), since BentoML batches only between services.

Each prediction endpoint exists twice, with the same answers and errors: a FastAPI route that
reads the multipart body itself (POST /predict, /predict_batch), and a typed BentoML endpoint
for BentoML's clients (/api/...). Everything model-specific comes from the packaged model's
card (serving/contract.py), read when the service starts: it decides exactly as the pipeline's
evaluate stage did. Importing this module reads no store and starts nothing.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path

import anyio
import bentoml
import numpy as np
from fastapi import Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.datastructures import FormData

from serving.admission import Admission
from serving.api import (
    API_TITLE,
    SWAGGER_ASSETS,
    ApiDocuments,
    BatchPredictions,
    FeedbackReceipt,
    ModelInfo,
    Prediction,
    batch_answer,
    error_responses,
    front_app,
    rounded,
)
from serving.contract import MODEL_NAME, NOVELTY, PROBABILITY, ModelCard
from serving.decoding import SentFile, decoded
from serving.errors import REJECTIONS, JsonErrors, Rejection, rejection_response
from serving.feedback import FeedbackDesk
from serving.gate import TypedUploads, sent_files
from serving.metrics import model_metrics, sample_process
from serving.model import ServedModel, check_service, served_info, serving_scorer
from serving.page import page_html
from serving.resources import inference_limiter, return_freed_memory_to_the_system
from serving.settings import (
    FEEDBACK_ROUTE,
    MAX_BATCH_SIZE,
    MAX_LATENCY_MS,
    MODEL_SERVICE_CONNECTION,
    READY_PROBE_SECONDS,
    SERVICE_NAME,
    TRAFFIC,
    TYPED_FEEDBACK_ROUTE,
    TYPED_PREDICT_BATCH_ROUTE,
    TYPED_PREDICT_ROUTE,
)
from serving.uploads import Pace, Upload, card_uploads

logger = logging.getLogger("bentoml.service.dandelion")


@bentoml.service(workers=1, traffic=TRAFFIC, runner_connection=MODEL_SERVICE_CONNECTION)
class Classifier:
    bento_model = bentoml.models.BentoModel(MODEL_NAME)

    def __init__(self) -> None:
        sample_process("model")
        card = ModelCard.from_metadata(self.bento_model.info.metadata)
        # Warmed up: otherwise the batcher's latency estimate starts out far too high and
        # it sheds requests.
        self.score = serving_scorer(self.bento_model.path, card.image_size)

    # Adaptive batching, the reason this service exists (serving/engines.py BATCHING): the
    # batcher groups concurrent requests; max_latency_ms bounds how long one may wait.
    @bentoml.api(
        batchable=True, batch_dim=0, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS
    )
    def classify_batched(self, images: np.ndarray) -> np.ndarray:
        """The model's outputs (contract: PROBABILITY, NOVELTY) for each uint8 image."""
        return self.score(images)


app = front_app()  # the routes of the front classes below
ERRORS = error_responses()
FEEDBACK_ERRORS = error_responses(feedback=True)


def front_service(inner: type) -> bentoml.Service:
    """``inner`` as an HTTP front, named SERVICE_NAME: ``app``'s routes (defined by the first
    front class), every error as JSON, the typed routes gated as the FastAPI ones."""
    service = bentoml.service(name=SERVICE_NAME, workers=1, traffic=TRAFFIC)(inner)
    service = bentoml.asgi_app(app, path="/")(service)
    service.add_asgi_middleware(JsonErrors)
    service.add_asgi_middleware(TypedUploads)
    return service


@front_service
class DandelionService:
    bento_model = bentoml.models.BentoModel(MODEL_NAME)
    batching = False  # the engine runs in this process

    def __init__(self, model: ServedModel | None = None) -> None:
        if model is None:  # as BentoML starts it: the bento's one model, from its store
            model = ServedModel.stored(type(self).bento_model, self.batching)
        check_service(model.card, self.batching)
        self.model, card = model, model.card
        self.single, self.batch = card_uploads(card)
        self.typed_uploads = {
            TYPED_PREDICT_ROUTE: self.single,
            TYPED_PREDICT_BATCH_ROUTE: self.batch,
        }
        self.documents = ApiDocuments(
            card,
            {"/predict": self.single, "/predict_batch": self.batch, FEEDBACK_ROUTE: self.single},
        )
        self.info = served_info(model)
        self.page_html = page_html()
        self.pace = Pace()
        self.admission = Admission()
        return_freed_memory_to_the_system()
        self.metrics = model_metrics()
        self.metrics.describe(card, self.info["git_revision"], REJECTIONS)
        sample_process("front")
        self.feedback = FeedbackDesk(card, self.single, self.admitted_scores)
        self.typed_uploads[TYPED_FEEDBACK_ROUTE] = self.feedback.upload
        self.feedback.start()  # stores what a previous run left spooled, then new feedback
        # After the drain, the feedback flusher's last pass; what it cannot store stays spooled.
        self.admission.drain_on_sigterm(then=self.feedback.stop)

    async def __is_ready__(self) -> bool:
        """/readyz: 200 once constructed (the model is loaded and warm); 503 (at once) from
        SIGTERM on, while the open requests finish."""
        return not self.admission.draining

    @app.get("/", response_class=HTMLResponse)
    def page(self) -> str:
        return self.page_html

    @app.get("/docs", include_in_schema=False)
    def docs(self) -> HTMLResponse:
        """Swagger UI on /openapi.json, from the assets BentoML ships: nothing from the web."""
        return get_swagger_ui_html(
            openapi_url="./openapi.json",
            title=f"{API_TITLE}: API",
            swagger_js_url=f"{SWAGGER_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{SWAGGER_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{SWAGGER_ASSETS}/favicon-light-32x32.png",
        )

    @app.get("/openapi.json", include_in_schema=False)
    def openapi(self) -> JSONResponse:
        return JSONResponse(self.documents.openapi(app))

    @app.get("/docs.json", include_in_schema=False)
    def bentoml_openapi(self) -> JSONResponse:
        """BentoML's OpenAPI document (this API, its typed endpoints, health and metrics),
        with this service's description and contact instead of BentoML's."""
        return JSONResponse(self.documents.bentoml(self.bento_service))

    @app.get("/model-info")
    def model_info(self) -> ModelInfo:
        """The served model's card (params with their types from params.yaml, test metrics)
        and the Git revision deployed."""
        return self.info

    @app.post("/predict", name="predict", responses=ERRORS)
    async def predict_form(self, request: Request) -> Prediction:
        """Classify one photo, sent in the multipart field `image`."""
        _, (answer,) = await self.read_and_classify(request, self.single)
        return answer

    @app.post("/predict_batch", name="predict_batch", responses=ERRORS)
    async def predict_batch_form(self, request: Request) -> BatchPredictions:
        """Classify several photos, each in a multipart field `images`: one answer per file,
        in the order sent, or (if any file is bad) a 4xx naming it and no answers."""
        return batch_answer(*await self.read_and_classify(request, self.batch))

    @app.post(FEEDBACK_ROUTE, name="feedback", status_code=202, responses=FEEDBACK_ERRORS)
    async def give_feedback(self, request: Request) -> FeedbackReceipt:
        """Say what a photo really shows: the photo in the multipart field `image`, its
        `label` (a class, or `neither`), optionally the `answer_id` and `model_version` of the
        answer it corrects and a `comment`. 202 once it is safely on disk, for review."""
        return await self.feedback.receive(request, self.admission, self.pace)

    @bentoml.api(route=TYPED_PREDICT_ROUTE)
    async def predict(self, image: Path) -> Prediction:
        """Classify one photo: `POST /predict`, for BentoML's clients."""
        try:
            (answer,) = await self.classify(sent_files([image]))
        except Rejection as rejection:  # as is: BentoML would reshape a raised error
            return rejection_response(rejection)
        return Prediction(**answer)

    @bentoml.api(route=TYPED_PREDICT_BATCH_ROUTE)
    async def predict_batch(self, images: list[Path]) -> BatchPredictions:
        """Classify several photos: `POST /predict_batch`, for BentoML's clients."""
        files = sent_files(images)
        try:
            return BatchPredictions(**batch_answer(files, await self.classify(files)))
        except Rejection as rejection:
            return rejection_response(rejection)

    # Named apart from the FastAPI route's `give_feedback` and from `self.feedback`, the desk.
    @bentoml.api(route=TYPED_FEEDBACK_ROUTE)
    async def send_feedback(
        self,
        image: Path,
        label: str | None = None,  # optional here so that a missing one gets our 422
        answer_id: str | None = None,
        model_version: str | None = None,
        comment: str | None = None,
    ) -> FeedbackReceipt:
        """Say what a photo really shows: `POST /feedback`, for BentoML's clients."""
        given = {
            "label": label,
            "answer_id": answer_id,
            "model_version": model_version,
            "comment": comment,
        }
        form = FormData([(name, value) for name, value in given.items() if value is not None])
        (file,) = sent_files([image])
        try:
            receipt = await self.feedback.take(form, file.filename, await file.read())
        except Rejection as rejection:  # as is: BentoML would reshape a raised error
            return rejection_response(rejection)
        return JSONResponse(receipt, status_code=202)

    async def read_and_classify(self, request: Request, upload: Upload) -> tuple[list, list]:
        """The files ``upload`` reads from ``request`` and their answers, or Rejection."""
        async with (
            self.admission.accepted(request.headers, upload),
            upload.read(request, self.pace) as files,
        ):
            return files, await self.classify(files)

    async def classify(self, files: list[SentFile]) -> list[dict]:
        """An answer for each file (all or none), once admitted."""
        async with self.admission.admitted():
            images = await decoded(files, self.model.card.image_size, self.single.limits)
            outputs = await self.scores(np.stack(images))
        return [self.answer(row) for row in outputs]

    async def admitted_scores(self, images: np.ndarray) -> np.ndarray:
        """``scores`` in one of the predictions' places: a feedback's scoring adds no load past
        the service's capacity (at capacity it is refused, and the feedback kept unscored)."""
        async with self.admission.admitted():
            return await self.scores(images)

    async def scores(self, images: np.ndarray) -> np.ndarray:
        # In a worker thread, so the event loop goes on reading other requests.
        return await anyio.to_thread.run_sync(self.model.score, images, limiter=inference_limiter())

    def answer(self, outputs: np.ndarray) -> dict:
        card = self.model.card
        verdict = card.rule.verdict(float(outputs[PROBABILITY]), float(outputs[NOVELTY]))
        self.metrics.count_answer(verdict)
        return {
            **rounded(verdict, card.rule.positive),
            "model_version": card.version,
            # Random: an id that says nothing of the photo, the time or the order of answers.
            "answer_id": str(uuid.uuid4()),
        }


@front_service
class BatchingDandelionService(DandelionService.inner):
    """The front for engines that batch: the model runs in ``Classifier``."""

    classifier = bentoml.depends(Classifier)
    batching = True

    async def __is_ready__(self) -> bool:
        """/readyz: 200 once the model service answers, 503 (at once) until then and from
        SIGTERM on. Bounded: while the model service starts, its socket may not answer."""
        if self.admission.draining:
            return False
        try:
            return await asyncio.wait_for(
                self.classifier.is_ready(timeout=READY_PROBE_SECONDS), READY_PROBE_SECONDS
            )
        except Exception:  # not listening yet, timed out, restarting: not ready
            return False

    async def scores(self, images: np.ndarray) -> np.ndarray:
        # One retry, as a defence: classifying is idempotent, so asking again is safe. Every
        # retry is counted on /metrics (classifier_model_call_retries_total); it should stay 0.
        for attempt in (1, 2):
            if attempt > 1:
                self.metrics.count_retry()
            try:
                return await self.classifier.to_async.classify_batched(images)
            except Exception as exc:  # the model service is overloaded, restarting or down
                logger.warning("model service call %d failed: %r", attempt, exc)
                error = exc
        raise Rejection("model_unavailable", f"the model is unavailable, retry shortly ({error})")
