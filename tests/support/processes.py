"""Subprocesses: this interpreter's modules and tools, and servers started and stopped whole."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests


def with_interpreter_tools(env: dict[str, str]) -> dict[str, str]:
    """``env`` with this interpreter's scripts (dvc, ruff...) first on PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return dict(env, PATH=path)


def python_module(
    module: str, cwd: Path, *args: str, env: dict[str, str], timeout: float = 900
) -> subprocess.CompletedProcess:
    """``python -m module args`` with this interpreter, its output captured."""
    return python("-m", module, *args, cwd=cwd, env=env, timeout=timeout)


def python_code(
    code: str, cwd: Path, *args: str, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess:
    """``python -c code args`` with this interpreter (a fresh one), its output captured."""
    return python("-c", code, *args, cwd=cwd, env=env, timeout=timeout)


def python(
    *args: str, cwd: Path, env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess:
    command = [sys.executable, *args]
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def dandelion(cwd: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The project's ``dandelion`` command (installed with it, beside this interpreter)."""
    command = [str(Path(sys.executable).parent / "dandelion"), *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@contextlib.contextmanager
def running_server(
    command: list[str],
    url: str,
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    ready_path: str = "/readyz",
    timeout: float = 240,
    cwd: Path | None = None,
) -> Iterator[subprocess.Popen]:
    """Start a server, wait until ``url + ready_path`` answers 200, stop it (and its children)."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopping it stops its workers
        )
    try:
        _wait_until_ready(f"{url}{ready_path}", process, log_path, timeout)
        yield process
    finally:
        stop_process_group(process)


def _wait_until_ready(probe: str, process: subprocess.Popen, log_path: Path, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()
        with contextlib.suppress(requests.RequestException):
            if requests.get(probe, timeout=2).status_code == 200:
                return
        time.sleep(1)
    raise AssertionError(f"{probe} not ready after {timeout}s:\n{log_path.read_text()[-3000:]}")


def stop_process_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
