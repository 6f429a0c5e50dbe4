"""Scaling benchmark: the data stages, DVC's cache and its S3 remote from 400 to 100,000 photos.

For each size N it builds a catalogue of N photos, served by a mirror on 127.0.0.1, in a copy
of this checkout, and measures with the stages as this checkout defines them:

- the wall time of ``dvc repro -s`` for download, split, preprocess and features (each run as
  users run it, so DVC's hashing and caching of the output are included);
- the files in DVC's cache, and ``dvc status`` on a no-op (median of ``--noop-runs``);
- ``dvc push`` of those stages' outputs to moto's S3 server on 127.0.0.1, then, with the cache
  and outputs deleted, ``dvc pull`` (the outputs must come back byte for byte).

N = 400 is the real dataset. Larger catalogues are made from the 400 real photos: photo i is
real photo ``i mod 400`` with a JPEG comment segment naming i inserted after its start marker,
so every file is unique in its bytes (and its sha256) and decodes to the same pixels as its
base. Preprocess and features run only up to ``--preprocess-up-to`` and ``--features-up-to``
photos (they are linear in the photos; docs/benchmarks.md says how larger sizes are projected),
and push and pull up to ``--push-up-to``.

``--compare-layouts`` (needs pipeline/shards.py) adds, in the same run and on the same photos,
``dvc add``, push and pull of the raw photos as one file per photo against as shards, in a
separate DVC repository with its own remote prefix.

    python -m benchmarks.scaling --out scaling.json [--sizes 400 5000 20000 100000]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.benchmark import timed_dvc as timed
from pipeline.catalogue import read_catalogue
from pipeline.hashing import sha256_of
from tests.support.dvc import file_hashes, pipeline_env, prepare_keras_home
from tests.support.git import copy_workspace, git
from tests.support.http import serve_directory
from tests.support.paths import DATASET_MIRROR, REPO_ROOT, WEIGHTS_DIR
from tests.support.s3 import configure_remote, fresh_moto_account, moto_s3_server

SIZES = (400, 5_000, 20_000, 100_000)
DATA_STAGES = ("download", "split", "preprocess", "features")
CATALOGUE = "data/catalogue.csv"
RAW_DIR = "data/raw"


def synthetic_photo(base: bytes, index: int) -> bytes:
    """``base`` (a JPEG) with a comment segment naming ``index`` right after its SOI marker."""
    if base[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG: no start-of-image marker")
    text = f"synthetic photo {index}".encode()
    return base[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + base[2:]


def build_catalogue(size: int, mirror: Path, workspace: Path) -> Path:
    """Write the workspace's catalogue of ``size`` photos; the mirror root serving them."""
    real = read_catalogue(REPO_ROOT / CATALOGUE)
    if size == len(real):
        return DATASET_MIRROR
    rows = []
    for index in range(size):
        base = real[index % len(real)]
        content = synthetic_photo(
            (DATASET_MIRROR / "data" / base.relative_path).read_bytes(), index
        )
        name = f"s{index:07d}.jpg"
        target = mirror / "data" / base.label / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        rows.append((base.label, name, sha256_of(content), ""))
    with open(workspace / CATALOGUE, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "filename", "sha256", "excluded"])
        writer.writerows(rows)
    return mirror


def cache_files(root: Path) -> int:
    return sum(1 for path in (root / ".dvc" / "cache").rglob("*") if path.is_file())


def cached_outputs(workspace: Path, stages: list[str]) -> list[str]:
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo:
        return sorted(
            out.def_path
            for stage in repo.index.stages
            if stage.name in stages
            for out in stage.outs
            if out.use_cache
        )


def timed_push_and_pull(
    root: Path, env: dict[str, str], url: str, targets: list[str], outputs: list[str]
) -> tuple[float, float]:
    """Push ``targets`` to a fresh bucket on the moto server, delete the cache and ``outputs``,
    pull them back and check they are byte-identical."""
    before = file_hashes(root, outputs)
    configure_remote(root, fresh_moto_account(url, "dvc-store"), env)
    push = timed(root, env, "push", *targets)
    shutil.rmtree(root / ".dvc" / "cache")
    for path in outputs:
        target = root / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    pull = timed(root, env, "pull", *targets)
    if file_hashes(root, outputs) != before:
        sys.exit(f"dvc pull did not restore {outputs} byte for byte")
    return push, pull


def compare_layouts(workspace: Path, env: dict[str, str], url: str, dest: Path) -> dict:
    """``dvc add``/push/pull of the raw photos as one file per photo, then as shards."""
    from pipeline.shards import PhotoShards

    results = {}
    for layout in ("files", "shards"):
        root = dest / layout
        shutil.copytree(
            REPO_ROOT / ".dvc",
            root / ".dvc",
            ignore=shutil.ignore_patterns("cache", "tmp", "config.local"),
        )
        git(root, "init", "-q", "-b", "main")
        photos = root / "photos"
        if layout == "files":
            for name, content in PhotoShards(workspace / RAW_DIR).items():
                (photos / name).parent.mkdir(parents=True, exist_ok=True)
                (photos / name).write_bytes(content)
        else:
            shutil.copytree(workspace / RAW_DIR, photos)
        added = timed(root, env, "add", "photos")
        push, pull = timed_push_and_pull(root, env, url, ["photos.dvc"], ["photos"])
        results[layout] = {
            "files": sum(1 for p in photos.rglob("*") if p.is_file()),
            "cache_files": cache_files(root),
            "add_s": added,
            "push_s": push,
            "pull_s": pull,
        }
        shutil.rmtree(root)
    return results


def measure(size: int, args: argparse.Namespace, tmp: Path, keras_home: Path, url: str) -> dict:
    workspace = copy_workspace(tmp / f"repo-{size}")
    env = pipeline_env(keras_home, tmp / "bentoml")
    mirror = build_catalogue(size, tmp / f"mirror-{size}", workspace)
    stages = [
        stage
        for stage, limit in zip(
            DATA_STAGES, (None, None, args.preprocess_up_to, args.features_up_to), strict=True
        )
        if limit is None or size <= limit
    ]
    row: dict = {"photos": size, "stages": {}}
    with serve_directory(mirror) as mirror_url:
        env["DOWNLOAD_BASE_URL"] = f"{mirror_url}/data"
        for stage in stages:
            row["stages"][stage] = timed(workspace, env, "repro", "-s", stage)
            print(
                f"  {time.strftime('%H:%M:%S')} {size}: {stage} {row['stages'][stage]:.1f} s",
                flush=True,
            )
    row["raw_files"] = sum(1 for p in (workspace / RAW_DIR).rglob("*") if p.is_file())
    row["raw_mib"] = (
        sum(p.stat().st_size for p in (workspace / RAW_DIR).rglob("*") if p.is_file()) / 2**20
    )
    row["cache_files"] = cache_files(workspace)
    noops = [timed(workspace, env, "status", *stages) for _ in range(args.noop_runs)]
    row["status_noop_s"] = statistics.median(noops)
    if size <= args.push_up_to:
        outputs = cached_outputs(workspace, stages)
        row["push_s"], row["pull_s"] = timed_push_and_pull(workspace, env, url, stages, outputs)
    if size in args.compare_layouts:
        row["layouts"] = compare_layouts(workspace, env, url, tmp / f"layouts-{size}")
    row["load_average"] = os.getloadavg()
    shutil.rmtree(workspace)
    if mirror != DATASET_MIRROR:
        shutil.rmtree(mirror)
    return row


def fitted(rows: list[dict], value) -> tuple[float, float] | None:
    """Least-squares ``(intercept, seconds per photo)`` of ``value(row)`` over the rows that
    have it, or None with fewer than two."""
    import numpy as np

    points = [(row["photos"], value(row)) for row in rows if value(row) is not None]
    if len(points) < 2:
        return None
    slope, intercept = np.polyfit(*zip(*points, strict=True), 1)
    return float(intercept), float(slope)


def print_projection(rows: list[dict]) -> None:
    """Each measure fitted linearly in the photos and projected to 1 M and 10 M."""
    measures = {
        **{stage: (lambda r, s=stage: r["stages"].get(s)) for stage in DATA_STAGES},
        "cache files": lambda r: r["cache_files"],
        "status no-op": lambda r: r["status_noop_s"],
        "push": lambda r: r.get("push_s"),
        "pull": lambda r: r.get("pull_s"),
    }
    print("projection (linear least squares over the measured sizes):")
    for name, value in measures.items():
        fit = fitted(rows, value)
        if fit:
            intercept, slope = fit
            projected = ", ".join(f"{n:,}: {intercept + slope * n:,.0f}" for n in (10**6, 10**7))
            print(f"  {name}: {intercept:.1f} + {slope * 1000:.3f} per 1,000 photos -> {projected}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--preprocess-up-to", type=int, default=20_000)
    parser.add_argument("--features-up-to", type=int, default=5_000)
    parser.add_argument("--push-up-to", type=int, default=100_000)
    parser.add_argument("--noop-runs", type=int, default=3)
    parser.add_argument(
        "--compare-layouts",
        type=int,
        nargs="*",
        default=[],
        metavar="SIZE",
        help="sizes at which to compare one file per photo with shards",
    )
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    commit = git(REPO_ROOT, "rev-parse", "--short", "HEAD").stdout.strip()
    print(f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, {commit}")
    with tempfile.TemporaryDirectory() as tmp, moto_s3_server() as url:
        tmp = Path(tmp)
        keras_home = (
            prepare_keras_home(tmp / "keras")
            if WEIGHTS_DIR.exists()
            else Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
        )
        for size in args.sizes:
            rows.append(measure(size, args, tmp, keras_home, url))
            print(json.dumps(rows[-1]), flush=True)
            if args.out:
                args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print_projection(rows)


if __name__ == "__main__":
    main()
