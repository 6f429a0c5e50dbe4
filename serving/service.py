"""BentoML service: the champion dandelion-vs-grass classifier over HTTP.

`DandelionService` is the HTTP front (upload checks, JSON answers, the web page). How it runs
the model depends on the model's engine (serving/engines.py, `serve.engine`):

- OpenVINO (default) runs in the front's own process, in a worker thread: it takes about
  3 ms per image at any batch size, so batching has nothing to give, and a second process
  would only add an HTTP hop per request (measured: about 30 % of the throughput).
- Keras gains from adaptive batching, which BentoML does only between services: the front
  then calls `Classifier`, a model service whose batchable endpoint groups concurrent
  requests into one model call.

Health (/livez, /readyz) and Prometheus metrics (/metrics) are BentoML's built-ins; the model's
own metrics (answers by label, confidence, rejected uploads, what is served) are added to
/metrics by serving/metrics.py. The API is described in /openapi.json and browsable at /docs
(Swagger UI from the copy BentoML ships, so it works offline); every error is JSON.

Everything model-specific (classes, decision threshold, input size, upload limits) comes from
the packaged model's card (serving/contract.py), so the service decides exactly as the
pipeline's evaluate stage did for the model it serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from pathlib import Path
from typing import Any

import anyio
import bentoml
import numpy as np
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.contract import MODEL_NAME, NOVELTY, PROBABILITY, ModelCard
from serving.engines import BATCHING, Scorer, load_engine
from serving.metrics import model_metrics, sample_process
from serving.uploads import REJECTIONS, UploadError, UploadLimits, decode_upload, read_form

logger = logging.getLogger("bentoml.service.dandelion")
PAGE = (Path(__file__).parent / "page.html").read_text()
# A request gets its answer or an error within this; deployments give SIGTERM'd pods longer
# (compose stop_grace_period, Kubernetes terminationGracePeriodSeconds).
TRAFFIC_TIMEOUT_SECONDS = 60
# Adaptive batching of the model service: at most this many images per call, and at most this
# long for a request between arriving and its batch's answer.
MAX_BATCH_SIZE = 32
MAX_LATENCY_MS = 5000
# /readyz asks the model service with this timeout, so a probe is answered within seconds.
READY_PROBE_SECONDS = 2
# Uploads are decoded in worker threads, in two lanes, so that small photos never queue
# behind large ones: files up to LARGE_UPLOAD_BYTES in up to 2 threads (2 cores); larger ones
# (a 9 MB photo takes up to 0.1 s) one at a time, in a thread of lower CPU priority
# (nice +LARGE_DECODE_NICENESS), so that they use what small requests leave.
SMALL_DECODE_THREADS = 2
LARGE_UPLOAD_BYTES = 1_000_000
LARGE_DECODE_NICENESS = 10
# Requests larger than this (a batch of big photos) are read and decoded one at a time, the
# others waiting before their body is read: small requests share the cores with one big
# request at most, and big requests hold the memory of one.
LARGE_REQUEST_BYTES = 32_000_000
# Prediction requests admitted at once; more get 503 with Retry-After at once. At about
# 150 single images per second (docs/serving.md, Load benchmark), 64 waiting take about
# 0.4 s, under half the 1 s p95 objective of /predict: past that, waiting only delays every
# answer. A batch counts as one request.
MAX_PREDICTIONS_IN_FLIGHT = 64
# After SIGTERM, requests already accepted get this long to finish (no request outlives the
# traffic timeout anyway); deployments allow more (compose stop_grace_period 70 s,
# Kubernetes terminationGracePeriodSeconds 75 s).
DRAIN_SECONDS = TRAFFIC_TIMEOUT_SECONDS


def served_card() -> ModelCard:
    """The card of the model this service serves, read when the module is imported, because
    the engine decides which services exist. A built bento holds exactly one model; `bentoml
    serve` of the source takes the store's latest, as the BentoModel attributes below do."""
    stored = bentoml.models.BentoModel(MODEL_NAME).stored
    if stored is None:
        raise RuntimeError(
            f"no model '{MODEL_NAME}' in BentoML's store: run `python -m stages.promote` "
            "(or serve a built bento)"
        )
    return ModelCard.from_metadata(stored.info.metadata)


@bentoml.service(
    workers=1,
    traffic={"timeout": TRAFFIC_TIMEOUT_SECONDS},
    # The front's client for this service replaces its HTTP session every 100 requests or
    # 300 s by default, and closes the old one with requests still in flight: under load
    # those fail with "Server disconnected". Keep one session for the process's life.
    runner_connection={"max_requests": 2**31 - 1, "max_age": 1e9},
)
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
        batchable=True,
        batch_dim=0,
        max_batch_size=MAX_BATCH_SIZE,
        max_latency_ms=MAX_LATENCY_MS,
    )
    def classify_batched(self, images: np.ndarray) -> np.ndarray:
        """The model's outputs (contract: PROBABILITY, NOVELTY) for each ``(N, size, size, 3)``
        uint8 image."""
        return self.score(images)


@functools.cache
def large_request_lock() -> asyncio.Lock:
    """Shared by all requests of the process (created in its event loop, on first use)."""
    return asyncio.Lock()


@functools.cache
def small_decode_limiter() -> anyio.CapacityLimiter:
    """Shared by all requests of the process (created in its event loop, on first use)."""
    return anyio.CapacityLimiter(SMALL_DECODE_THREADS)


def lower_this_threads_priority() -> None:
    # Linux schedules threads as tasks: a thread's own id sets its niceness alone.
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LARGE_DECODE_NICENESS)


@functools.cache
def large_decode_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(1, "large-decode", initializer=lower_this_threads_priority)


def return_freed_memory_to_the_system() -> None:
    """Make glibc give back the memory of large uploads and decodes once they are freed.

    By default glibc raises its mmap threshold after a large block is freed, so later large
    blocks (an uploaded photo's bytes, its decoded pixels) come from per-thread arenas, which
    keep their peak: decoding 16 photos of 9 MB in 3 threads left 230 MB in them, measured
    here; with these settings, nothing. A fixed threshold keeps blocks of 1 MiB and more in
    mmap, returned when freed, and two arenas bound what the threads hold. Same as the
    environment variables MALLOC_MMAP_THRESHOLD_ and MALLOC_ARENA_MAX, but set where the
    service starts.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, macOS): nothing to tune
        return
    m_arena_max, m_mmap_threshold = -8, -3  # glibc's mallopt parameters (malloc.h)
    libc.mallopt(m_mmap_threshold, 1 << 20)
    libc.mallopt(m_arena_max, 2)


@functools.cache
def inference_limiter() -> anyio.CapacityLimiter:
    """One engine call at a time: the engine uses both cores for one call already."""
    return anyio.CapacityLimiter(1)


def serving_scorer(export_dir: str, image_size: int) -> Scorer:
    """The export loaded with its engine, as evaluate loaded it, warmed up, and counting the
    images of each call on /metrics (classifier_model_call_images)."""
    score = load_engine(export_dir)
    # The first call compiles and allocates (TensorFlow: seconds); make it before serving.
    score(np.zeros((1, image_size, image_size, 3), dtype=np.uint8))
    metrics = model_metrics()

    def counted(images: np.ndarray) -> np.ndarray:
        metrics.count_call(len(images))
        return score(images)

    return counted


# The multipart fields the prediction endpoints read: the handlers and /openapi.json use these.
IMAGE_FIELD = "image"
IMAGES_FIELD = "images"
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


class Prediction(BaseModel):
    label: str = Field(description="the class whose probability reaches the model's threshold")
    confidence: float = Field(description="the probability of `label`")
    probabilities: dict[str, float] = Field(description="the probability of each class")
    neither: bool = Field(description="the photo is probably neither class (`novelty` > 1)")
    novelty: float = Field(description="how unlike the training photos the photo is (1: limit)")
    model_version: str = Field(description="the served model's version (/model-info)")


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


def error_responses() -> dict[int, dict]:
    """OpenAPI's error answers of the prediction endpoints: each status with its reasons."""
    reasons: dict[int, list[str]] = {}
    for reason, status in REJECTIONS.items():
        reasons.setdefault(status, []).append(reason)
    return {
        status: {"model": ErrorAnswer, "description": ", ".join(names)}
        for status, names in sorted(reasons.items())
    }


def multipart_upload(field: str, description: str, most: int) -> dict:
    """The OpenAPI request body of a multipart upload of up to ``most`` files in ``field``.

    Declared here rather than with FastAPI's typed `UploadFile` parameters: those make FastAPI
    read and parse the whole body before the handler runs, which would lose the checks made
    while the body arrives (pace 408, size 413, admission and drain 503; docs/serving.md).
    """
    file = {"type": "string", "format": "binary"}
    schema = (
        file if most == 1 else {"type": "array", "items": file, "minItems": 1, "maxItems": most}
    )
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": [field],
                        "properties": {field: {**schema, "description": description}},
                    }
                }
            },
        }
    }


CARD = served_card()
UPLOAD_LIMITS = (
    "a photo in any format Pillow reads (JPEG, PNG, GIF, WebP, ...); "
    f"at most {CARD.serve['max_upload_bytes']} bytes, each side at least "
    f"{CARD.serve['min_side']} px"
)

app = FastAPI(
    title=API_TITLE,
    description=API_DESCRIPTION,
    contact=API_CONTACT,
    version=CARD.version,
    docs_url=None,  # /docs is served below, from local assets
    redoc_url=None,
)


@app.exception_handler(UploadError)
async def upload_error(request: Request, error: UploadError) -> JSONResponse:
    model_metrics().count_rejection(error.reason, error.status)
    return JSONResponse({"error": error.message}, status_code=error.status, headers=error.headers)


def error_message(status: int, request_method: str, path: str, detail: str | None = None) -> str:
    return f"{detail or HTTPStatus(status).phrase}: {request_method} {path}"


@app.exception_handler(HTTPException)
async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    """405 and the like answered as every other error: ``{"error": ...}``."""
    message = error_message(error.status_code, request.method, request.url.path, error.detail)
    return JSONResponse({"error": message}, status_code=error.status_code, headers=error.headers)


class JsonErrors:
    """ASGI middleware: BentoML's own router answers an unknown path (404), and a wrong method
    on its own routes (405), in plain text before the service's app is asked; this rewrites
    exactly those plain-text 404 and 405 answers as ``{"error": ...}``. Any other answer passes
    through untouched, as it streams."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: Message | None = None  # the start of a plain-text 404 or 405, not yet sent

        async def rewrite(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and is_plain_404_or_405(message):
                held = message
                return
            if held is None:
                await send(message)
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                status = held["status"]
                body = JSONResponse(
                    {"error": error_message(status, scope["method"], scope["path"])}
                ).body
                headers = MutableHeaders(raw=list(held["headers"]))
                headers["content-type"] = "application/json"
                headers["content-length"] = str(len(body))
                await send({**held, "headers": headers.raw})
                await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)


def is_plain_404_or_405(start: Message) -> bool:
    content_type = MutableHeaders(raw=start["headers"]).get("content-type", "")
    return start["status"] in (404, 405) and content_type.startswith("text/plain")


def deployed_revision(value: str | None) -> tuple[str, bool | None]:
    """The commit named by GIT_REVISION (as `git describe --always --dirty` prints it) and
    whether tracked files differed from it ("-dirty"); ("unknown", None) if it is not set."""
    if not value:
        return "unknown", None
    return value.removesuffix("-dirty"), value.endswith("-dirty")


@bentoml.asgi_app(app, path="/")
@bentoml.service(workers=1, traffic={"timeout": TRAFFIC_TIMEOUT_SECONDS})
class DandelionService:
    if BATCHING[CARD.engine]:
        classifier = bentoml.depends(Classifier)
    bento_model = bentoml.models.BentoModel(MODEL_NAME)

    def __init__(self) -> None:
        card = ModelCard.from_metadata(self.bento_model.info.metadata)
        self.rule = card.rule
        self.image_size = card.image_size
        self.limits = UploadLimits(
            **{k: card.serve[k] for k in ("max_upload_bytes", "min_side", "max_pixels")}
        )
        self.max_batch_files: int = card.serve["max_batch_files"]
        # Which commit was deployed is not part of the (content-addressed) bento: whoever
        # deploys it says so (compose and the Kubernetes overlay pass GIT_REVISION), and
        # whether its work tree was dirty, with git's "-dirty" suffix.
        git_revision, git_dirty = deployed_revision(os.environ.get("GIT_REVISION"))
        self.info = {
            "model": str(self.bento_model.tag),
            "git_revision": git_revision,
            "git_dirty": git_dirty,
            **{key: value for key, value in card.to_metadata().items() if key != "serve"},
            "max_batch_files": self.max_batch_files,  # the page splits bigger drops
        }
        self.batching = BATCHING[card.engine]
        if not self.batching:  # the engine runs in this process
            self.score = serving_scorer(self.bento_model.path, card.image_size)
        self.in_flight = 0  # prediction requests admitted and not yet answered
        self.open_requests = 0  # prediction requests accepted, from their first byte
        self.draining = False  # SIGTERM received: finishing the open requests, taking no more
        self.drain_on_sigterm()
        return_freed_memory_to_the_system()
        self.metrics = model_metrics()
        self.metrics.describe(card, git_revision)
        sample_process("front")

    def drain_on_sigterm(self) -> None:
        """On SIGTERM, stop taking requests but finish those accepted, then stop the server.

        Uvicorn's own handler (which BentoML's worker runs) stops listening at once, and the
        connections that then wait in the socket's queue hang until the process exits. So
        this handler comes first: /readyz turns 503 and new predictions get 503 at once, the
        open requests finish (within DRAIN_SECONDS), and only then is uvicorn told to stop.
        """
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled there (a test importing the service)
        loop = asyncio.get_running_loop()
        stop_server = signal.getsignal(signal.SIGTERM)  # uvicorn's handler

        async def drain() -> None:
            deadline = time.monotonic() + DRAIN_SECONDS
            while self.open_requests and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            logger.info("SIGTERM: open requests finished, stopping")
            if callable(stop_server):
                stop_server(signal.SIGTERM, None)
            else:  # no handler to pass on to: exit as SIGTERM would have
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.raise_signal(signal.SIGTERM)

        def on_sigterm(signum: int, frame: object) -> None:
            if self.draining:
                return
            self.draining = True
            logger.info("SIGTERM: taking no new requests, finishing %d", self.open_requests)
            loop.call_soon_threadsafe(loop.create_task, drain())

        signal.signal(signal.SIGTERM, on_sigterm)

    async def __is_ready__(self) -> bool:
        """/readyz: 200 once the model service answers, 503 (at once) until then. With the
        engine in this process, ready once constructed (the model is loaded and warm).
        503 again from SIGTERM on, while the open requests finish."""
        if self.draining:
            return False
        is_ready = getattr(getattr(self, "classifier", None), "is_ready", None)
        if is_ready is None:
            return True
        try:
            # Bounded: while the model service starts, its socket may accept and not answer.
            return await asyncio.wait_for(
                is_ready(timeout=READY_PROBE_SECONDS), READY_PROBE_SECONDS
            )
        except Exception:  # not listening yet, timed out, restarting: not ready
            return False

    @app.get("/", response_class=HTMLResponse)
    def page(self) -> str:
        return PAGE

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

    @app.get("/docs.json", include_in_schema=False)
    def bentoml_openapi(self) -> dict:
        """BentoML's OpenAPI document (this API and its health and metrics endpoints), with
        this service's description and contact instead of BentoML's."""
        document = self.bento_service.openapi_spec.asdict()
        document["info"].update(
            title=API_TITLE, description=API_DESCRIPTION, contact=API_CONTACT, version=CARD.version
        )
        return document

    @app.get("/model-info")
    def model_info(self) -> ModelInfo:
        """The served model's card (params with their types from params.yaml, test metrics)
        and the Git revision deployed."""
        return self.info

    @app.post(
        "/predict",
        responses=error_responses(),
        openapi_extra=multipart_upload(IMAGE_FIELD, UPLOAD_LIMITS, most=1),
    )
    async def predict(self, request: Request) -> Prediction:
        """Classify one photo, sent in the multipart field `image`."""
        async with (
            self.accepted(request),
            self.uploaded(request, IMAGE_FIELD, most=1) as files,
            self.admitted(),
        ):
            (image,) = await self.decoded(files)
            (outputs,) = await self.scores(image[np.newaxis])
        return self.answer(outputs)

    @app.post(
        "/predict_batch",
        responses=error_responses(),
        openapi_extra=multipart_upload(IMAGES_FIELD, UPLOAD_LIMITS, CARD.serve["max_batch_files"]),
    )
    async def predict_batch(self, request: Request) -> BatchPredictions:
        """Classify several photos, each in a multipart field `images`: one answer per file,
        in the order sent, or (if any file is bad) a 4xx naming it and no answers."""
        async with (
            self.accepted(request),
            self.uploaded(request, IMAGES_FIELD, self.max_batch_files) as files,
            self.admitted(),
        ):
            outputs = await self.scores(np.stack(await self.decoded(files)))
        return {
            "predictions": [
                {"filename": file.filename, **self.answer(row)}
                for file, row in zip(files, outputs, strict=True)
            ]
        }

    @contextlib.asynccontextmanager
    async def accepted(self, request: Request):
        """Count the request as open until answered, or refuse it (503) while draining. A
        request over LARGE_REQUEST_BYTES first waits for the large ones before it."""
        if self.draining:
            raise UploadError("shutting_down", "the service is shutting down: retry shortly")
        length = request.headers.get("content-length", "")
        large = length.isdigit() and int(length) > LARGE_REQUEST_BYTES
        self.open_requests += 1
        try:
            async with large_request_lock() if large else contextlib.nullcontext():
                yield
        finally:
            self.open_requests -= 1

    @contextlib.asynccontextmanager
    async def admitted(self):
        """Hold one of the MAX_PREDICTIONS_IN_FLIGHT places, or answer 503 at once. Taken once
        the body is read: a slow client does not hold a place, and the 503 reaches the client
        (a socket closed with unread bytes is reset, and the reset can discard the answer)."""
        if self.in_flight >= MAX_PREDICTIONS_IN_FLIGHT:
            raise UploadError(
                "overloaded",
                f"the service is at capacity ({MAX_PREDICTIONS_IN_FLIGHT} predictions in "
                "progress): retry shortly",
            )
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def scores(self, images: np.ndarray) -> np.ndarray:
        if not self.batching:
            # In a worker thread, so the event loop goes on reading other requests.
            return await anyio.to_thread.run_sync(self.score, images, limiter=inference_limiter())
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
        raise UploadError("model_unavailable", f"the model is unavailable, retry shortly ({error})")

    @contextlib.asynccontextmanager
    async def uploaded(self, request: Request, field: str, most: int):
        """The files of a multipart ``field`` (at most ``most``), read whole; UploadError
        (4xx) for anything else. Their temporary files are closed on leaving."""
        self.check_headers(request, field, most)
        try:
            form = await read_form(request, most)
        except UploadError as error:
            if error.reason == "too_many_files":
                error.message = f"{error.message} in the field '{field}'" + (
                    " (send several photos to /predict_batch)" if most == 1 else ""
                )
            raise
        try:
            files = form.getlist(field)
            if not files:
                raise UploadError(
                    "missing_file",
                    f"no file in the multipart field '{field}' "
                    f"(fields sent: {sorted(form.keys()) or 'none'})",
                )
            if not all(hasattr(file, "read") for file in files):
                raise UploadError("not_a_file", f"the field '{field}' must hold a file, not text")
            yield files
        finally:
            await form.close()

    def check_headers(self, request: Request, field: str, most: int) -> None:
        """UploadError (4xx) for a request that cannot hold ``most`` files in ``field``."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise UploadError(
                "not_multipart", f"send multipart/form-data with the file in the field '{field}'"
            )
        length = request.headers.get("content-length")
        if length is None:
            raise UploadError("no_content_length", "the request needs a Content-Length header")
        if not length.isdigit():
            raise UploadError("bad_content_length", f"Content-Length is not a number: {length!r}")
        if int(length) > most * self.limits.max_upload_bytes + 64 * 1024:
            raise UploadError(
                "request_too_large",
                f"the request exceeds the upload limit "
                f"({self.limits.max_upload_bytes} bytes per image)",
            )

    async def decoded(self, files: list) -> list[np.ndarray]:
        """Model input from each uploaded file; UploadError (4xx) naming a file that fails."""
        arrays = []
        for index, file in enumerate(files):
            try:
                # In a worker thread: decoding a photo must not hold up the event loop,
                # and so every other request.
                data = await file.read()
                decode = functools.partial(decode_upload, data, self.image_size, self.limits)
                if len(data) > LARGE_UPLOAD_BYTES:
                    loop = asyncio.get_running_loop()
                    arrays.append(await loop.run_in_executor(large_decode_pool(), decode))
                else:
                    arrays.append(
                        await anyio.to_thread.run_sync(decode, limiter=small_decode_limiter())
                    )
            except UploadError as error:
                if len(files) > 1:
                    error.message = f"file {index + 1} ({file.filename}): {error.message}"
                raise
        return arrays

    def answer(self, outputs: np.ndarray) -> dict:
        verdict = self.rule.verdict(float(outputs[PROBABILITY]), float(outputs[NOVELTY]))
        self.metrics.count_answer(verdict)
        return {**verdict, "model_version": self.info["version"]}


DandelionService.add_asgi_middleware(JsonErrors)
