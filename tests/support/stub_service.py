"""The service's real HTTP front (BentoML's ASGI app, in this process) on a stub model.

No pipeline, no bento, no BentoML store: the front is constructed with a ``ServedModel`` of a
made-up card and a stub scorer whose P(dandelion) is the photo's mean green (and whose novelty
is twice its mean red), so tests can choose answers with generated images. Everything else,
from routing and middleware to upload checks and JSON answers, is the code `bentoml serve`
runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from serving.contract import MODEL_NAME, ModelCard
from serving.model import ServedModel
from tests.support.http import free_port

CARD = ModelCard(
    version="0123456789abcdef",
    model_sha256="ab" * 32,
    engine="openvino",  # runs in the front's process: no model service to start
    dvc_md5="0123456789abcdef0123456789abcdef.dir",
    classes=["grass", "dandelion"],
    threshold=0.5,
    image_size=32,
    serve={
        "engine": "openvino",
        "max_upload_bytes": 200_000,
        "min_side": 16,
        "max_pixels": 1_000_000,
        "max_batch_files": 3,
    },
    train_params={
        "seed": 42,
        "learning_rate": 0.001,
        "label_smoothing": 0.0,
        "features": {"augment_copies": 2, "novelty_layers": ["block_6_expand_relu"]},
    },
    test_metrics={
        "accuracy": 0.95,
        "accuracy_low": 0.86,
        "accuracy_high": 0.98,
        "positive_share_low": 0.36,
        "positive_share_high": 0.61,
    },
)


def stub_scorer(images: np.ndarray) -> np.ndarray:
    """Stands in for the engine: P(dandelion) = mean green, novelty = 2 * mean red."""
    mean = images.reshape(len(images), -1, 3).mean(axis=1) / 255.0
    return np.stack([mean[:, 1], 2 * mean[:, 0]], axis=1).astype(np.float32)


STUB_MODEL = ServedModel(f"{MODEL_NAME}:{CARD.version}", CARD, stub_scorer)

# The stub challenger: the same stub engine at a higher threshold, as a challenger that
# evaluate's threshold made (photos whose mean green is from 0.5 to 0.7 flip to grass).
CHALLENGER_CARD = dataclasses.replace(CARD, version="fedcba9876543210", threshold=0.7)
# The stub challenger's "export directories": how its engine behaves.
STUB_EXPORT, SLOW_EXPORT = "stub", "slow"
SLOW_CALL_SECONDS = 0.5


def stub_engine(directory: str):
    """Stands in for serving.engines.load_engine in the challenger's worker process: the stub
    scorer, taking SLOW_CALL_SECONDS a call for SLOW_EXPORT; no engine at all for another
    directory (as an export that is gone)."""
    if directory not in (STUB_EXPORT, SLOW_EXPORT):
        raise FileNotFoundError(directory)
    if directory == STUB_EXPORT:
        return stub_scorer

    def slow(images: np.ndarray) -> np.ndarray:
        time.sleep(SLOW_CALL_SECONDS)
        return stub_scorer(images)

    return slow


def photo(colour=(20, 200, 20), size=(40, 30), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, fmt)
    return buffer.getvalue()


@dataclass(frozen=True)
class StubService:
    service: object  # the front's BentoML service, whose instances serve STUB_MODEL
    # Its ASGI app as `bentoml serve` builds it (once per process: BentoML's request metrics
    # are process-wide). Each start of its lifespan makes a new service instance.
    app: object

    @staticmethod
    def instance():
        """The front instance of the app started last (its lifespan ran)."""
        import bentoml

        return bentoml.get_current_service()


@functools.cache
def stub_service() -> StubService:
    """The OpenVINO front (serving/service.py DandelionService) constructed with the stub
    model, as a BentoML service of its own, and its app."""
    from serving.service import DandelionService, front_service

    class StubFront(DandelionService.inner):
        def __init__(self) -> None:
            super().__init__(STUB_MODEL)

    service = front_service(StubFront)
    return StubService(service, service.to_asgi())


@contextlib.contextmanager
def front_restored() -> Iterator[object]:
    """The front instance started last; what a test changes on it (or on its admission) is
    put back on leaving."""
    instance = StubService.instance()
    saved, admission = dict(vars(instance)), dict(vars(instance.admission))
    try:
        yield instance
    finally:
        vars(instance).update(saved)
        vars(instance.admission).update(admission)


def stub_client():
    """A Starlette TestClient on the stub service's app (entering it runs the app's lifespan,
    which makes a new service instance)."""
    from starlette.testclient import TestClient

    return TestClient(stub_service().app)


@contextlib.contextmanager
def stub_served() -> Iterator[str]:
    """The stub service's app under uvicorn on 127.0.0.1, as `bentoml serve` would run it: its
    base URL. Starting it makes a new service instance (``StubService.instance()``)."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(stub_service().app, host="127.0.0.1", port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def raw_request(client, path: str, headers: dict, pieces: list[tuple[float, bytes]]) -> tuple:
    """Send ``pieces`` (seconds to wait, bytes) as a request body straight to the app, in
    its event loop (TestClient would read a body whole before the app sees it); the answer's
    status, headers and body."""
    import anyio

    async def call() -> tuple:
        remaining = list(pieces)
        answer: dict = {"body": b""}

        async def receive() -> dict:
            if not remaining:  # the client goes quiet, its body unfinished
                await anyio.sleep(3600)
            delay, chunk = remaining.pop(0)
            await anyio.sleep(delay)
            return {"type": "http.request", "body": chunk, "more_body": True}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                answer["status"] = message["status"]
                answer["headers"] = {k.decode(): v.decode() for k, v in message["headers"]}
            elif message["type"] == "http.response.body":
                answer["body"] += message.get("body", b"")

        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 80),
            "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
        }  # fmt: skip
        await client.app(scope, receive, send)
        return answer["status"], answer["headers"], answer["body"]

    return client.portal.call(call)


def main(port: str) -> None:
    """Serve the stub front on 127.0.0.1:``port`` in a process of its own: as under `bentoml
    serve`, its /metrics then merges the files of PROMETHEUS_MULTIPROC_DIR (set by the caller),
    which a test's own process, holding every other test's metrics, cannot."""
    import uvicorn

    uvicorn.run(stub_service().app, host="127.0.0.1", port=int(port), log_level="warning")


if __name__ == "__main__":
    main(*sys.argv[1:])
