"""End to end: `dvc repro` in a copy of this repo, on the real photos served from 127.0.0.1."""

from __future__ import annotations

import json
import socket

import pytest

from tests.support.dvc import (
    dvc,
    output_paths,
    remove_git_tracked_outputs,
    set_param,
    stages_run,
)
from tests.support.git import copy_workspace, git
from tests.support.http import serve_directory
from tests.support.paths import PIPELINE_PATHS, PIPELINE_STAGES, REPO_ROOT

STAGES = PIPELINE_STAGES
# The frozen ImageNet backbone separates the classes well (0.955 5-fold CV accuracy for a
# logistic regression on its features). On a 60-photo test split one photo is 1.7 points;
# 0.85 leaves room for ~3 standard errors of sampling noise below a true 0.95 while still
# failing any model that learned little (random init scores ~0.5-0.7 here).
MIN_TEST_ACCURACY = 0.85

pytestmark = pytest.mark.slow


def evaluate_metrics(workspace, env) -> dict:
    result = dvc(workspace, "metrics", "show", "--json", env=env)
    assert result.returncode == 0, result.stderr
    (workspace_metrics,) = json.loads(result.stdout).values()  # keyed by revision ("" here)
    files = workspace_metrics["data"]
    (metrics,) = [entry["data"] for path, entry in files.items() if "evaluate" in path]
    return metrics


def test_cold_repro_runs_every_stage_on_all_photos(reproduced):
    # evaluate's outputs are all in Git (cache: false). The clone's train reproduces the
    # committed model bit for bit, so DVC finds evaluate's committed results up to date.
    assert stages_run(reproduced.cold.stdout) == [s for s in STAGES if s != "evaluate"]
    assert "Stage 'evaluate' didn't change, skipping" in reproduced.cold.stdout
    download_report = json.loads(
        (reproduced.workspace / PIPELINE_PATHS["download_report"]).read_text()
    )
    ok = {label: result["ok"] for label, result in download_report["classes"].items()}
    assert ok == {"dandelion": 200, "grass": 200}
    metrics = evaluate_metrics(reproduced.workspace, reproduced.env)["test"]
    assert set(metrics) >= {"accuracy", "precision", "recall", "f1", "roc_auc"}
    assert metrics["accuracy"] >= MIN_TEST_ACCURACY, metrics
    (archive,) = [p for p in output_paths(reproduced.workspace) if p.endswith(".bento")]
    assert (reproduced.workspace / archive).stat().st_size > 1_000_000  # code + model


def test_reproduced_pipeline_is_up_to_date_and_its_plots_render(reproduced):
    workspace, env = reproduced.workspace, reproduced.env
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


def test_changing_a_train_param_reruns_only_what_depends_on_it(pipeline_copy, reproduced):
    set_param(pipeline_copy, "train.dropout", 0.3)
    changed = dvc(pipeline_copy, "repro", env=reproduced.env)
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert stages_run(changed.stdout) == ["train", "export", "evaluate", "package", "plots"]


def test_a_second_clean_run_elsewhere_gives_the_committed_dvc_lock_byte_for_byte(
    reproduced, dataset_mirror, tmp_path
):
    """Another directory, another mirror port, empty cache, no committed results: the same
    dvc.lock, every md5 of every output (model directory and bento archive included), and the
    one committed here; every result file comes out as committed."""
    workspace = copy_workspace(tmp_path / "somewhere" / "else")
    remove_git_tracked_outputs(workspace)
    with serve_directory(dataset_mirror) as mirror_url:
        mirror = dict(reproduced.env, DOWNLOAD_BASE_URL=f"{mirror_url}/data")
        second = dvc(workspace, "repro", env=mirror)
    assert second.returncode == 0, second.stdout + second.stderr
    assert stages_run(second.stdout) == STAGES
    first_lock = (reproduced.workspace / "dvc.lock").read_text()
    assert (workspace / "dvc.lock").read_text() == first_lock
    assert (REPO_ROOT / "dvc.lock").read_text() == first_lock, "commit the regenerated dvc.lock"
    # The mirror came through DOWNLOAD_BASE_URL: nothing tracked changed, not even params.yaml.
    assert git(workspace, "status", "--porcelain").stdout == ""


def test_editing_image_decoding_makes_packaging_out_of_date(pipeline_copy, reproduced):
    """The bento ships serving/contract.py: a change there must rebuild it, even one (here,
    transparent images only) that leaves every preprocessed array as it was."""
    contract = pipeline_copy / "serving" / "contract.py"
    source = contract.read_text()
    assert "WHITE = (255, 255, 255)" in source
    contract.write_text(source.replace("WHITE = (255, 255, 255)", "WHITE = (250, 250, 250)"))
    status = dvc(pipeline_copy, "status", "--json", env=reproduced.env)
    assert status.returncode == 0, status.stderr
    assert {"preprocess", "package"} <= set(json.loads(status.stdout)), status.stdout


def test_a_download_that_fails_offline_leaves_every_tracked_file_as_it_was(
    pipeline_copy, reproduced
):
    with socket.socket() as closed:  # a port nothing listens on: no server, as offline
        closed.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{closed.getsockname()[1]}/data"
    offline = dict(reproduced.env, DOWNLOAD_BASE_URL=nowhere)
    failed = dvc(pipeline_copy, "repro", "--force", "download", env=offline)
    assert failed.returncode != 0
    assert f"download failed: cannot reach {nowhere}" in failed.stdout + failed.stderr
    assert "DOWNLOAD_BASE_URL=" in failed.stdout + failed.stderr  # names the way out
    # The committed report persists while the stage runs (dvc.yaml): nothing tracked changed.
    assert git(pipeline_copy, "status", "--porcelain").stdout == ""
