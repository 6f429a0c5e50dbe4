"""The README's shell commands, as a reader copies them, so that tests run what it says."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.support.paths import REPO_ROOT


def readme_command(start: str) -> str:
    """The one command of the README's ``bash`` blocks that begins with ``start``, its
    continuation lines joined and its trailing comment dropped."""
    blocks = re.findall(r"^```bash\n(.*?)^```", (REPO_ROOT / "README.md").read_text(), re.M | re.S)
    joined = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    (command,) = [line for line in joined if line.startswith(start)]
    return re.sub(r"\s+#[^']*$", "", command)


def run_readme_command(
    start: str, cwd: Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess:
    """Run :func:`readme_command` ``start`` with bash (stopping at the first failing part) in
    ``cwd``, its output captured."""
    command = ["bash", "-ec", readme_command(start)]
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
