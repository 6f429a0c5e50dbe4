"""The features stage on a real local Ray cluster (token authentication on) gives the bytes it
gives in process; a client without the cluster's token gets a clear one-line error."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.params import PreprocessParams
from serving.contract import load_image
from tests.support.dvc import set_param
from tests.support.paths import PARAMS_FILE, REPO_ROOT
from tests.support.processes import python_code, python_module
from tests.support.ray_cluster import without_ray

pytestmark = pytest.mark.slow

# Real photos, few: batches of 8 give train three batches (the last one short) per view, so
# the augmented views draw at many states, and two workers share the batches.
PHOTOS = {"train": 20, "val": 8, "test": 6}
BATCH_SIZE = 8
LABELS = ["grass", "dandelion"]  # label 0, label 1

CONNECT = (
    "from pipeline.cluster import ClusterError, connected\n"
    "try:\n"
    "    with connected():\n"
    "        import ray\n"
    "        print(int(ray.cluster_resources()['CPU']))\n"
    "except ClusterError as error:\n"
    "    print(error)\n"
)


def test_a_client_with_the_token_connects(ray_cluster):
    result = python_code(CONNECT, REPO_ROOT, env=ray_cluster.client_env(dict(os.environ)))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "2\n"


@pytest.mark.parametrize("token", [None, "0" * 64])
def test_a_client_without_the_token_is_refused_clearly(ray_cluster, token):
    env = ray_cluster.client_env(dict(os.environ))
    del env["RAY_AUTH_TOKEN_PATH"]
    if token is None:
        del env["RAY_AUTH_MODE"]  # as a user who never heard of the token would run it
    else:
        env["RAY_AUTH_TOKEN"] = token
    result = python_code(CONNECT, REPO_ROOT, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"the Ray cluster at {ray_cluster.address} refused our token (missing or wrong): "
        "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (a file holding the cluster's token) "
        "or RAY_AUTH_TOKEN\n"
    )


@pytest.fixture(scope="module")
def small_workspace(tmp_path_factory, dataset_mirror) -> Path:
    """params.yaml (batches of BATCH_SIZE) and preprocess-like arrays of a few dozen of the
    real photos, half of each label in every split."""
    root = tmp_path_factory.mktemp("ray-features")
    (root / "params.yaml").write_bytes(PARAMS_FILE.read_bytes())
    set_param(root, "features.batch_size", BATCH_SIZE)
    image_size = PreprocessParams.load(PARAMS_FILE).image_size
    mirror = dataset_mirror / "data"
    labels = {label: iter(sorted((mirror / label).glob("*.jpg"))) for label in LABELS}
    (root / "arrays").mkdir()
    for split, count in PHOTOS.items():
        half = range(count // 2)
        chosen = [(label, next(photos)) for label, photos in labels.items() for _ in half]
        np.savez(
            root / "arrays" / f"{split}.npz",
            images=np.stack([load_image(path, image_size) for _, path in chosen]),
            labels=np.array([LABELS.index(label) for label, _ in chosen]),
            paths=np.array([f"data/raw/{label}/{path.name}" for label, path in chosen]),
        )
    return root


def run_features(workspace: Path, out: str, env: dict[str, str]) -> tuple[str, dict[str, str]]:
    """The features stage's output and the sha256 of each .npz it wrote."""
    result = python_module("stages.features", workspace, "arrays", out, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    digests = {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted((workspace / out).glob("*.npz"))
    }
    return result.stdout, digests


def test_features_on_the_cluster_are_the_bytes_computed_in_process(
    small_workspace, keras_home, ray_cluster
):
    env = dict(os.environ, KERAS_HOME=str(keras_home), PYTHONPATH=str(REPO_ROOT))
    in_process, expected = run_features(small_workspace, "in-process", without_ray(env))
    on_cluster, computed = run_features(small_workspace, "on-cluster", ray_cluster.client_env(env))
    assert "on the Ray cluster" not in in_process
    assert f"features: on the Ray cluster at {ray_cluster.address}, 2 workers" in on_cluster
    assert sorted(expected) == ["test.npz", "train.npz", "val.npz"]
    assert computed == expected
