"""Package stage: put the champion classifier into BentoML's model store for serving.

The prediction service (serving/service.py) reads everything it needs from the stored
model: the Keras file, and as metadata the classes, input size, upload limits, and the
version, training params, test metrics and revision shown by its /model-info endpoint.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import bentoml

from serving.service import MODEL_FILE, MODEL_NAME


def save_to_bentoml(
    model_file: Path,
    *,
    version: str,
    classes: list[str],
    image_size: int,
    serve_params: dict,
    train_params: dict,
    test_metrics: dict,
    git_revision: str,
    trained_at: str | None = None,
) -> bentoml.Model:
    """Store ``model_file`` as ``dandelion-vs-grass:<version>``; reuse it if already there."""
    tag = f"{MODEL_NAME}:{version}"
    try:
        return bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        pass
    metadata = {
        "version": version,
        "classes": list(classes),
        "image_size": int(image_size),
        "serve": dict(serve_params),
        "train_params": dict(train_params),
        "test_metrics": dict(test_metrics),
        "git_revision": git_revision,
        "trained_at": trained_at or datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with bentoml.models.create(tag, labels={"stage": "champion"}, metadata=metadata) as model:
        shutil.copyfile(model_file, model.path_of(MODEL_FILE))
    return bentoml.models.get(tag)
