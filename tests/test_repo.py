"""Repository hygiene: the promises the README makes about commands."""

from __future__ import annotations

import subprocess

from support import REPO_ROOT


def command_lines(path):
    return [
        line
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_ci_runs_the_readme_test_command():
    *_, test_command = command_lines(REPO_ROOT / ".ci" / "run")
    assert test_command.endswith("pytest")
    assert test_command in (REPO_ROOT / "README.md").read_text().splitlines()


def test_every_stage_input_is_in_git_or_made_by_a_stage():
    """Queued experiments run in temp copies holding only Git- and DVC-tracked files."""
    from dvc.repo import Repo

    tracked = set(
        subprocess.run(
            ["git", "ls-files"], cwd=REPO_ROOT, check=True, capture_output=True, text=True
        ).stdout.splitlines()
    )
    with Repo(str(REPO_ROOT)) as repo:
        outputs = [out.def_path for out in repo.index.outs]
        deps = {dep.def_path for stage in repo.index.stages for dep in stage.deps}

    def covered(path: str) -> bool:
        in_git = path in tracked or any(name.startswith(path + "/") for name in tracked)
        made = any(path == out or path.startswith(out + "/") for out in outputs)
        return in_git or made

    assert "params.yaml" in deps and "data/catalogue.csv" in deps
    assert [path for path in sorted(deps) if not covered(path)] == []
