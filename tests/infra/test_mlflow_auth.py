"""MLflow's login, as the compose stack runs it: a real `mlflow server --app-name basic-auth`
on 127.0.0.1 with the stack's auth config (compose/mlflow/basic_auth.ini) and an admin from
`dandelion secrets`, refuses anonymous clients; promotion works with the login and stops in
one line without it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import keras
import mlflow
import pytest
import requests
from dotenv import dotenv_values
from mlflow import MlflowClient

from pipeline import promote
from pipeline.params import PromoteParams
from pipeline.secrets import generate
from pipeline.stage import StageError
from pipeline.tracking import PASSWORD_ENV, USERNAME_ENV, login_errors, use_project_store
from tests.support.http import free_port
from tests.support.paths import PARAMS_FILE, REPO_ROOT
from tests.support.processes import dandelion, running_server

STACK_AUTH_CONFIG = REPO_ROOT / "compose" / "mlflow" / "basic_auth.ini"
NAME = "auth-test"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server and the admin's login (from a .env `dandelion secrets` wrote)."""
    tmp = tmp_path_factory.mktemp("mlflow-auth")
    generate(tmp / ".env", tmp / ".secrets")
    values = dotenv_values(tmp / ".env")
    # The stack's config, with its auth database moved from the container's volume to here.
    config = STACK_AUTH_CONFIG.read_text().replace(
        "sqlite:////mlflow/basic_auth.db", f"sqlite:///{tmp / 'basic_auth.db'}"
    )
    assert str(tmp) in config
    (tmp / "basic_auth.ini").write_text(config)
    port = free_port()
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(tmp),
        "MLFLOW_AUTH_CONFIG_PATH": str(tmp / "basic_auth.ini"),
        # As docker-compose.yml maps them from .env.
        "MLFLOW_AUTH_ADMIN_USERNAME": values["MLFLOW_ADMIN_USER"],
        "MLFLOW_AUTH_ADMIN_PASSWORD": values["MLFLOW_ADMIN_PASSWORD"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": values["MLFLOW_FLASK_SERVER_SECRET_KEY"],
    }
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--app-name=basic-auth",
        "--host=127.0.0.1",
        f"--port={port}",
        "--workers=1",
        f"--backend-store-uri=sqlite:///{tmp / 'mlflow.db'}",
        f"--artifacts-destination={tmp / 'artifacts'}",
    ]
    url = f"http://127.0.0.1:{port}"
    # /health is what the compose healthcheck asks, and it stays open.
    with running_server(command, url, tmp / "server.log", env=env, ready_path="/health"):
        yield url, values["MLFLOW_ADMIN_USER"], values["MLFLOW_ADMIN_PASSWORD"]


@pytest.fixture
def logged_in(server, monkeypatch):
    url, user, password = server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv(USERNAME_ENV, user)
    monkeypatch.setenv(PASSWORD_ENV, password)
    mlflow.set_tracking_uri(url)
    yield url, user
    mlflow.set_tracking_uri(None)


def register_step(run_id: str):
    """Promotion's registry step (pipeline/promote.py), as `dandelion promote` runs it."""
    with login_errors():
        return promote.promote_if_better(
            MlflowClient(),
            NAME,
            run_id,
            f"bento-of-{run_id}",
            {"accuracy": 0.9},
            "a" * 64,
            PromoteParams(
                metric="accuracy", min_improvement=0.0, live=PromoteParams.load(PARAMS_FILE).live
            ),
            {},
        )


@pytest.mark.slow  # an MLflow server starts in ~25 s on 2 cores
def test_anonymous_clients_are_refused(server):
    url, user, password = server
    search = f"{url}/api/2.0/mlflow/experiments/search?max_results=1"
    refused = requests.get(search, timeout=30)
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"].startswith("Basic")
    wrong = requests.get(search, auth=(user, password + "x"), timeout=30)
    assert wrong.status_code == 401
    assert requests.get(search, auth=(user, password), timeout=30).status_code == 200


@pytest.mark.slow
def test_promotion_registers_with_the_login_and_stops_in_one_line_without(
    logged_in, monkeypatch, tmp_path
):
    url, user = logged_in
    use_project_store(NAME)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, activation="sigmoid")])
    with mlflow.start_run() as run:  # the model goes through the server's artifact proxy
        mlflow.keras.log_model(model, name="model", pip_requirements=["keras"])
    champion, promoted = register_step(run.info.run_id)
    assert promoted and champion.run_id == run.info.run_id
    assert MlflowClient().get_model_version_by_alias(NAME, "champion").version == "1"

    # A wrong password, then none: not "no champion yet", but a line saying what to set.
    monkeypatch.setenv(PASSWORD_ENV, "not-the-password")
    with pytest.raises(StageError) as wrong:
        register_step(run.info.run_id)
    assert str(wrong.value) == (
        f"the MLflow server {url} refused the login of {user}: check {USERNAME_ENV} and "
        f"{PASSWORD_ENV}"
    )
    monkeypatch.delenv(USERNAME_ENV)
    monkeypatch.delenv(PASSWORD_ENV)
    with pytest.raises(StageError, match=f"requires a login: set {USERNAME_ENV} and"):
        register_step(run.info.run_id)

    # The command itself: one line on stderr, no traceback, before anything else is done.
    shutil.copy(REPO_ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": url}
    result = dandelion(tmp_path, "promote", env=env)
    assert result.returncode == 1
    assert result.stderr == (
        f"promote: the MLflow server {url} requires a login: set {USERNAME_ENV} and "
        f"{PASSWORD_ENV}\n"
    )
