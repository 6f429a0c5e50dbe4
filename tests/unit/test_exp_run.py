"""A real `dvc exp run -S` in the workspace of a small Git + DVC project holding this params.yaml
and a two-stage pipeline laid out as the real one (cached outputs, Git-tracked results):
`-S` changes one line of params.yaml, and after it and a `dvc repro` the README's return
command brings back the committed state.

No TensorFlow: the stage writes its params back, which is all DVC needs to see them change.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from tests.support.dvc import dvc, stages_run
from tests.support.git import git
from tests.support.paths import PARAMS_FILE
from tests.support.processes import with_interpreter_tools
from tests.support.readme import run_readme_command

# Outputs as the real pipeline has them: cached ones (as data/model and the bento) and
# Git-tracked results (as results/train, `cache: false`). The experiment stops at `fit`, as
# a sweep stops at `evaluate`; `dvc repro` then runs `package`, as it does after `exp apply`.
FIT = """\
import json, pathlib, yaml
train = yaml.safe_load(open("params.yaml"))["train"]
pathlib.Path("model.txt").write_text(json.dumps(train))
pathlib.Path("results").mkdir(exist_ok=True)
pathlib.Path("results/metrics.json").write_text(json.dumps({"rate": train["learning_rate"]}))
"""
PIPELINE = {
    "stages": {
        "fit": {
            "cmd": "python fit.py",
            "deps": ["fit.py"],
            "params": ["train"],
            "outs": ["model.txt", {"results": {"cache": False}}],
        },
        "package": {
            "cmd": "cp model.txt bundle.txt",
            "deps": ["model.txt"],
            "outs": ["bundle.txt"],
        },
    }
}


@pytest.fixture
def project(tmp_path) -> tuple[Path, dict[str, str]]:
    """The project, its pipeline run and committed, and the environment to run DVC in it."""
    root = tmp_path / "project"
    root.mkdir()
    env = with_interpreter_tools(dict(os.environ, DVC_NO_ANALYTICS="1"))
    git(root, "init", "-q", "-b", "main")
    # DVC commits experiments with the repository's identity: the machine may have none.
    git(root, "config", "user.name", "test")
    git(root, "config", "user.email", "test@localhost")
    assert dvc(root, "init", "-q", env=env).returncode == 0
    # As the project's .dvc/config: `dvc repro` and `dvc exp run` stage what they change.
    assert dvc(root, "config", "core.autostage", "true", env=env).returncode == 0
    shutil.copyfile(PARAMS_FILE, root / "params.yaml")
    (root / "fit.py").write_text(FIT)
    (root / "dvc.yaml").write_text(yaml.safe_dump(PIPELINE, sort_keys=False))
    ran = dvc(root, "repro", env=env)
    assert stages_run(ran.stdout) == ["fit", "package"], ran.stdout + ran.stderr
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "pipeline run")
    return root, env


def test_set_param_changes_one_line_and_the_readme_command_returns_to_the_commit(project):
    root, env = project
    committed_model = (root / "model.txt").read_text()
    rate = yaml.safe_load(PARAMS_FILE.read_text())["train"]["learning_rate"]

    ran = dvc(root, "exp", "run", "-S", f"train.learning_rate={rate / 10}", "fit", env=env)
    assert stages_run(ran.stdout) == ["fit"], ran.stdout + ran.stderr
    diff = git(root, "diff", "HEAD", "--numstat", "--", "params.yaml").stdout
    assert diff.split()[:2] == ["1", "1"], git(root, "diff", "HEAD").stdout
    assert yaml.safe_load((root / "params.yaml").read_text())["train"]["learning_rate"] == (
        rate / 10
    )
    assert (root / "model.txt").read_text() != committed_model
    # core.autostage stages the lock this writes: the return must not stop at Git's index.
    packaged = dvc(root, "repro", env=env)
    assert stages_run(packaged.stdout) == ["package"], packaged.stdout + packaged.stderr
    assert git(root, "diff", "--cached", "--name-only").stdout.split() == ["dvc.lock"]

    returned = run_readme_command("git restore ", root, env, timeout=120)
    assert returned.returncode == 0, returned.stdout + returned.stderr
    assert git(root, "status", "--porcelain").stdout == ""
    status = dvc(root, "status", env=env)
    assert status.stdout.strip() == "Data and pipelines are up to date.", status.stdout
    assert (root / "model.txt").read_text() == (root / "bundle.txt").read_text() == committed_model
