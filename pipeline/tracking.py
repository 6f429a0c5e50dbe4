"""One MLflow tracking store per project, also for the copies `dvc exp run --queue` runs in.

Without ``MLFLOW_TRACKING_URI`` MLflow writes ``./mlflow.db`` and ``./mlruns`` in the working
directory. A queued experiment runs in a temporary copy of the repo, so its runs would vanish
with that copy. DVC exports the real project root to every stage command as ``DVC_ROOT``
(for queued experiments too), so the default store is anchored there instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from pipeline.stage import StageError
from serving.contract import MODEL_NAME

EXPERIMENT = MODEL_NAME  # the MLflow experiment of the pipeline's runs
MODEL_SHA256_TAG = "model_sha256"  # links a run (and its registered version) to its model file
STORE_FILE = "mlflow.db"  # git-ignored, like ARTIFACT_DIR
ARTIFACT_DIR = "mlruns"
# How a client logs in to an MLflow server that runs its basic-auth app (docs/team-setup.md).
USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"


def is_refused_login(error: MlflowException) -> bool:
    """The server did not let this client in (no, or wrong, login; or not allowed to)."""
    return error.get_http_status_code() in (401, 403)


@contextlib.contextmanager
def login_errors():
    """MLflow's refusal of this client's login as a StageError that says which variables to
    set, instead of a traceback ending in an HTTP 401; any other error is left as it is."""
    try:
        yield
    except MlflowException as error:
        if not is_refused_login(error):
            raise
        server, user = mlflow.get_tracking_uri(), os.environ.get(USERNAME_ENV)
        if error.get_http_status_code() == 403:
            message = f"{user} may not do this on the MLflow server {server}: ask its admin"
        elif user:
            message = (
                f"the MLflow server {server} refused the login of {user}: check "
                f"{USERNAME_ENV} and {PASSWORD_ENV}"
            )
        else:
            message = (
                f"the MLflow server {server} requires a login: set {USERNAME_ENV} and "
                f"{PASSWORD_ENV}"
            )
        raise StageError(message) from None


def project_root() -> Path:
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def use_project_store(experiment: str = EXPERIMENT) -> None:
    """Point MLflow at the project's store (unless the user chose one) and select ``experiment``."""
    # MLflow announces at INFO that it creates (and migrates) a new store's tables: expected on
    # a project's first run, and not news in a stage's log. Its warnings and errors still show.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        root = project_root()
        mlflow.set_tracking_uri(f"sqlite:///{root / STORE_FILE}")
        # MLflow puts the artifacts of a new store and experiment under ./mlruns of the
        # *current* directory, which for a queued experiment is its temporary copy.
        with contextlib.chdir(root):
            if mlflow.get_experiment_by_name(experiment) is None:
                try:
                    mlflow.create_experiment(
                        experiment, artifact_location=(root / ARTIFACT_DIR).as_uri()
                    )
                except MlflowException:  # a parallel queue worker created it first
                    pass
    mlflow.set_experiment(experiment)


def training_run(model_sha256: str) -> mlflow.entities.Run | None:
    """The newest finished run of ``EXPERIMENT`` that trained the model with this SHA-256.

    Training is deterministic, so several runs may share one model; any of them describes it.
    Call ``use_project_store`` first.
    """
    runs = mlflow.search_runs(
        experiment_names=[EXPERIMENT],
        filter_string=f"tags.{MODEL_SHA256_TAG} = '{model_sha256}' and status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return runs[0] if runs else None
