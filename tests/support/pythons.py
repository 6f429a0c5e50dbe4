"""The Pythons the project supports, and where this machine has each one's interpreter."""

from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet

from tests.support.paths import REPO_ROOT

# Which of them must reproduce the committed dvc.lock besides the one running the tests
# (space-separated, "3.12 3.13"); unset means every other supported one. A CI job whose
# machine has only its own Python sets it empty, and another job runs each of the others.
LOCK_PYTHONS = "LOCK_PYTHONS"


def supported_pythons() -> list[str]:
    """The 3.x versions pyproject.toml's requires-python admits (checked from 3.8 to 3.20)."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    admits = SpecifierSet(project["requires-python"])
    return [f"3.{minor}" for minor in range(8, 21) if f"3.{minor}" in admits]


def lock_pythons() -> list[str]:
    """The versions whose cold `dvc repro` is compared with the committed dvc.lock here."""
    if LOCK_PYTHONS in os.environ:
        return os.environ[LOCK_PYTHONS].split()
    running = ".".join(platform.python_version_tuple()[:2])
    return [version for version in supported_pythons() if version != running]


def interpreter(version: str) -> Path | None:
    """An interpreter of Python ``version`` ("3.12") on this machine: ``python3.12`` on PATH,
    or else one that pyenv installed (its shims answer only for the versions it selects)."""
    pyenv_root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))  # its default
    candidates = [
        shutil.which(f"python{version}"),
        *sorted(glob.glob(f"{pyenv_root}/versions/{version}.*/bin/python{version}")),
    ]
    for candidate in filter(None, candidates):
        probe = [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]
        answer = subprocess.run(probe, capture_output=True, text=True)
        if answer.returncode == 0 and answer.stdout.strip() == version:
            return Path(candidate)
    return None
