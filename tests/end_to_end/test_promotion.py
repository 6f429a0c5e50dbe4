"""`dandelion promote` on the reproduced pipeline: idempotent, gated, and deploying the
champion's bento from MLflow to a fresh BentoML store."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient

from pipeline.bento import bento_version_of
from serving.contract import MODEL_NAME
from tests.support.dvc import dvc, set_param
from tests.support.paths import PIPELINE_PATHS
from tests.support.processes import dandelion


@pytest.mark.slow
def test_promotion_of_the_reproduced_pipeline_is_idempotent_and_gated(
    reproduced, promoted, pipeline_copy, tmp_path
):
    """After the session's promotion: a rerun changes nothing; a stale pipeline is refused;
    a worse bento is not promoted, and a fresh BentoML store gets the champion from MLflow."""
    champion_bento = bento_version_of(reproduced.workspace / PIPELINE_PATHS["bento_archive"])
    assert "promoted to champion; champion is version 1" in promoted.stdout, promoted.stdout
    again = dandelion(reproduced.workspace, "promote", env=reproduced.env)
    assert again.returncode == 0, again.stderr
    assert "already champion; champion is version 1" in again.stdout, again.stdout

    workspace = pipeline_copy
    env = dict(reproduced.env, BENTOML_HOME=str(tmp_path / "fresh_bentoml_home"))
    set_param(workspace, "evaluate.threshold", 0.99)  # nearly everything becomes grass
    stale = dandelion(workspace, "promote", env=env)
    assert stale.returncode != 0 and "not up to date" in stale.stderr, stale.stderr
    assert dvc(workspace, "repro", env=env).returncode == 0
    # The opt-in cross-validation may lag behind: it does not hold promotion up.
    set_param(workspace, "crossval.folds", 3)
    assert "crossval" in dvc(workspace, "status", env=env).stdout

    worse = dandelion(workspace, "promote", env=env)
    assert worse.returncode == 0, worse.stderr
    assert "not promoted" in worse.stdout and "champion is version 1" in worse.stdout
    latest = tmp_path / "fresh_bentoml_home" / "bentos" / MODEL_NAME / "latest"
    assert f"{MODEL_NAME}:{latest.read_text()}" == champion_bento
    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlflow.db'}")
    try:
        assert len(MlflowClient().search_model_versions(f"name='{MODEL_NAME}'")) == 1
    finally:
        mlflow.set_tracking_uri(None)
