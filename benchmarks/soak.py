"""Soak test of the champion: a long run at concurrency 16, then the model worker killed.

Needs what benchmarks/load_benchmark.py needs (`dvc repro`, `dandelion promote`). On
127.0.0.1:

1. `bentoml serve dandelion-vs-grass:latest`; warm-up until the process tree's memory is
   steady (rounds of 2,500 requests until one grows RSS by less than 2 %, at most 8), then
   ``--requests`` (5,000) at concurrency 16, bounded by ``--max-seconds``. Reports errors,
   the front's model-call retries, p50/p95/p99 latency, the RSS the warm-up added, and the
   RSS growth from the end of the warm-up to the end. (Measured here: RSS rises for about
   8,000 requests, allocator arenas and caches filling, then stays flat to 20,000.)
2. Under the same load, SIGKILL of the worker process that runs the model (with OpenVINO, the
   service's only worker): how many requests failed, whether the service recovered, and how
   long until /readyz answered 200 again.

    python -m benchmarks.soak [--requests 5000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import requests

from benchmarks.load_benchmark import MODEL_TAG, load, retries, tree_rss_mib
from tests.support.http import free_port
from tests.support.paths import REPO_ROOT
from tests.support.processes import running_server
from tests.support.service import split_photo_bytes


def model_worker(server: psutil.Process) -> psutil.Process:
    """The worker process that runs the model: the model service (Classifier) with the Keras
    engine, the front (DandelionService) itself with OpenVINO."""
    workers = {
        cmdline[cmdline.index("--service-name") + 1]: child
        for child in server.children(recursive=True)
        if "--service-name" in (cmdline := child.cmdline())
    }
    return workers.get("Classifier") or workers["DandelionService"]


def kill_model_worker_under_load(url: str, server, photos: list[bytes], concurrency: int):
    """SIGKILL the model worker 3 s into a load; (failed requests, sent, seconds to ready)."""
    outcome: dict = {}

    def send() -> None:
        outcome["stats"] = asyncio.run(
            load(f"{url}/predict", photos, concurrency, 60 * concurrency, strict=False)
        )

    loader = threading.Thread(target=send)
    loader.start()
    time.sleep(3)
    killed_at = time.monotonic()
    os.kill(model_worker(psutil.Process(server.pid)).pid, signal.SIGKILL)
    recovered_after = None
    while time.monotonic() - killed_at < 120:  # bounded
        try:
            if requests.get(f"{url}/readyz", timeout=5).status_code == 200 and (
                time.monotonic() - killed_at > 1
            ):
                recovered_after = time.monotonic() - killed_at
                break
        except requests.RequestException:
            pass
        time.sleep(0.2)
    loader.join(timeout=300)
    return len(outcome["stats"]["errors"]), 60 * concurrency, recovered_after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warm-up-round", type=int, default=2500)
    parser.add_argument("--max-seconds", type=float, default=900)
    args = parser.parse_args()

    photos = [photo for _, photo in split_photo_bytes(REPO_ROOT)]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "bentoml", "serve", MODEL_TAG]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    env = dict(os.environ, BENTOML_DO_NOT_TRACK="true", TF_CPP_MIN_LOG_LEVEL="2")
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"soak-{port}.log"
    with running_server(command, url, log, env=env, cwd=REPO_ROOT) as server:
        asyncio.run(load(f"{url}/predict", photos, args.concurrency, 100))
        warm_up = [tree_rss_mib(server)]
        while len(warm_up) <= 8 and (len(warm_up) < 2 or warm_up[-1] / warm_up[-2] > 1.02):
            asyncio.run(load(f"{url}/predict", photos, args.concurrency, args.warm_up_round))
            warm_up.append(tree_rss_mib(server))
        warmed_with = 100 + args.warm_up_round * (len(warm_up) - 1)
        rss = [warm_up[-1]]  # after warm-up, at half way, at the end
        started, halves = time.monotonic(), []
        for _ in range(2):
            halves.append(
                asyncio.run(
                    asyncio.wait_for(
                        load(f"{url}/predict", photos, args.concurrency, args.requests // 2, False),
                        args.max_seconds / 2,
                    )
                )
            )
            rss.append(tree_rss_mib(server))
        seconds = time.monotonic() - started
        latencies = [*halves[0]["latencies"], *halves[1]["latencies"]]
        p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) * 1000
        errors = len(halves[0]["errors"]) + len(halves[1]["errors"])
        retried = retries(url)
        failed, sent, recovered_after = kill_model_worker_under_load(
            url, server, photos, args.concurrency
        )
        retried_after_kill = retries(url) - retried

    print(
        f"warm-up: {warmed_with} requests; RSS of the process tree {warm_up[0]:.0f} -> "
        f"{warm_up[-1]:.0f} MiB ({' -> '.join(f'{r:.0f}' for r in warm_up[1:])})"
    )
    print(
        f"soak: {args.requests} requests at concurrency {args.concurrency} in {seconds:.0f} s "
        f"({args.requests / seconds:.1f} req/s)"
    )
    print(
        f"errors {errors}, model-call retries {retried:.0f}; latency ms "
        f"p50 {p50:.1f}, p95 {p95:.1f}, p99 {p99:.1f}"
    )
    print(
        f"RSS of the process tree: {rss[0]:.0f} MiB after warm-up, {rss[1]:.0f} MiB half way "
        f"({(rss[1] / rss[0] - 1) * 100:+.1f} %), {rss[2]:.0f} MiB at the end "
        f"({(rss[2] / rss[0] - 1) * 100:+.1f} % from warm-up, "
        f"{(rss[2] / rss[1] - 1) * 100:+.1f} % over the second half)"
    )
    recovery = f"/readyz 200 again {recovered_after:.1f} s after" if recovered_after else "no"
    print(
        f"SIGKILL of the model worker under load: {failed} of {sent} requests failed, "
        f"{retried_after_kill:.0f} retried; recovered: {recovery}"
    )


if __name__ == "__main__":
    main()
