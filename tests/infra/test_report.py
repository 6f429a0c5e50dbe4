"""The pull-request report script (.github/scripts/report.py) on two revisions of a temp repo.

The base revision holds this repo's committed results of a real run; the second changes a
train param and the test metrics, as a retrained model would.
"""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from tests.support.dvc import set_param
from tests.support.git import copy_workspace, git
from tests.support.paths import EVALUATE_METRICS, PIPELINE_PATHS
from tests.support.report import run_report

CONFUSION = f"{PIPELINE_PATHS['evaluate_dir']}/plots/sklearn/confusion_matrix.json"


def table_row(markdown: str, *cells: str) -> list[str]:
    """Cells of the Markdown table row whose first cells are ``cells``."""
    for line in markdown.splitlines():
        row = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if row[: len(cells)] == list(cells):
            return row
    raise AssertionError(f"no row {cells} in:\n{markdown}")


@pytest.fixture
def two_revisions(tmp_path):
    """A repo whose HEAD~1 is this project's results and HEAD a retrained variant."""
    workspace = copy_workspace(tmp_path / "repo")
    before = json.loads((workspace / EVALUATE_METRICS).read_text())["test"]
    after = dict(before, accuracy=0.75, f1=0.7)
    (workspace / EVALUATE_METRICS).write_text(json.dumps({"test": after}, indent=4) + "\n")
    confusion = json.loads((workspace / CONFUSION).read_text())
    confusion[0]["predicted"] = "grass" if confusion[0]["predicted"] == "dandelion" else "dandelion"
    (workspace / CONFUSION).write_text(json.dumps(confusion))
    set_param(workspace, "train.dropout", 0.2)
    git(workspace, "commit", "-qam", "retrained")
    return workspace, before, after


def test_report_tables_hold_before_and_after_and_the_plots_exist(two_revisions, tmp_path):
    workspace, before, after = two_revisions
    run = run_report(workspace, "HEAD~1", tmp_path)
    assert run.result.returncode == 0, run.result.stderr
    markdown = run.markdown.read_text()

    accuracy = table_row(markdown, EVALUATE_METRICS, "test.accuracy")
    assert accuracy[2:] == [f"{before['accuracy']:.4g}", "0.75", f"{0.75 - before['accuracy']:.4g}"]
    recall = table_row(markdown, EVALUATE_METRICS, "test.recall")  # unchanged, still listed
    assert float(recall[2]) == float(recall[3]) == pytest.approx(before["recall"], abs=1e-4)
    assert table_row(markdown, "params.yaml", "train.dropout")[2:] == ["0.5", "0.2"]
    assert "metrics_changed=true" in run.github_output.read_text()

    images = re.findall(r"!\[([^\]]+)\]\(\./([^)]+)\)", markdown)
    assert [name for name, _ in images] == [
        "Confusion matrix",
        "Learning curves (loss)",
        "Learning curves (accuracy)",
    ]
    for _, file_name in images:
        with Image.open(run.markdown.parent / file_name) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200


def test_report_against_itself_says_nothing_changed(two_revisions, tmp_path):
    workspace, _, after = two_revisions
    run = run_report(workspace, "HEAD", tmp_path)
    assert run.result.returncode == 0, run.result.stderr
    markdown = run.markdown.read_text()
    assert "No metric changed." in markdown and "No parameter changed." in markdown
    assert "held out from training" not in markdown  # no production test set: no note
    assert table_row(markdown, EVALUATE_METRICS, "test.accuracy")[2:4] == ["0.75", "0.75"]
    assert "metrics_changed=false" in run.github_output.read_text()


def test_unknown_base_revision_is_a_clear_error(two_revisions, tmp_path):
    workspace, _, _ = two_revisions
    run = run_report(workspace, "no-such-branch", tmp_path)
    assert run.result.returncode != 0
    assert "unknown Git revision 'no-such-branch'" in run.result.stderr
    assert not run.markdown.exists()


def test_production_test_metrics_appear_beside_the_tests_with_a_note(two_revisions, tmp_path):
    """Reviewed photos accepted: production_test.* rows appear (absent at the base), with a
    note that that set is not the same photos before and after, while test.* is."""
    workspace, _, after = two_revisions
    production = dict(after, photos=12, accuracy=0.8333333333333334)
    metrics = {"test": after, "production_test": production}
    (workspace / EVALUATE_METRICS).write_text(json.dumps(metrics, indent=4) + "\n")
    git(workspace, "commit", "-qam", "reviewed photos accepted")
    run = run_report(workspace, "HEAD~1", tmp_path)
    assert run.result.returncode == 0, run.result.stderr
    markdown = run.markdown.read_text()
    assert table_row(markdown, EVALUATE_METRICS, "production_test.accuracy")[2:4] == [
        "-",
        "0.8333",
    ]
    assert table_row(markdown, EVALUATE_METRICS, "production_test.photos")[2:4] == ["-", "12"]
    assert table_row(markdown, EVALUATE_METRICS, "test.accuracy")[2:4] == ["0.75", "0.75"]
    assert (
        "The `production_test.*` metrics are on reviewed photos held out from training: none at "
        "`HEAD~1`, 12 here." in markdown
    )
