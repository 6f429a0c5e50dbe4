"""End to end: `dvc repro` in a copy of this repo, on the real photos served from 127.0.0.1."""

from __future__ import annotations

import json
import re

import pytest
from support import copy_workspace, dvc, pipeline_env, serve_directory, set_param

STAGES = ["download", "split", "preprocess", "train", "evaluate"]
# The frozen ImageNet backbone separates the classes well (0.955 5-fold CV accuracy for a
# logistic regression on its features). On a 60-photo test split one photo is 1.7 points;
# 0.85 leaves room for ~3 standard errors of sampling noise below a true 0.95 while still
# failing any model that learned little (random init scores ~0.5-0.7 here).
MIN_TEST_ACCURACY = 0.85


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", output)


def evaluate_metrics(workspace, env) -> dict:
    result = dvc(workspace, "metrics", "show", "--json", env=env)
    assert result.returncode == 0, result.stderr
    (workspace_metrics,) = json.loads(result.stdout).values()  # keyed by revision ("" here)
    files = workspace_metrics["data"]
    (metrics,) = [entry["data"] for path, entry in files.items() if "evaluate" in path]
    return metrics


@pytest.mark.slow
def test_dvc_repro_rebuilds_everything_then_only_what_changed(tmp_path, dataset_mirror, keras_home):
    workspace = copy_workspace(tmp_path / "repo")
    env = pipeline_env(keras_home)
    with serve_directory(dataset_mirror) as mirror_url:
        set_param(workspace, "download.base_url", f"{mirror_url}/data")

        cold = dvc(workspace, "repro", env=env)
        assert cold.returncode == 0, cold.stdout + cold.stderr
        assert stages_run(cold.stdout) == STAGES

        download_report = json.loads((workspace / "results/download.json").read_text())
        assert {label: r["ok"] for label, r in download_report["classes"].items()} == {
            "dandelion": 200,
            "grass": 200,
        }
        metrics = evaluate_metrics(workspace, env)
        assert set(metrics) >= {"accuracy", "precision", "recall", "f1", "roc_auc"}
        assert metrics["accuracy"] >= MIN_TEST_ACCURACY, metrics

        status = dvc(workspace, "status", "--json", env=env)
        assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout

        plots = dvc(workspace, "plots", "show", "--json", env=env)
        assert plots.returncode == 0, plots.stderr
        rendered = json.loads(plots.stdout)["data"]
        assert set(rendered) == {
            "Learning curves (loss)",
            "Learning curves (accuracy)",
            "Confusion matrix",
            "ROC",
        }
        assert all(plot[0]["content"]["data"]["values"] for plot in rendered.values())

        noop = dvc(workspace, "repro", env=env)
        assert noop.returncode == 0, noop.stderr
        assert stages_run(noop.stdout) == []

        set_param(workspace, "train.dropout", 0.3)
        changed = dvc(workspace, "repro", env=env)
        assert changed.returncode == 0, changed.stdout + changed.stderr
        assert stages_run(changed.stdout) == ["train", "evaluate"]
