"""Isolation benchmark: do big uploads slow down small ones, and is their memory given back?

Needs the champion in BentoML's store and the photos in data/ (as benchmarks/load_benchmark.py).
Serves `dandelion-vs-grass:latest` on 127.0.0.1, then:

1. quiet: ``--requests`` single-photo /predict calls of the test photos at concurrency 4;
2. busy: the same, while ``--batches`` clients each send 32-photo /predict_batch requests of
   9 MB photos (generated noise at 2850 x 2850, a phone photo's size), one after another;
3. the RSS of the process tree before, at its peak during the big batches, and 10 s after
   the last of them was answered.

``--before REV`` also measures the service's code at Git revision REV (served from a
temporary worktree, on the same model), so a change can be compared in one run.

    python -m benchmarks.isolation_benchmark [--requests 400] [--batches 3] [--before REV]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from benchmarks.load_benchmark import MODEL_TAG, load, tree_rss_mib
from tests.support.http import free_port
from tests.support.paths import REPO_ROOT
from tests.support.processes import running_server
from tests.support.service import split_photo_bytes

BIG_SIDE = 2850  # px; a noise JPEG of this side at quality 95 is about 9 MB


def big_photo(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (BIG_SIDE, BIG_SIDE, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def measure(url: str, server, photos: list[bytes], big: list[bytes], args) -> dict:
    """Quiet and busy latency of /predict, batch timings, and the process tree's RSS."""
    asyncio.run(load(f"{url}/predict", photos, 4, 40))  # warm-up
    rss_before = tree_rss_mib(server)
    quiet = asyncio.run(load(f"{url}/predict", photos, 4, args.requests))

    stop, batch_seconds, failures, peak = threading.Event(), [], [], [rss_before]
    files = [("images", (f"big{i}.jpg", photo)) for i, photo in enumerate(big)]

    def send_batches() -> None:
        while not stop.is_set():
            started = time.monotonic()
            response = requests.post(f"{url}/predict_batch", files=files, timeout=120)
            if response.status_code != 200:  # the measurement would mean nothing: stop
                failures.append(f"{response.status_code} {response.text[:200]}")
                stop.set()
            batch_seconds.append(time.monotonic() - started)

    def sample_rss() -> None:
        while any(thread.is_alive() for thread in senders):
            peak.append(tree_rss_mib(server))
            time.sleep(0.2)

    senders = [threading.Thread(target=send_batches) for _ in range(args.batches)]
    sampler = threading.Thread(target=sample_rss)
    for thread in [*senders, sampler]:
        thread.start()
    time.sleep(2)  # the big batches are being uploaded and decoded
    busy = asyncio.run(load(f"{url}/predict", photos, 4, args.requests))
    stop.set()  # the batches in progress finish; the RSS is sampled until they have
    for thread in [*senders, sampler]:
        thread.join()
    time.sleep(10)
    if failures:
        raise SystemExit(f"a big batch failed: {failures[0]}")
    return {
        "quiet": quiet,
        "busy": busy,
        "batches": batch_seconds,
        "rss": (rss_before, max(peak), tree_rss_mib(server)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--batches", type=int, default=3, help="clients sending big batches")
    parser.add_argument("--before", metavar="REV", help="also measure the service at REV")
    args = parser.parse_args()

    photos = [photo for _, photo in split_photo_bytes(REPO_ROOT)]
    big = [big_photo(seed) for seed in range(32)]
    env = dict(os.environ, BENTOML_DO_NOT_TRACK="true")
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    targets = [("now", REPO_ROOT, MODEL_TAG)]
    scratch = Path(tempfile.mkdtemp(prefix="isolation-"))
    if args.before:
        worktree = scratch / "before"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(worktree), args.before],
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
        )
        # The old service code on the same model (the store's latest).
        targets.insert(0, (args.before, worktree, "serving.service:DandelionService"))
    results = {}
    try:
        for name, cwd, target in targets:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            command = [sys.executable, "-m", "bentoml", "serve", target]
            command += ["--host", "127.0.0.1", "--port", str(port)]
            with running_server(
                command, url, logs / f"isolation-{port}.log", env=env, cwd=cwd
            ) as server:
                results[name] = measure(url, server, photos, big, args)
    finally:
        if args.before:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO_ROOT, check=False
            )

    mib = sum(map(len, big)) / 2**20
    print(
        f"/predict at concurrency 4, {args.requests} requests; beside it {args.batches} clients "
        f"sending 32-photo batches of {mib / 32:.1f} MB photos ({mib:.0f} MB per batch); "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"{'service':<10} {'quiet p50':>9} {'quiet p95':>9} {'busy p50':>8} {'busy p95':>8} "
        f"{'busy max':>8} {'p95 ratio':>9} {'batch s':>7} {'RSS MiB before/peak/after':>26}"
    )
    for name, result in results.items():
        quiet, busy = result["quiet"], result["busy"]
        before, peak, after = result["rss"]
        print(
            f"{name:<10} {quiet['p50']:>9.1f} {quiet['p95']:>9.1f} {busy['p50']:>8.1f} "
            f"{busy['p95']:>8.1f} {max(busy['latencies']) * 1000:>8.1f} "
            f"{busy['p95'] / quiet['p95']:>9.2f} {np.median(result['batches']):>7.1f} "
            f"{before:>10.0f} / {peak:.0f} / {after:.0f}"
        )


if __name__ == "__main__":
    main()
