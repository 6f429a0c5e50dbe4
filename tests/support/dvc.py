"""DVC in a workspace copy: its environment, commands, params and cached outputs."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from pipeline.weights import IMAGENET_WEIGHTS_FILE
from tests.support.paths import WEIGHTS_FILE
from tests.support.processes import python_module, with_interpreter_tools


def prepare_keras_home(keras_home: Path) -> Path:
    """A KERAS_HOME whose cache holds the offline ImageNet backbone (copied, as its README says)."""
    models = keras_home / "models"
    models.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(WEIGHTS_FILE, models / IMAGENET_WEIGHTS_FILE)
    return keras_home


def pipeline_env(keras_home: Path, bentoml_home: Path) -> dict[str, str]:
    """Environment for running ``dvc`` in a workspace copy with this interpreter's tools."""
    env = dict(
        os.environ,
        KERAS_HOME=str(keras_home),
        BENTOML_HOME=str(bentoml_home),
        BENTOML_DO_NOT_TRACK="true",
    )
    env.pop("MLFLOW_TRACKING_URI", None)  # the workspace's own default store
    return with_interpreter_tools(env)


def dvc(workspace: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return python_module("dvc", workspace, *args, env=env)


def stages_run(dvc_output: str) -> list[str]:
    """The stages a `dvc repro` / `dvc exp run` ran, in order, from its output."""
    return re.findall(r"Running stage '(\w+)'", dvc_output)


def set_param(workspace: Path, dotted_key: str, value) -> None:
    """Set ``dotted_key`` (say ``train.dropout``) in the workspace's params.yaml."""
    path = workspace / "params.yaml"
    params = yaml.safe_load(path.read_text())
    *parents, leaf = dotted_key.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def output_paths(workspace) -> list[str]:
    """Every output DVC caches (and so pushes), as the pipeline declares them."""
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo:
        return sorted(out.def_path for out in repo.index.outs if out.use_cache)


def remove_git_tracked_outputs(workspace: Path) -> list[str]:
    """Delete the outputs of dvc.yaml's stages kept in Git rather than DVC's cache (``cache:
    false``: reports, metrics, plots), so `dvc repro` must write them again; their paths."""
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo:
        dvc_yaml = os.path.join(repo.root_dir, "dvc.yaml")
        stages = [stage for stage in repo.index.stages if stage.dvcfile.path == dvc_yaml]
        paths = sorted(out.def_path for s in stages for out in s.outs if not out.use_cache)
    for name in paths:
        path = workspace / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return paths


def file_hashes(workspace, paths) -> dict[str, str]:
    hashes = {}
    for path in paths:
        root = workspace / path
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for file in files:
            hashes[str(file.relative_to(workspace))] = hashlib.sha256(file.read_bytes()).hexdigest()
    return hashes


def delete_cache_and_outputs(workspace: Path, outputs: list[str]) -> None:
    """What a fresh clone lacks: the DVC cache and every cached output."""
    shutil.rmtree(workspace / ".dvc" / "cache")
    for path in outputs:
        target = workspace / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
