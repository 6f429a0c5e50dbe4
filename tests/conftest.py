from __future__ import annotations

import os

import mlflow
import pytest
from support import DATASET_MIRROR, WEIGHTS_DIR, prepare_keras_home


def require_shared(path):
    """The shared mirror exists in CI; on a user's machine without it, skip instead."""
    if path.exists():
        return
    if os.environ.get("CI"):
        pytest.fail(f"{path} is missing: CI must have ../shared beside the checkout")
    pytest.skip(f"{path} not present (it ships beside the repo on build machines only)")


@pytest.fixture(scope="session")
def dataset_mirror():
    require_shared(DATASET_MIRROR)
    return DATASET_MIRROR


@pytest.fixture(scope="session")
def keras_home(tmp_path_factory):
    require_shared(WEIGHTS_DIR)
    return prepare_keras_home(tmp_path_factory.mktemp("keras_home"))


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """An isolated MLflow tracking store, so tests never write to the repo's own."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)
