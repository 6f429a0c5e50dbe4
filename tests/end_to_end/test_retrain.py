"""The steps of .github/workflows/retrain.yml on a copy of the reproduced repo, minus GitHub.

A change to the catalogue reaches main; retraining (`dvc repro`) reruns everything from
`download` on, and the report script tells the workflow to open a pull request. A scheduled
run with nothing new must not. Once such a pull request is merged, the workflow's promote job
runs `dandelion promote` on main. (`cml pr create` and GitHub itself cannot run here.)
"""

from __future__ import annotations

import csv
import json

import pytest

from tests.support.dvc import dvc, set_param, stages_run
from tests.support.git import git
from tests.support.http import serve_directory
from tests.support.paths import EVALUATE_METRICS, PIPELINE_PATHS, PIPELINE_STAGES
from tests.support.report import run_report

pytestmark = pytest.mark.slow

DROPPED_PER_CLASS = 10  # 190 photos per class stay, above download.min_per_class


def retrain_and_report(workspace, env, tmp_path) -> tuple[list[str], str, str]:
    """`dvc repro`, then the report against HEAD: (stages run, report, step output)."""
    repro = dvc(workspace, "repro", env=env)
    assert repro.returncode == 0, repro.stdout + repro.stderr
    report = run_report(workspace, "HEAD", tmp_path, env=env)
    assert report.result.returncode == 0, report.result.stderr
    return stages_run(repro.stdout), report.markdown.read_text(), report.github_output.read_text()


def test_a_catalogue_change_retrains_and_asks_for_a_pull_request(
    pipeline_copy, reproduced, dataset_mirror, tmp_path
):
    workspace, env = pipeline_copy, reproduced.env
    with serve_directory(dataset_mirror) as mirror_url:
        # Where the photos come from is not a dependency (see dvc.yaml): nothing reruns.
        set_param(workspace, "download.base_url", f"{mirror_url}/data")
        git(workspace, "add", "-A")
        git(workspace, "commit", "-qm", "reproduced main")

        stages, report, output = retrain_and_report(workspace, env, tmp_path)
        assert stages == [] and "metrics_changed=false" in output  # scheduled run, no news

        catalogue = workspace / PIPELINE_PATHS["catalogue"]
        with catalogue.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        kept = [
            row for row in rows if int(row["filename"].removesuffix(".jpg")) >= DROPPED_PER_CLASS
        ]
        with catalogue.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(kept)
        git(workspace, "commit", "-qam", "catalogue: drop 10 photos per class")

        stages, report, output = retrain_and_report(workspace, env, tmp_path)

    assert stages == PIPELINE_STAGES
    assert "metrics_changed=true" in output
    download = json.loads((workspace / PIPELINE_PATHS["download_report"]).read_text())
    assert {label: c["ok"] for label, c in download["classes"].items()} == {
        "dandelion": 200 - DROPPED_PER_CLASS,
        "grass": 200 - DROPPED_PER_CLASS,
    }
    assert f"| {PIPELINE_PATHS['train_dir']}/metrics.json" in report and "Change" in report
    changed = git(workspace, "status", "--porcelain").stdout
    assert "dvc.lock" in changed and EVALUATE_METRICS in changed, changed
