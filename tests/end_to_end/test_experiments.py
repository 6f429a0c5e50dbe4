"""A queued `dvc exp run` sweep in a copy of the reproduced repo, as docs/experiments.md shows it.

Each experiment runs in DVC's temporary copy of the repo; its MLflow run must land in the
workspace's own store, named after the experiment. The README's `dvc exp show` command prints
the sweep in at most 120 columns.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from pipeline.tracking import EXPERIMENT
from tests.support.dvc import dvc, stages_run
from tests.support.git import git
from tests.support.paths import EVALUATE_METRICS
from tests.support.processes import dandelion
from tests.support.readme import run_readme_command

pytestmark = pytest.mark.slow

LEARNING_RATES = [0.001, 0.0001]
# Small: the sweep trains on the reproduced features for a few epochs only.
SWEEP = ["-S", "train.learning_rate=" + ",".join(map(str, LEARNING_RATES)), "-S", "train.epochs=5"]


def queue_states(workspace, env) -> dict[str, str]:
    """Experiment name -> state (Queued, Running, Success, Failed...) from `dvc queue status`."""
    status = dvc(workspace, "queue", "status", env=env)
    assert status.returncode == 0, status.stderr
    rows = (line.split() for line in status.stdout.splitlines())
    return {row[1]: row[-1] for row in rows if len(row) >= 4 and row[0] != "Task"}


def run_queued_sweep(workspace, env, timeout=600) -> list[str]:
    """Queue the sweep, start a worker as docs/experiments.md does, wait (bounded) until done."""
    queued = dvc(workspace, "exp", "run", "--queue", *SWEEP, "evaluate", env=env)
    assert queued.returncode == 0, queued.stderr
    names = re.findall(r"Queued experiment '([\w-]+)'", queued.stdout)
    assert len(names) == len(LEARNING_RATES), queued.stdout
    try:
        started = dvc(workspace, "queue", "start", env=env)
        assert started.returncode == 0, started.stderr
        deadline = time.monotonic() + timeout
        while True:
            states = queue_states(workspace, env)
            if all(states.get(name) in ("Success", "Failed") for name in names):
                break
            assert time.monotonic() < deadline, f"sweep still running after {timeout} s: {states}"
            time.sleep(5)
    finally:
        dvc(workspace, "queue", "stop", "--kill", env=env)  # no worker outlives the test
    for name in names:
        logs = dvc(workspace, "queue", "logs", name, env=env)
        assert states[name] == "Success", logs.stdout + logs.stderr
    return names


def experiments_shown(workspace, env) -> dict[str, dict]:
    """name -> {"status", "params" (train group), "metrics" (evaluate)} from `dvc exp show`."""
    shown = dvc(workspace, "exp", "show", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    experiments = {}
    for baseline in json.loads(shown.stdout):
        for experiment in baseline.get("experiments") or []:
            (rev,) = experiment["revs"]
            data = rev["data"]
            experiments[experiment["name"]] = {
                "params": data["params"]["params.yaml"]["data"]["train"],
                "metrics": data["metrics"][EVALUATE_METRICS]["data"]["test"],
            }
    return experiments


def readme_table(workspace, env) -> list[str]:
    """The lines the README's `dvc exp show` command prints in ``workspace``."""
    shown = run_readme_command("dvc exp show ", workspace, env, timeout=300)
    assert shown.returncode == 0, shown.stderr
    return shown.stdout.splitlines()


def test_queued_sweep_is_shown_tracked_and_the_best_applied(pipeline_copy, reproduced, tmp_path):
    workspace = pipeline_copy
    env = dict(reproduced.env, BENTOML_HOME=str(tmp_path / "bentoml_home"))
    # Start without an MLflow store, so the first run to create one is a queued experiment's,
    # in its temporary copy: the hard case. (A copied store would also point at the original.)
    (workspace / "mlflow.db").unlink()
    shutil.rmtree(workspace / "mlruns")
    git(workspace, "add", "-A")
    git(workspace, "commit", "-q", "--allow-empty", "-m", "reproduced baseline")

    names = run_queued_sweep(workspace, env)

    # Both experiments are listed with their own params and evaluate metrics.
    experiments = experiments_shown(workspace, env)
    assert set(experiments) == set(names)
    assert sorted(e["params"]["learning_rate"] for e in experiments.values()) == sorted(
        LEARNING_RATES
    )
    for experiment in experiments.values():
        assert experiment["params"]["epochs"] == 5
        # A model that learnt something: chance is 0.5, and the slower of the two, 5 epochs
        # at learning rate 1e-4, gives 0.83 (deterministic training: the same every run).
        assert experiment["metrics"]["accuracy"] >= 0.8

    # The README's table: a row per experiment, the two varied params and the test metrics
    # it keeps, no dependency (md5) column, in at most 120 columns.
    table = readme_table(workspace, env)
    assert max(map(len, table)) <= 120, "\n".join(table)
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert header == [
        "Experiment",
        "test.accuracy",
        "test.roc_auc",
        "train.epochs",
        "train.learning_rate",
    ], table[0]
    assert all(any(name in row for row in table) for name in names), table

    # One MLflow run per experiment, named after it, in the workspace's store (not the
    # temporary copies), with the experiment's params, test metrics and model artifacts.
    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlflow.db'}")
    try:
        runs = mlflow.search_runs(
            experiment_names=[EXPERIMENT],
            filter_string="attributes.status = 'FINISHED'",
            output_format="list",
        )
        # MLflow's own "Default" experiment too: created with the store, by a queued run.
        default_experiment = mlflow.get_experiment_by_name("Default")
        models = {
            run.info.run_name: mlflow.search_logged_models(
                experiment_ids=[run.info.experiment_id],
                filter_string=f"source_run_id = '{run.info.run_id}'",
                output_format="list",
            )
            for run in runs
        }
    finally:
        mlflow.set_tracking_uri(None)
    assert sorted(run.info.run_name for run in runs) == sorted(names)
    assert default_experiment.artifact_location.startswith(str(workspace / "mlruns"))
    for run in runs:
        shown = experiments[run.info.run_name]
        assert float(run.data.params["train.learning_rate"]) == shown["params"]["learning_rate"]
        assert run.data.metrics["test_accuracy"] == pytest.approx(shown["metrics"]["accuracy"])
        assert run.info.artifact_uri.startswith((workspace / "mlruns").as_uri())
        (model,) = models[run.info.run_name]
        model_dir = Path(model.artifact_location.removeprefix("file://"))
        assert model_dir.is_relative_to(workspace / "mlruns") and (model_dir / "MLmodel").is_file()

    # Applying the better experiment brings its params and metrics into the workspace.
    best = max(experiments, key=lambda n: (experiments[n]["metrics"]["accuracy"], n))
    applied = dvc(workspace, "exp", "apply", best, env=env)
    assert applied.returncode == 0, applied.stderr
    train_params = yaml.safe_load((workspace / "params.yaml").read_text())["train"]
    assert train_params["learning_rate"] == experiments[best]["params"]["learning_rate"]
    assert train_params["epochs"] == 5
    metrics = json.loads((workspace / EVALUATE_METRICS).read_text())["test"]
    assert metrics == pytest.approx(experiments[best]["metrics"])

    # ... and `dvc repro` takes it from there: the sweep ran up to `evaluate`, so only the
    # stages after it (the bento and the PNGs of the plots) are out of date.
    packaged = dvc(workspace, "repro", env=env)
    assert packaged.returncode == 0, packaged.stdout + packaged.stderr
    assert stages_run(packaged.stdout) == ["package", "plots"]
    # The store started empty, so promoting the applied experiment makes it the first champion.
    promoted = dandelion(workspace, "promote", env=env)
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    assert "promoted to champion; champion is version 1" in promoted.stdout, promoted.stdout
