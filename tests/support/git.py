"""Git: commands with a test identity, and copies of the project as fresh repositories."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.support.paths import REPO_ROOT


def git(cwd: Path, *args: str, env=None, check: bool = True) -> subprocess.CompletedProcess:
    """``git`` with a fixed test identity (for commits), its output captured."""
    identity = ["-c", "user.name=test", "-c", "user.email=test@localhost"]
    return subprocess.run(
        ["git", *identity, *args], cwd=cwd, env=env, check=check, capture_output=True, text=True
    )


def copy_workspace(dest: Path) -> Path:
    """Copy the project's files (tracked and not ignored) into a fresh Git repo at ``dest``."""
    listed = git(REPO_ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    for name in filter(None, listed.stdout.split("\0")):
        source = REPO_ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    git(dest, "init", "-q", "-b", "main")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "workspace copy")
    return dest
