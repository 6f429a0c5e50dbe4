"""Repository hygiene: the promises the README makes about commands."""

from __future__ import annotations

import re
import subprocess

from tests.support.paths import PIPELINE_PATHS, REPO_ROOT


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

    def git_files(*options: str) -> list[str]:
        listed = subprocess.run(
            ["git", "ls-files", *options], cwd=REPO_ROOT, check=True, capture_output=True
        )
        return listed.stdout.decode().splitlines()

    tracked, untracked = git_files(), git_files("--others", "--exclude-standard")
    with Repo(str(REPO_ROOT)) as repo:
        outputs = [out.def_path for out in repo.index.outs]
        deps = {dep.def_path for stage in repo.index.stages for dep in stage.deps}

    def under(path: str, names) -> list[str]:
        return [name for name in names if name == path or name.startswith(path + "/")]

    def made_by_a_stage(path: str) -> bool:
        return any(path == out or path.startswith(out + "/") for out in outputs)

    assert "params.yaml" in deps and PIPELINE_PATHS["catalogue"] in deps
    missing = [p for p in sorted(deps) if not (under(p, tracked) or made_by_a_stage(p))]
    assert missing == []
    # A new file inside a tracked dependency (say serving/new.py) must be added to Git too.
    assert [name for dep in sorted(deps) for name in under(dep, untracked)] == []


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces as -."""
    anchors, in_code = set(), False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif line.startswith("#") and not in_code:
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_every_link_between_the_readme_and_the_docs_resolves():
    """The README is the front door to docs/: a moved section must not leave a dead link."""
    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    assert len(pages) > 5
    dead = []
    for page in pages:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)|src=\"([^\"]+)\"", text):
            target = next(t for t in target if t)
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                dead.append(f"{page.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md":
                if anchor not in heading_anchors(linked.read_text()):
                    dead.append(f"{page.name}: {target} (no such heading)")
    assert dead == []


def test_the_testing_guide_names_every_test_file():
    """docs/testing.md says what each test file checks: a new file belongs in that list."""
    guide = (REPO_ROOT / "docs" / "testing.md").read_text()
    named = set(re.findall(r"\b(test_\w+)\.py\b", guide))
    files = {path.stem for path in (REPO_ROOT / "tests").rglob("test_*.py")}
    assert sorted(files - named) == []
