"""Benchmark: cold and no-op `dvc repro`, `dvc push`/`dvc pull` to S3, then a sweep point.

The images are served from a local mirror on 127.0.0.1 (default: ../shared's byte-identical
copy of the dataset) and the S3 remote is moto's server on 127.0.0.1, so the figures measure
the pipeline and DVC, not the internet. The sweep point is one `dvc exp run -S
train.learning_rate=...` on top of the cached features, as users run it: in full (every stage
downstream of train, to a written dvc.lock), then, at another rate, up to evaluate only
(`dvc exp run -S ... evaluate`). MLflow logs to the workspace copy's own store. Run it from
the repo root with the project's environment active:

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

import yaml

from tests.support.dvc import (
    delete_cache_and_outputs,
    dvc,
    file_hashes,
    output_paths,
    pipeline_env,
    prepare_keras_home,
    stages_run,
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


# Learning rates none of the runs before used, so DVC's run cache holds no result for them and
# every stage downstream of train runs.
SWEEP_RATES = (0.0007, 0.0008)


def locked_learning_rates(workspace: Path) -> set[float]:
    """The train.learning_rate values dvc.lock records, whichever stages depend on it (on the
    key or on the whole ``train`` section)."""
    stages = yaml.safe_load((workspace / "dvc.lock").read_text())["stages"].values()
    recorded = [stage.get("params", {}).get("params.yaml", {}) for stage in stages]
    return {
        params["train.learning_rate"]
        if "train.learning_rate" in params
        else params["train"]["learning_rate"]
        for params in recorded
        if "train.learning_rate" in params or "learning_rate" in params.get("train", {})
    }


def timed_sweep_point(
    workspace: Path, env: dict[str, str], rate: float, *targets: str
) -> tuple[float, list[str]]:
    """Wall seconds of `dvc exp run -S train.learning_rate=<rate> [targets]`, and the stages it
    ran; exits unless dvc.lock then records that rate."""
    start = time.perf_counter()
    result = dvc(workspace, "exp", "run", "-S", f"train.learning_rate={rate}", *targets, env=env)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"dvc exp run failed:\n{result.stdout}\n{result.stderr}")
    if rate not in locked_learning_rates(workspace):
        sys.exit(f"dvc.lock does not record train.learning_rate={rate} after dvc exp run")
    return elapsed, stages_run(result.stdout)


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
        full, full_stages = timed_sweep_point(workspace, env, SWEEP_RATES[0])
        partial, partial_stages = timed_sweep_point(workspace, env, SWEEP_RATES[1], "evaluate")

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
    print(
        f"sweep point, dvc exp run -S train.learning_rate={SWEEP_RATES[0]}:   {full:6.1f} s "
        f"({', '.join(full_stages)})"
    )
    print(
        f"sweep point up to evaluate (dvc exp run -S ... evaluate): {partial:6.1f} s "
        f"({', '.join(partial_stages)})"
    )
    print(f"load average at the end (1/5/15 min): {' '.join(map(str, os.getloadavg()))}")


if __name__ == "__main__":
    main()
