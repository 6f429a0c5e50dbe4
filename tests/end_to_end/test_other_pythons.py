"""The committed dvc.lock, byte for byte, from a cold `dvc repro` on every supported Python.

The rest of the full tier runs on one interpreter (3.11 in .ci/run). Here each other version
that pyproject.toml's requires-python admits (or those LOCK_PYTHONS names) gets a fresh venv
with the pinned packages, and the whole pipeline runs in a fresh copy of this repo as a user
would run it: empty cache, Git-tracked results removed, bytecode caches written. Every output
md5 must equal the committed one, and no Git-tracked file may change, so a checkout served
from there is clean.

An interpreter that is not installed fails the test in CI (``CI`` set) and skips it elsewhere,
as the Debian tools do (tests/support/needs.py).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.support.dvc import pipeline_env, remove_git_tracked_outputs, stages_run
from tests.support.git import copy_workspace, git
from tests.support.http import serve_directory
from tests.support.paths import PIPELINE_STAGES, REPO_ROOT
from tests.support.pythons import interpreter, lock_pythons

pytestmark = pytest.mark.slow

INSTALL_SECONDS = 1800  # a cold pip cache downloads TensorFlow's wheel for each Python
REPRO_SECONDS = 900  # a cold `dvc repro` takes minutes
PYTHONS = lock_pythons()


@pytest.fixture(scope="module")
def venvs(tmp_path_factory) -> dict:
    """For each of PYTHONS that is installed, a venv being made with this project's pinned
    packages (constraints.txt), all at once: pip is mostly one core's work, and the machines
    have two. A test waits for its own."""
    root = tmp_path_factory.mktemp("pythons")
    source = copy_workspace(root / "source")
    installs = {}
    for version in PYTHONS:
        python = interpreter(version)
        if python is None:
            continue
        venv = root / f"venv-{version}"
        subprocess.run([str(python), "-m", "venv", str(venv)], check=True)
        install = [venv / "bin" / "pip", "install", "-q", "-c", "constraints.txt", "-e", "."]
        log = (root / f"pip-{version}.log").open("w")
        process = subprocess.Popen(install, cwd=source, stdout=log, stderr=subprocess.STDOUT)
        installs[version] = (venv, process, log)
    yield installs
    for _, process, log in installs.values():
        process.kill()
        process.wait()
        log.close()


def venv_of(version: str, venvs: dict):
    """The venv of Python ``version``, once its install has finished."""
    if version not in venvs:
        message = f"Python {version} is not installed (or set LOCK_PYTHONS to the versions here)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    venv, process, log = venvs[version]
    assert process.wait(timeout=INSTALL_SECONDS) == 0, Path(log.name).read_text()
    return venv


@pytest.mark.timeout(INSTALL_SECONDS + REPRO_SECONDS)  # beyond pyproject's per-test limit
@pytest.mark.parametrize("version", PYTHONS)
def test_a_cold_repro_on_python_gives_the_committed_dvc_lock(
    version, venvs, dataset_mirror, keras_home, tmp_path
):
    venv = venv_of(version, venvs)  # the project installed in editable mode from elsewhere:
    workspace = copy_workspace(tmp_path / "repo")  # `python -m stages.*` runs the copy's code
    remove_git_tracked_outputs(workspace)
    env = pipeline_env(keras_home, tmp_path / "bentoml_home")
    env = dict(env, PATH=os.pathsep.join([str(venv / "bin"), env["PATH"]]), VIRTUAL_ENV=str(venv))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as on a user's machine: __pycache__ is written
    with serve_directory(dataset_mirror) as mirror_url:
        env["DOWNLOAD_BASE_URL"] = f"{mirror_url}/data"
        cold = subprocess.run(
            [venv / "bin" / "dvc", "repro"],
            cwd=workspace,
            env=env,
            capture_output=True,
            text=True,
            timeout=REPRO_SECONDS,
        )
    assert cold.returncode == 0, cold.stdout + cold.stderr
    assert stages_run(cold.stdout) == PIPELINE_STAGES
    assert (workspace / "dvc.lock").read_text() == (REPO_ROOT / "dvc.lock").read_text()
    # Results, plots and params.yaml as committed: the served card says the revision is clean.
    assert git(workspace, "status", "--porcelain").stdout == ""
