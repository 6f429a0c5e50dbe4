"""A real local Ray cluster for tests: `ray start --head`, token authentication on, loopback only.

It runs in its own temp dir on a free port and its own process group; stopping it stops only
its processes, never other clusters on the machine (no `ray stop`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from pipeline.cluster import RAY_ADDRESS_VARIABLE
from tests.support.http import free_port

CLUSTER_CPUS = 2
START_TIMEOUT_SECONDS = 120
STOP_TIMEOUT_SECONDS = 45  # Ray drains the node for up to 30 s on SIGTERM
READY_LINE = "will now block forever"  # `ray start --block` prints it once everything runs
# Ray's own variables a test cluster must not inherit from the developer's shell.
RAY_CLIENT_VARIABLES = (
    RAY_ADDRESS_VARIABLE,
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
)


@dataclass(frozen=True)
class RayCluster:
    address: str
    token_path: Path
    # What a client of this cluster needs in its environment (besides RAY_ADDRESS).
    auth: dict[str, str]

    def client_env(self, base: dict[str, str]) -> dict[str, str]:
        """``base`` with RAY_ADDRESS and the token of this cluster."""
        return dict(without_ray(base), **self.auth, **{RAY_ADDRESS_VARIABLE: self.address})


def without_ray(env: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in env.items() if key not in RAY_CLIENT_VARIABLES}


def ray_executable() -> Path:
    """The `ray` command of the `ray` extra: installed in CI (.ci/run); elsewhere, skip."""
    path = Path(sys.executable).parent / "ray"
    if not path.exists():
        message = 'ray is missing: pip install -e ".[ray]"'
        if os.environ.get("CI"):
            pytest.fail(f"{message} (.ci/run installs it)")
        pytest.skip(message)
    return path


@contextlib.contextmanager
def local_ray_cluster(root: Path, cpus: int = CLUSTER_CPUS) -> Iterator[RayCluster]:
    """A head node with ``cpus`` CPUs, token authentication on, until exit."""
    # Ray's unix sockets live under the temp dir, whose path must stay short (108 bytes).
    root.mkdir(parents=True, exist_ok=True)
    token_path = root / "token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    auth = {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_path),
        # Ray otherwise replaces 127.0.0.1 with the machine's network address; tests stay on
        # loopback.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    port = free_port()
    address = f"127.0.0.1:{port}"
    log_path = root / "ray-start.log"
    command = [
        str(ray_executable()),
        "start",
        "--head",
        "--num-cpus",
        str(cpus),
        "--include-dashboard=false",
        "--disable-usage-stats",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(port),
        "--temp-dir",
        str(root / "r"),
        "--block",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            env=dict(without_ray(dict(os.environ)), **auth),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: teardown stops exactly it
        )
    try:
        wait_until_started(process, log_path)
        yield RayCluster(address, token_path, auth)
    finally:
        stop_cluster(process)


def wait_until_started(process: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        output = log_path.read_text(errors="replace")
        if process.poll() is not None:
            raise AssertionError(f"ray start exited ({process.returncode}):\n{output[-3000:]}")
        if READY_LINE in output:
            return
        time.sleep(0.5)
    raise AssertionError(f"ray start not ready after {START_TIMEOUT_SECONDS} s:\n{output[-3000:]}")


def stop_cluster(process: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block`, which stops its node; then whatever it left, killed."""
    with contextlib.suppress(psutil.NoSuchProcess):
        spawned = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    for child in spawned:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(spawned, timeout=10)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    """A local Ray cluster (2 CPUs, token authentication on) for the whole session."""
    # Not under pytest's tmp_path: Ray's socket paths under --temp-dir must stay short.
    root = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    try:
        with local_ray_cluster(root) as cluster:
            yield cluster
    finally:
        shutil.rmtree(root, ignore_errors=True)
