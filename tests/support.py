"""Helpers shared by the tests and the benchmark script (no pytest imports here)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"
DATASET_MIRROR = SHARED / "datasets" / "greenr-airflow"
WEIGHTS_DIR = SHARED / "weights"
MOBILENET_WEIGHTS = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"


@contextlib.contextmanager
def serve_http(handler_class, **handler_kwargs) -> Iterator[str]:
    """Run an HTTP server on a free 127.0.0.1 port; yield its base URL; stop it on exit."""
    handler = functools.partial(handler_class, **handler_kwargs)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True  # a handler still sleeping cannot block the teardown
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class QuietFileHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - keep test output readable
        pass


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    with serve_http(QuietFileHandler, directory=str(directory)) as url:
        yield url


def prepare_keras_home(keras_home: Path) -> Path:
    """A KERAS_HOME whose cache holds the offline ImageNet backbone (copied, as its README says)."""
    models = keras_home / "models"
    models.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(WEIGHTS_DIR / MOBILENET_WEIGHTS, models / MOBILENET_WEIGHTS)
    return keras_home


def copy_workspace(dest: Path) -> Path:
    """Copy the project's files (tracked and not ignored) into a fresh Git repo at ``dest``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "workspace copy"], cwd=dest, check=True)
    return dest


def set_param(workspace: Path, dotted_key: str, value) -> None:
    path = workspace / "params.yaml"
    params = yaml.safe_load(path.read_text())
    *parents, leaf = dotted_key.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def pipeline_env(keras_home: Path) -> dict[str, str]:
    """Environment for running ``dvc`` in a workspace copy with this interpreter's tools."""
    env = dict(os.environ, KERAS_HOME=str(keras_home))
    env.pop("MLFLOW_TRACKING_URI", None)  # the workspace's own default store
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def dvc(workspace: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=workspace,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def make_image(color=(200, 180, 40), size=(64, 48), mode="RGB", fmt="JPEG", seed=0) -> bytes:
    """A small image with some texture, encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(color) + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()
