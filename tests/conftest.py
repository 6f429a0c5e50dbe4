from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest

from serving.contract import MODEL_NAME
from serving.settings import PREDICTION_LOG_DIR_ENV
from tests.support.dvc import dvc, pipeline_env, prepare_keras_home
from tests.support.git import copy_workspace, git
from tests.support.http import serve_directory
from tests.support.needs import require_shared
from tests.support.paths import DATASET_MIRROR, WEIGHTS_DIR
from tests.support.processes import dandelion
from tests.support.ray_cluster import ray_cluster  # noqa: F401 - a fixture for every test
from tests.support.s3 import S3Endpoint, fresh_moto_account, moto_s3_server
from tests.support.service import RunningService, own_metrics_home, serving

# Fixtures that need ../shared, the reproduced pipeline, a served bento or the `ray` extra.
NEEDS_PIPELINE = {
    "dataset_mirror",
    "keras_home",
    "reproduced",
    "pipeline_copy",
    "promoted",
    "service",
    "ray_cluster",  # the `ray` extra, which the fast tier does not install
}


# The fast tier's test files run two at a time, one per core of the build machines: each test
# is self-contained (its own temp dirs, ports, stores). The full tier runs in one process: its
# end-to-end tests share one pipeline run and one served bento, and measure the service's
# speed, which a second worker would disturb.
FAST_TIER = "not slow"
FAST_TIER_WORKERS = 2


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """`pytest -m "not slow"` on FAST_TIER_WORKERS workers (pytest-xdist), a test file per
    worker at a time, unless -n says otherwise (-n 0: one process) or --pdb is given."""
    if (
        config.option.markexpr == FAST_TIER
        and config.option.numprocesses is None
        and not config.option.usepdb
        and not hasattr(config, "workerinput")  # a worker runs its tests itself
    ):
        # As `-n 2 --dist loadfile` sets them (xdist's own hook may have run already).
        config.option.numprocesses = FAST_TIER_WORKERS
        config.option.dist = "loadfile"
        config.option.tx = ["popen"] * FAST_TIER_WORKERS


def pytest_collection_modifyitems(items):
    """The fast tier (-m "not slow") runs without ../shared: a test using those fixtures would
    only be skipped there, so it must be marked slow."""
    misfiled = [
        item.nodeid
        for item in items
        if not item.get_closest_marker("slow") and NEEDS_PIPELINE & set(item.fixturenames)
    ]
    if misfiled:
        raise pytest.UsageError(f"mark slow (they need ../shared or the pipeline): {misfiled}")


@pytest.fixture(scope="session", autouse=True)
def prediction_log_dir(tmp_path_factory) -> Iterator[Path]:
    """Every service the tests start (in process or `bentoml serve`, whose environment is
    this one's) logs its answers here, never into the home directory's default."""
    path = tmp_path_factory.mktemp("prediction-log")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(PREDICTION_LOG_DIR_ENV, str(path))
        yield path


@pytest.fixture(scope="session")
def dataset_mirror():
    require_shared(DATASET_MIRROR)
    return DATASET_MIRROR


@pytest.fixture(scope="session")
def keras_home(tmp_path_factory):
    require_shared(WEIGHTS_DIR)
    return prepare_keras_home(tmp_path_factory.mktemp("keras_home"))


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its schema made, to copy: the migrations take seconds."""
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    with contextlib.chdir(path.parent):  # the default experiment's ./mlruns: not the repo's
        mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, empty_mlflow_db):
    """An isolated MLflow tracking store, so tests never write to the repo's own."""
    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")
    monkeypatch.chdir(tmp_path)  # new experiments keep their artifacts in ./mlruns, here
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@dataclass(frozen=True)
class Reproduced:
    """A copy of this repo after one cold `dvc repro` on the real photos."""

    workspace: Path
    env: dict[str, str]
    cold: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory, dataset_mirror, keras_home) -> Reproduced:
    """Runs the whole pipeline once per session; tests that change it use `pipeline_copy`."""
    root = tmp_path_factory.mktemp("reproduced")
    workspace = copy_workspace(root / "repo")
    env = pipeline_env(keras_home, root / "bentoml_home")
    with serve_directory(dataset_mirror) as mirror_url:
        cold = dvc(workspace, "repro", env=dict(env, DOWNLOAD_BASE_URL=f"{mirror_url}/data"))
    assert cold.returncode == 0, cold.stdout + cold.stderr
    return Reproduced(workspace, env, cold)


@pytest.fixture
def pipeline_copy(reproduced, tmp_path) -> Path:
    """A private copy of the reproduced workspace (Git history and DVC cache included)."""
    return Path(shutil.copytree(reproduced.workspace, tmp_path / "repo", symlinks=True))


@pytest.fixture(scope="session")
def moto_url():
    with moto_s3_server() as url:
        yield url


@pytest.fixture
def s3(request) -> S3Endpoint:
    """An empty bucket on an S3 server on loopback, with credentials the server checks.

    A real MinIO when MINIO_ENDPOINT (and MINIO_ACCESS_KEY / MINIO_SECRET_KEY) are set;
    otherwise moto's standalone server, reset for every test.
    """
    if not os.environ.get("MINIO_ENDPOINT"):
        yield fresh_moto_account(request.getfixturevalue("moto_url"), "dvc-store")
        return
    endpoint = S3Endpoint(
        os.environ["MINIO_ENDPOINT"],
        f"pipeline-test-{uuid.uuid4().hex[:12]}",
        os.environ["MINIO_ACCESS_KEY"],
        os.environ["MINIO_SECRET_KEY"],
    )
    client = endpoint.client()
    client.create_bucket(Bucket=endpoint.bucket)
    yield endpoint
    for key in endpoint.objects():
        client.delete_object(Bucket=endpoint.bucket, Key=key)
    client.delete_bucket(Bucket=endpoint.bucket)


@pytest.fixture(scope="session")
def promoted(reproduced) -> subprocess.CompletedProcess:
    """`dandelion promote` after the cold repro: the bento becomes champion and latest."""
    result = dandelion(reproduced.workspace, "promote", env=reproduced.env)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="session")
def service(reproduced, promoted, tmp_path_factory) -> RunningService:
    """The champion as users serve it after promotion: `dandelion-vs-grass:latest`."""
    log_dir = tmp_path_factory.mktemp("serve")
    # As compose and the Kubernetes overlay do: the deployer names the Git revision.
    revision = git(reproduced.workspace, "rev-parse", "--short", "HEAD").stdout.strip()
    # Its metrics must outlive the other tests' `bentoml serve` of the same store
    # (tests/end_to_end/test_scrape.py reads them after test_reliability.py starts its own).
    home = own_metrics_home(Path(reproduced.env["BENTOML_HOME"]), log_dir / "bentoml_home")
    env = dict(reproduced.env, GIT_REVISION=revision, BENTOML_HOME=str(home))
    # Feedback (tests/end_to_end/test_scrape.py sends some) stays in the test's directory.
    env = dict(env, FEEDBACK_DIR=str(log_dir / "feedback"))
    env.pop("FEEDBACK_STORE", None)
    with serving(f"{MODEL_NAME}:latest", reproduced.workspace, env, log_dir) as s:
        yield s
