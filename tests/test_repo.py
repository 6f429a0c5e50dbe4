"""Repository hygiene: the promises the README makes about commands."""

from __future__ import annotations

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
