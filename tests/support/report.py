"""The workflows' PR report script (.github/scripts/report.py), run as they run it."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.support.paths import REPORT_SCRIPT


@dataclass(frozen=True)
class ReportRun:
    result: subprocess.CompletedProcess
    markdown: Path  # images beside it
    github_output: Path  # the step outputs the workflows read


def run_report(workspace: Path, base: str, out_dir: Path, *options: str, env=None) -> ReportRun:
    """Run .github/scripts/report.py in ``workspace`` as the workflows do (``options`` such as
    ``--data-source public`` follow the base and the Markdown file)."""
    markdown, github_output = out_dir / "report" / "report.md", out_dir / "github_output"
    github_output.unlink(missing_ok=True)
    result = subprocess.run(
        [sys.executable, str(REPORT_SCRIPT), base, str(markdown), *options],
        cwd=workspace,
        capture_output=True,
        text=True,
        env=dict(env or os.environ, GITHUB_OUTPUT=str(github_output)),
        timeout=300,
    )
    return ReportRun(result, markdown, github_output)
