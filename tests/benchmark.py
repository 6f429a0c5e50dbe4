"""Benchmark: time a cold `dvc repro` and a no-op `dvc repro` in a fresh copy of this repo.

The images are served from a local mirror on 127.0.0.1 (default: ../shared's byte-identical
copy of the dataset), so the figures measure the pipeline, not the internet. Run it from the
repo root with the project's environment active:

    python tests/benchmark.py [--mirror DIR] [--noop-runs 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from support import (
    DATASET_MIRROR,
    WEIGHTS_DIR,
    copy_workspace,
    dvc,
    pipeline_env,
    prepare_keras_home,
    serve_directory,
    set_param,
)


def timed_repro(workspace: Path, env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = dvc(workspace, "repro", env=env)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"dvc repro failed:\n{result.stdout}\n{result.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mirror", type=Path, default=DATASET_MIRROR, help="folder holding data/<label>/<file>.jpg"
    )
    parser.add_argument("--noop-runs", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Offline machines use the shared backbone copy; elsewhere Keras' own cache/download.
        keras_home = (
            prepare_keras_home(tmp / "keras")
            if WEIGHTS_DIR.exists()
            else Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
        )
        env = pipeline_env(keras_home)
        workspace = copy_workspace(tmp / "repo")
        with serve_directory(args.mirror) as url:
            set_param(workspace, "download.base_url", f"{url}/data")
            cold = timed_repro(workspace, env)
            noops = [timed_repro(workspace, env) for _ in range(args.noop_runs)]

    print(
        f"machine: {os.cpu_count()} CPUs, {platform.python_implementation()} "
        f"{platform.python_version()}, {platform.machine()}"
    )
    print(f"cold dvc repro (5 stages, 400 images from 127.0.0.1): {cold:6.1f} s")
    print(
        f"no-op dvc repro (median of {len(noops)}):                 "
        f"{statistics.median(noops):6.1f} s"
    )


if __name__ == "__main__":
    main()
