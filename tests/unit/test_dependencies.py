"""Every stage declares everything it runs: DVC can only rerun a stage for a change it knows of.

For each stage in dvc.yaml, the project modules its command imports (transitively, read with
`ast`) must be among its deps, and the stage that builds the bento must also declare every file
`bentofile.yaml` puts in it. The service itself may import only what the bento ships.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest
import yaml

from pipeline.bento import included_files
from tests.support.paths import PIPELINE_PATHS, REPO_ROOT
from tests.support.processes import python_module

PACKAGES = ("stages", "pipeline", "serving", "alert_relay")  # the project's own top-level packages


def module_file(module: str) -> Path | None:
    """The project file defining ``module`` (e.g. stages.split), or None if not ours."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = REPO_ROOT / module.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Absolute module names ``path`` imports anywhere (``from a import b``: a, and a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def project_files_imported(module: str) -> set[str]:
    """Repo-relative files Python runs for ``python -m module``: it, its imports and their
    packages' ``__init__.py``, transitively."""
    seen: set[Path] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a, a.b and a.b.c
            path = module_file(".".join(parts[:depth]))
            if path is not None and path not in seen:
                seen.add(path)
                pending.extend(imported_modules(path))
    return {path.relative_to(REPO_ROOT).as_posix() for path in seen}


def undeclared(required: set[str], deps: list[str]) -> list[str]:
    """Files in ``required`` that no dep (a file, or a directory above it) covers."""
    return sorted(
        path for path in required if not any(path == d or path.startswith(d + "/") for d in deps)
    )


def stage_requirements(stage: dict) -> set[str]:
    """The project files a dvc.yaml stage runs, plus the bento's files if it builds one."""
    (module,) = re.findall(r"python -m ([\w.]+)", stage["cmd"])
    required = project_files_imported(module)
    if "stages/package.py" in required:
        required |= {path.relative_to(REPO_ROOT).as_posix() for path in bento_files()}
    return required


def bento_files() -> list[Path]:
    return included_files(REPO_ROOT / "bentofile.yaml")


DVC_YAML = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
# The opt-in cross-validation pipeline (run from the repo root: wdir ..).
CROSSVAL_YAML = yaml.safe_load((REPO_ROOT / "crossval/dvc.yaml").read_text())
STAGES = {
    **DVC_YAML["stages"],
    **{f"crossval/dvc.yaml:{name}": stage for name, stage in CROSSVAL_YAML["stages"].items()},
}


def declared_deps(stage: dict) -> list[str]:
    def expand(dep: str) -> str:  # ${model_dir} -> data/model
        return re.sub(r"\$\{(\w+)\}", lambda m: PIPELINE_PATHS[m.group(1)], dep)

    return [expand(dep) for dep in stage["deps"]]


@pytest.mark.parametrize("name", list(STAGES))
def test_stage_declares_every_project_file_it_runs(name):
    stage = STAGES[name]
    assert undeclared(stage_requirements(stage), declared_deps(stage)) == []


def test_the_crossval_pipeline_reads_the_paths_dvc_yaml_declares():
    """crossval/dvc.yaml cannot share dvc.yaml's vars: its paths must be the same ones."""
    (stage,) = CROSSVAL_YAML["stages"].values()
    assert stage["wdir"] == ".."
    declared = set(PIPELINE_PATHS.values())
    arguments = stage["cmd"].split()[3:]  # python -m stages.crossval <paths>
    assert arguments and set(arguments) <= declared
    for dep in stage["deps"]:
        if dep.startswith(("data/", "results/")):
            assert dep in declared or Path(dep).parent.as_posix() in declared, dep
    (out,) = [next(iter(o)) if isinstance(o, dict) else o for o in stage["outs"]]
    assert out == PIPELINE_PATHS["crossval_dir"]


def test_bytecode_caches_in_a_directory_dependency_are_not_part_of_its_hash():
    """Python writes ``__pycache__/<module>.cpython-3XX.pyc`` beside what it imports (unless
    PYTHONDONTWRITEBYTECODE is set): in a directory a stage depends on, such files would make
    its hash, and so dvc.lock, depend on who imported what with which Python."""
    directories = sorted(
        {dep for stage in STAGES.values() for dep in declared_deps(stage)}
        & {path.name for path in REPO_ROOT.iterdir() if path.is_dir()}
    )
    assert "serving" in directories  # the package stage's
    caches = [f"{directory}/__pycache__/module.cpython-312.pyc" for directory in directories]
    for cache in caches:
        ignored = python_module("dvc", REPO_ROOT, "check-ignore", cache, env=dict(os.environ))
        assert ignored.returncode == 0, f"DVC would hash {cache}"
