"""Benchmark: cold and no-op `dvc repro`, then `dvc push`/`dvc pull` of all outputs to S3.

The images are served from a local mirror on 127.0.0.1 (default: ../shared's byte-identical
copy of the dataset) and the S3 remote is moto's server on 127.0.0.1, so the figures measure
the pipeline and DVC, not the internet. Run it from the repo root with the project's
environment active:

    python -m benchmarks.benchmark [--mirror DIR] [--noop-runs 3]
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

from tests.support.dvc import (
    delete_cache_and_outputs,
    dvc,
    file_hashes,
    output_paths,
    pipeline_env,
    prepare_keras_home,
)
from tests.support.git import copy_workspace
from tests.support.http import serve_directory
from tests.support.paths import DATASET_MIRROR, WEIGHTS_DIR
from tests.support.s3 import configure_remote, fresh_moto_account, moto_s3_server


def timed_dvc(workspace: Path, env: dict[str, str], *args: str) -> float:
    start = time.perf_counter()
    result = dvc(workspace, *args, env=env)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return elapsed


def timed_push_and_pull(workspace: Path, env: dict[str, str]) -> tuple[float, float, int, int]:
    """Push every cached output to moto's S3 server on loopback, delete it, pull it back."""
    outputs = output_paths(workspace)
    before = file_hashes(workspace, outputs)
    cache = [p for p in (workspace / ".dvc" / "cache").rglob("*") if p.is_file()]
    volume = sum(p.stat().st_size for p in cache)
    with moto_s3_server() as url:
        configure_remote(workspace, fresh_moto_account(url, "dvc-store"), env)
        push = timed_dvc(workspace, env, "push")
        delete_cache_and_outputs(workspace, outputs)
        pull = timed_dvc(workspace, env, "pull")
    if file_hashes(workspace, outputs) != before:
        sys.exit("dvc pull did not restore the outputs byte for byte")
    return push, pull, len(cache), volume


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
        env = pipeline_env(keras_home, tmp / "bentoml")
        workspace = copy_workspace(tmp / "repo")
        with serve_directory(args.mirror) as url:
            env["DOWNLOAD_BASE_URL"] = f"{url}/data"
            cold = timed_dvc(workspace, env, "repro")
            noops = [timed_dvc(workspace, env, "repro") for _ in range(args.noop_runs)]
        push, pull, files, volume = timed_push_and_pull(workspace, env)

    print(
        f"machine: {os.cpu_count()} CPUs, {platform.python_implementation()} "
        f"{platform.python_version()}, {platform.machine()}"
    )
    print(f"cold dvc repro (empty cache, 400 images from 127.0.0.1): {cold:5.1f} s")
    print(
        f"no-op dvc repro (median of {len(noops)}):                 "
        f"{statistics.median(noops):6.1f} s"
    )
    print(f"data: {files} cache files, {volume / 2**20:.1f} MiB (every cached output)")
    print(f"dvc push to S3 on 127.0.0.1 (moto):                {push:6.1f} s")
    print(f"dvc pull from S3 on 127.0.0.1 (empty cache):       {pull:6.1f} s")


if __name__ == "__main__":
    main()
