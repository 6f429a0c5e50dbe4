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
import datetime
import hashlib
import logging
import os
import signal
import time
import uuid
from pathlib import Path
from typing import NoReturn

import anyio
import bentoml
import numpy as np
from bentoml._internal.context import server_context
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
    instance_in_event_loop,
    rounded,
)
from serving.auth import ApiKeys, RequireApiKey, with_security
from serving.challenger import (
    Challenger,
    ChallengerFailed,
    Shadow,
    ShadowPhoto,
    challenger_config,
)
from serving.contract import MODEL_NAME, NOVELTY, PROBABILITY, ModelCard
from serving.decoding import SentFile, decode_upload, decoded, held
from serving.errors import REJECTIONS, JsonErrors, Rejection, rejection_response
from serving.feedback import FeedbackDesk
from serving.gate import TypedUploads, sent_files
from serving.metrics import model_metrics, per_image, rollout_metrics, sample_process
from serving.model import ServedModel, bento_pinned, check_service, served_info, serving_scorer
from serving.page import page_html
from serving.prediction_log import PredictionLog
from serving.resources import inference_limiter, return_freed_memory_to_the_system
from serving.settings import (
    CHALLENGER,
    CHAMPION,
    CLIENT_KEY_HEADER,
    FEEDBACK_ROUTE,
    LARGE_UPLOAD_BYTES,
    MAX_BATCH_SIZE,
    MAX_LATENCY_MS,
    MODEL_SERVICE_CONNECTION,
    READY_PROBE_SECONDS,
    SERVED_MODE,
    SERVICE_NAME,
    SHADOW,
    SHADOW_OUTCOMES,
    TRAFFIC,
    TYPED_FEEDBACK_ROUTE,
    TYPED_PREDICT_BATCH_ROUTE,
    TYPED_PREDICT_ROUTE,
)
from serving.uploads import Pace, Upload, card_uploads

logger = logging.getLogger("bentoml.service.dandelion")


def answer_record(
    card: ModelCard,
    role: str,
    verdict: dict,
    seconds: float,
    shadowed: dict | None = None,
    **fields,
) -> dict:
    """The prediction log's record of one model's verdict (unrounded): a served answer's,
    with its ``answer_id``, ``photo_sha256`` and ``endpoint`` in ``fields``, or a shadow's
    of the champion's answer ``shadowed`` (whose id, photo and endpoint it takes)."""
    if shadowed is not None:
        fields = {key: shadowed[key] for key in ("answer_id", "photo_sha256", "endpoint")}
    return {
        "time": datetime.datetime.now(datetime.UTC).isoformat(),
        "answer_id": fields["answer_id"],
        "photo_sha256": fields["photo_sha256"],
        "model_version": card.version,
        "role": role,
        "shadow": shadowed is not None,
        "label": verdict["label"],
        "score": verdict["probabilities"][card.rule.positive],
        "novelty": verdict["novelty"],
        "neither": verdict["neither"],
        "confidence": verdict["confidence"],
        "latency_seconds": seconds,
        "endpoint": fields["endpoint"],
    }


def verdicts(card: ModelCard, outputs: np.ndarray) -> list[dict]:
    return [card.rule.verdict(float(row[PROBABILITY]), float(row[NOVELTY])) for row in outputs]


@bentoml.service(workers=1, traffic=TRAFFIC, runner_connection=MODEL_SERVICE_CONNECTION)
class Classifier:
    bento_model = bentoml.models.BentoModel(MODEL_NAME)

    def __init__(self) -> None:
        sample_process("model")
        model = bento_pinned(type(self).bento_model, Classifier).stored
        card = ModelCard.from_metadata(model.info.metadata)
        # Warmed up: otherwise the batcher's latency estimate starts out far too high and
        # it sheds requests.
        self.score = serving_scorer(model.path, card.image_size)

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
    front class), every error as JSON, the API key checked (when keys are configured) before
    anything else is, the typed routes gated as the FastAPI ones."""
    service = bentoml.service(name=SERVICE_NAME, workers=1, traffic=TRAFFIC)(inner)
    service = bentoml.asgi_app(app, path="/")(service)  # makes ``inner``'s class views
    instance_in_event_loop(inner)
    service.add_asgi_middleware(JsonErrors)
    service.add_asgi_middleware(RequireApiKey)
    service.add_asgi_middleware(TypedUploads)
    inner.service = service  # for its bento (serving/model.py bento_pinned)
    return service


def refuse_to_start(error: ValueError) -> NoReturn:
    """A mistake in the deployment's configuration: said once, in one line. In a BentoML
    server's worker the whole server then stops: BentoML respawns a worker that fails to start
    (in the container too, pipeline/bento.py container_start), so a raise alone would retry it,
    traceback and all, every few seconds for ever. Stopped, the server exits, and Compose's
    restart policy or Kubernetes' back-off shows the line. Elsewhere (a test) it is raised."""
    logger.critical("the service cannot start: %s", error)
    if server_context.worker_index is not None:  # set by BentoML in its server's workers
        os.kill(os.getppid(), signal.SIGTERM)  # the server (its arbiter) stops every worker
        os._exit(1)  # now: a raise would have Starlette log a traceback under the line above
    raise error


@front_service
class DandelionService:
    bento_model = bentoml.models.BentoModel(MODEL_NAME)
    batching = False  # the engine runs in this process

    def __init__(self, model: ServedModel | None = None) -> None:
        # The deployment's configuration first: a mistake stops the start before any load.
        try:
            self.api_keys = ApiKeys.from_environ()  # None: open (RequireApiKey lets all in)
            self.log = PredictionLog.from_environ()
            challenger_config()  # read again when the champion is loaded (Challenger.from_environ)
        except ValueError as error:
            refuse_to_start(error)
        if model is None:  # as BentoML starts it: the bento's one model, from its store
            reference = bento_pinned(type(self).bento_model, type(self).service)
            model = ServedModel.stored(reference, self.batching)
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
        self.rollout = rollout_metrics()
        self.rollout.describe(card, CHAMPION, SERVED_MODE)
        self.challenger: Challenger | None = None
        self.shadow: Shadow | None = None
        self.serve_challenger(Challenger.from_environ(card))
        self.log.start()
        # After the drain: the feedback flusher's last pass (what it cannot store stays
        # spooled), the shadow's queue, then the prediction log's.
        self.admission.drain_on_sigterm(then=self.finish)

    def serve_challenger(self, challenger: Challenger | None) -> None:
        """Serve ``challenger`` (its worker started) beside the champion, in its mode."""
        self.challenger = challenger
        if challenger is None:
            return
        card, mode = challenger.card, challenger.mode
        self.metrics.expect_accuracy(card)
        self.rollout.describe_challenger(card, mode)
        self.rollout.describe(card, CHALLENGER, mode if mode == SHADOW else SERVED_MODE)
        self.feedback.add_challenger(card, self.challenger_scores)
        if mode == SHADOW:
            self.shadow = Shadow(
                challenger.worker,
                self.shadow_scored,
                shed=self.rollout.shed.labels(card.version).inc,
                depth=self.rollout.queue.set,
            )
            self.shadow.start()
        logger.info("challenger %s loaded, in %s mode", card.version, mode)

    def finish(self, within: float) -> None:
        """What the drain leaves ``within`` seconds for: the feedback flusher's last pass, the
        photos queued for the shadow, the prediction log (records of answers given: they come
        before the shadow's), then the challenger's worker."""
        deadline = time.monotonic() + within

        def left() -> float:
            return max(deadline - time.monotonic(), 0.0)

        self.feedback.stop(left())
        if self.shadow is not None:  # half of what is left: the log's records come first
            self.shadow.stop(left() / 2)
        self.log.stop(left())
        if self.challenger is not None:  # last: nothing needs its worker any more
            self.challenger.stop()

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
        return JSONResponse(with_security(self.documents.openapi(app), self.api_keys))

    @app.get("/docs.json", include_in_schema=False)
    def bentoml_openapi(self) -> JSONResponse:
        """BentoML's OpenAPI document (this API, its typed endpoints, health and metrics),
        with this service's description and contact instead of BentoML's."""
        document = self.documents.bentoml(self.bento_service)
        return JSONResponse(with_security(document, self.api_keys))

    @app.get("/model-info")
    def model_info(self) -> ModelInfo:
        """The served model's card (params with their types from params.yaml, test metrics)
        and the Git revision deployed."""
        return self.info

    @app.post("/predict", name="predict", responses=ERRORS)
    async def predict_form(self, request: Request) -> Prediction:
        """Classify one photo, sent in the multipart field `image`."""
        _, (answer,) = await self.read_and_classify(request, self.single, "predict")
        return answer

    @app.post("/predict_batch", name="predict_batch", responses=ERRORS)
    async def predict_batch_form(self, request: Request) -> BatchPredictions:
        """Classify several photos, each in a multipart field `images`: one answer per file,
        in the order sent, or (if any file is bad) a 4xx naming it and no answers."""
        return batch_answer(*await self.read_and_classify(request, self.batch, "predict_batch"))

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
            (answer,) = await self.classify(sent_files([image]), "predict", self.client_key())
        except Rejection as rejection:  # as is: BentoML would reshape a raised error
            return rejection_response(rejection)
        return Prediction(**answer)

    @bentoml.api(route=TYPED_PREDICT_BATCH_ROUTE)
    async def predict_batch(self, images: list[Path]) -> BatchPredictions:
        """Classify several photos: `POST /predict_batch`, for BentoML's clients."""
        files = sent_files(images)
        try:
            answers = await self.classify(files, "predict_batch", self.client_key())
            return BatchPredictions(**batch_answer(files, answers))
        except Rejection as rejection:
            return rejection_response(rejection)

    def client_key(self) -> str | None:
        """The CLIENT_KEY_HEADER of the typed endpoint's request being answered. (Not a
        `bentoml.Context` parameter: BentoML would then answer with the context's status, and
        our errors' statuses would be lost.)"""
        return self.bento_service.context.request.headers.get(CLIENT_KEY_HEADER)

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

    async def read_and_classify(
        self, request: Request, upload: Upload, endpoint: str
    ) -> tuple[list, list]:
        """The files ``upload`` reads from ``request`` and their answers, or Rejection."""
        async with (
            self.admission.accepted(request.headers, upload),
            upload.read(request, self.pace) as files,
        ):
            key = request.headers.get(CLIENT_KEY_HEADER)
            return files, await self.classify(files, endpoint, key)

    async def classify(
        self, files: list[SentFile], endpoint: str, client_key: str | None = None
    ) -> list[dict]:
        """An answer for each file (all or none), once admitted: the champion's, or in canary
        mode the challenger's for its share (by ``client_key``, else by photo). Each answer is
        logged; in shadow mode the champion's photos are queued for the challenger."""
        digests: list[bytes] = [b""] * len(files)
        kept: list[bytes | None] = [None] * len(files)  # the photos, if the log keeps them

        def hashed(index: int, file: SentFile) -> SentFile:
            async def read() -> bytes:
                data = await file.read()
                digests[index] = hashlib.sha256(data).digest()
                if self.log.keep_photos:
                    kept[index] = data
                return data

            return SentFile(file.filename, read)

        served: list = [None] * len(files)  # (card, role, verdict, engine seconds)
        async with self.admission.admitted():
            sent = [hashed(index, file) for index, file in enumerate(files)]
            images = None
            if len(sent) == 1 and self.model.score is not None:
                # Read first: the photo's digest decides the canary's split before decoding.
                data = await sent[0].read()
                sent = [held(files[0].filename, data)]
                if len(data) <= LARGE_UPLOAD_BYTES and not self.challenger_answers(
                    client_key, digests[0]
                ):
                    images = await self.decoded_and_scored(data, served)
            if images is None:
                images = await self.answered(sent, digests, client_key, served)
        answers, shadowed = [], []
        for index, (card, role, verdict, seconds) in enumerate(served):
            answer = self.answer(card, verdict)
            answers.append(answer)
            record = answer_record(
                card,
                role,
                verdict,
                seconds,
                answer_id=answer["answer_id"],
                photo_sha256=digests[index].hex(),
                endpoint=endpoint,
            )
            self.log.record(record, kept[index])
            if role == CHAMPION:
                # A copy: a view would keep the request's whole batch of pixels queued.
                shadowed.append(ShadowPhoto(images[index].copy(), record))
        if self.shadow is not None and shadowed:
            self.shadow.offer(shadowed)
        return answers

    async def answered(
        self, sent: list[SentFile], digests: list[bytes], client_key: str | None, served: list
    ) -> np.ndarray:
        """The images of ``sent`` decoded, each scored by the model that answers it (its
        verdict into ``served``); ``digests`` are the photos' (known once each is read)."""
        images = np.stack(await decoded(sent, self.model.card.image_size, self.single.limits))
        by_challenger = [self.challenger_answers(client_key, digest) for digest in digests]
        champion = [i for i, theirs in enumerate(by_challenger) if not theirs]
        challenger = [i for i, theirs in enumerate(by_challenger) if theirs]
        if challenger:
            try:
                outputs, seconds = await anyio.to_thread.run_sync(
                    self.challenger.worker.score, images[challenger]
                )
            except ChallengerFailed as failure:  # the champion answers instead
                logger.warning("canary answered by the champion: %s", failure)
                self.rollout.errors.labels(
                    self.challenger.card.version, CHALLENGER, SERVED_MODE
                ).inc(len(challenger))
                champion = sorted(champion + challenger)
            else:
                self.count(
                    self.challenger.card,
                    CHALLENGER,
                    SERVED_MODE,
                    challenger,
                    outputs,
                    seconds,
                    served,
                )
        if champion:
            try:
                outputs, seconds = await self.scored(images[champion])
            except Exception:
                self.rollout.errors.labels(self.model.card.version, CHAMPION, SERVED_MODE).inc(
                    len(champion)
                )
                raise
            self.count(self.model.card, CHAMPION, SERVED_MODE, champion, outputs, seconds, served)
        return images

    def challenger_answers(self, client_key: str | None, digest: bytes) -> bool:
        canary = self.challenger.canary if self.challenger is not None else None
        return canary is not None and canary.challenger_answers(client_key, digest)

    async def decoded_and_scored(self, data: bytes, served: list) -> np.ndarray:
        """One small photo decoded and scored by the champion in this process, in one worker
        thread in the engine's turn rather than one thread for each: every hop has the event
        loop wake a thread, which then takes a core from it. Its verdict into ``served``; its
        image returned. (The large-upload lane and batches go through ``answered``.)"""
        card, scoring = self.model.card, False

        def decoded_and_timed() -> tuple[np.ndarray, np.ndarray, float]:
            nonlocal scoring
            images = decode_upload(data, card.image_size, self.single.limits)[np.newaxis]
            scoring, started = True, time.perf_counter()
            outputs = self.model.score(images)
            return images, outputs, time.perf_counter() - started

        try:
            images, outputs, seconds = await anyio.to_thread.run_sync(
                decoded_and_timed, limiter=inference_limiter()
            )
        except Exception:
            if scoring:  # a bad photo is the client's, not the engine's
                self.rollout.errors.labels(card.version, CHAMPION, SERVED_MODE).inc()
            raise
        self.count(card, CHAMPION, SERVED_MODE, [0], outputs, seconds, served)
        return images

    def count(
        self, card: ModelCard, role: str, mode: str, indices: list, outputs, seconds, served
    ) -> None:
        """Count one scoring call's verdicts on /metrics, into ``served`` at ``indices``."""
        given = verdicts(card, outputs)
        seconds = per_image(seconds, len(given))
        self.rollout.count_call(card, role, mode, given, seconds)
        for index, verdict in zip(indices, given, strict=True):
            served[index] = (card, role, verdict, seconds)

    def shadow_scored(self, photos: list[ShadowPhoto], outputs, seconds: float) -> None:
        """The challenger's scores of photos the champion answered (None: its call failed):
        counted, compared with the champion's answers, and logged as shadow records."""
        card = self.challenger.card
        if outputs is None:
            self.rollout.errors.labels(card.version, CHALLENGER, SHADOW).inc(len(photos))
            return
        given = verdicts(card, outputs)
        seconds = per_image(seconds, len(given))
        self.rollout.count_call(card, CHALLENGER, SHADOW, given, seconds)
        for photo, verdict in zip(photos, given, strict=True):
            champion = photo.answer
            agree = (verdict["label"], verdict["neither"]) == (
                champion["label"],
                champion["neither"],
            )
            self.rollout.comparisons.labels(card.version, SHADOW_OUTCOMES[not agree]).inc()
            self.log.record(answer_record(card, CHALLENGER, verdict, seconds, shadowed=champion))

    async def challenger_scores(self, images: np.ndarray) -> np.ndarray:
        """The challenger's outputs for ``images`` (for the feedback desk); ChallengerFailed."""
        outputs, _ = await anyio.to_thread.run_sync(self.challenger.worker.score, images)
        return outputs

    async def admitted_scores(self, images: np.ndarray) -> np.ndarray:
        """``scores`` in one of the predictions' places: a feedback's scoring adds no load past
        the service's capacity (at capacity it is refused, and the feedback kept unscored)."""
        async with self.admission.admitted():
            return await self.scores(images)

    async def scores(self, images: np.ndarray) -> np.ndarray:
        outputs, _ = await self.scored(images)
        return outputs

    async def scored(self, images: np.ndarray) -> tuple[np.ndarray, float]:
        """The champion's outputs for ``images``, and the engine's seconds."""

        def timed() -> tuple[np.ndarray, float]:
            started = time.perf_counter()
            outputs = self.model.score(images)
            return outputs, time.perf_counter() - started

        # In a worker thread, so the event loop goes on reading other requests.
        return await anyio.to_thread.run_sync(timed, limiter=inference_limiter())

    def answer(self, card: ModelCard, verdict: dict) -> dict:
        """The answer of ``card``'s model that gave ``verdict``, counted."""
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

    async def scored(self, images: np.ndarray) -> tuple[np.ndarray, float]:
        """The model service's outputs, and the seconds its call took (its batching's wait
        included: the engine's own time is the model service's)."""
        started = time.perf_counter()
        outputs = await self.batched_scores(images)
        return outputs, time.perf_counter() - started

    async def batched_scores(self, images: np.ndarray) -> np.ndarray:
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
