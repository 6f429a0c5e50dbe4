"""The service's real HTTP front (BentoML's ASGI app, in this process) on a stub model.

No pipeline, no bento: a model with a made-up card is created in a throwaway BentoML home,
and the engine is replaced by a stub scorer whose P(dandelion) is the photo's mean green
(and whose novelty is its mean red), so tests can choose answers with generated images.
Everything else, from routing and middleware to upload checks and JSON answers, is the code
`bentoml serve` runs.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import io
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from serving.contract import MODEL_NAME, ModelCard
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
    test_metrics={"accuracy": 0.95, "positive_share_low": 0.36, "positive_share_high": 0.61},
)


def stub_scorer(export_dir: str, image_size: int):
    """Stands in for serving_scorer: P(dandelion) = mean green, novelty = 2 * mean red."""

    def score(images: np.ndarray) -> np.ndarray:
        mean = images.reshape(len(images), -1, 3).mean(axis=1) / 255.0
        return np.stack([mean[:, 1], 2 * mean[:, 0]], axis=1).astype(np.float32)

    return score


def photo(colour=(20, 200, 20), size=(40, 30), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, fmt)
    return buffer.getvalue()


@dataclass(frozen=True)
class StubService:
    module: object  # serving.service, imported against the stub model
    home: Path  # the throwaway BentoML home
    # The service's ASGI app as `bentoml serve` builds it (once per process: its metrics are
    # process-wide). Each start of its lifespan makes a new service instance.
    app: object

    @staticmethod
    def instance():
        """The DandelionService instance of the app started last (its lifespan ran)."""
        import bentoml

        return bentoml.get_current_service()


@functools.cache
def stub_service() -> StubService:
    """serving.service imported with a stub model in a throwaway BentoML home, once per
    process (BentoML resolves its home once, and the module reads its model on import)."""
    home = Path(tempfile.mkdtemp(prefix="stub-bentoml-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    os.environ["BENTOML_DO_NOT_TRACK"] = "true"
    saved = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(home)  # read once, on BentoML's first use
    try:
        import bentoml
        from bentoml._internal.configuration.containers import BentoMLContainer

        if Path(BentoMLContainer.bentoml_home.get()) != home:
            raise RuntimeError("BentoML was used in this process before: its home is not ours")
        with bentoml.models.create(f"{MODEL_NAME}:{CARD.version}", metadata=CARD.to_metadata()):
            pass  # the stub scorer reads no file
        module = importlib.import_module("serving.service")
        module.serving_scorer = stub_scorer
        app = module.DandelionService.to_asgi()
    finally:  # later tests' subprocesses get the user's BentoML home, as before
        if saved is None:
            del os.environ["BENTOML_HOME"]
        else:
            os.environ["BENTOML_HOME"] = saved
    return StubService(module, home, app)


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
