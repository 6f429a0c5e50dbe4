"""The review of feedback (``dandelion review``): a small Git + DVC project to review into."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.support.git import git
from tests.support.paths import REPO_ROOT


def review_project(root: Path) -> Path:
    """A Git + DVC repository at ``root`` with the project's dvc.yaml, params.yaml and
    catalogue, and nothing reviewed yet: what `dandelion review accept` writes into."""
    from dvc.repo import Repo

    (root / "data").mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", "data/catalogue.csv"):
        shutil.copyfile(REPO_ROOT / name, root / name)
    git(root, "init", "-q", "-b", "main")
    Repo.init(str(root)).close()  # the API: no analytics, no network
    return root


def tree_bytes(root: Path, *names: str) -> dict[str, bytes]:
    """Every file under ``root``'s ``names`` (files or directories), with its bytes."""
    found = {}
    for name in names:
        path = root / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        found |= {file.relative_to(root).as_posix(): file.read_bytes() for file in files}
    return found
