"""Shadow benchmark: the champion's speed with a challenger in shadow, and without, same run.

Two `bentoml serve` of this checkout's service on 127.0.0.1, serving the model of the
champion's bento from a temporary BentoML store: one alone, one with CHALLENGER set to the
challenger's bento archive (CHALLENGER_MODE=shadow). The
levels alternate between the two servers (alone, then with shadow, at each concurrency), each
with the test photos of the champion's evaluate (results/evaluate/predictions.csv, photos from
the shared dataset mirror). For the shadow server it also reads /metrics after each level:
photos compared, photos shed (the shadow's queue full) and challenger errors.

    python -m benchmarks.shadow_benchmark CHAMPION.bento CHALLENGER.bento \\
        [--requests 480] [--concurrency 1 32] [--repeats 2]

The two bentos must be of the same classes and image size, and of different versions (a
challenger the pipeline built at another evaluate.threshold is one).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.load_benchmark import load, private_bento_home, tree_cpu_seconds
from pipeline.bento import bento_version_of
from serving.engines import SERVICES
from tests.support.http import free_port
from tests.support.paths import REPO_ROOT
from tests.support.processes import running_server
from tests.support.service import evaluated_predictions

SHADOW_SERIES = {
    "compared": "classifier_shadow_comparisons_total",
    "shed": "classifier_shadow_shed_total",
    "errors": "classifier_model_errors_total",
}


def shadow_counts(url: str) -> dict[str, float]:
    """The shadow's counters on ``url``/metrics (the challenger's series), summed."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    counts = dict.fromkeys(SHADOW_SERIES, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for key, name in SHADOW_SERIES.items():
                if sample.name == name and sample.labels.get("role", "challenger") == "challenger":
                    counts[key] += sample.value
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("champion", type=Path, help="the champion's bento archive")
    parser.add_argument("challenger", type=Path, help="the challenger's bento archive")
    parser.add_argument("--requests", type=int, default=480, help="per level and server")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=2, help="alternations of the servers")
    args = parser.parse_args()

    photos = [Path(p.photo).read_bytes() for p in evaluated_predictions(REPO_ROOT)]
    # The shadow alone: the log's cost is not what is measured.
    scratch, env = private_bento_home(args.champion, "shadow-benchmark-", PREDICTION_LOG="off")
    tag = bento_version_of(args.champion)
    servers = {
        "off": env,
        "shadow": dict(env, CHALLENGER=str(args.challenger.resolve()), CHALLENGER_MODE="shadow"),
    }
    rows = []
    with contextlib.ExitStack() as stack:
        urls, processes = {}, {}
        for name, server_env in servers.items():
            port = free_port()
            urls[name] = f"http://127.0.0.1:{port}"
            # This checkout's code (a bento would serve the code it was built with).
            command = [sys.executable, "-m", "bentoml", "serve", SERVICES["openvino"]]
            command += ["--host", "127.0.0.1", "--port", str(port)]
            processes[name] = stack.enter_context(
                running_server(
                    command, urls[name], scratch / f"{name}.log", env=server_env, cwd=REPO_ROOT
                )
            )
            asyncio.run(load(f"{urls[name]}/predict", photos, 4, 32))  # warm-up
        time.sleep(5)  # the warm-up's shadow finished
        for repeat in range(args.repeats):
            for concurrency in args.concurrency:
                for name in servers:
                    before = shadow_counts(urls[name])
                    cpu_before, started = tree_cpu_seconds(processes[name]), time.perf_counter()
                    stats = asyncio.run(
                        load(f"{urls[name]}/predict", photos, concurrency, args.requests)
                    )
                    cores = (tree_cpu_seconds(processes[name]) - cpu_before) / (
                        time.perf_counter() - started
                    )
                    time.sleep(3)  # what the shadow still had queued
                    after = shadow_counts(urls[name])
                    grown = {key: after[key] - before[key] for key in after}
                    rows.append((repeat, concurrency, name, stats, cores, grown))

    print(
        f"{args.requests} requests per level and server, {len(photos)} test photos, "
        f"{os.cpu_count()} CPUs; champion {tag}, challenger {bento_version_of(args.challenger)}"
    )
    print(
        f"{'run':>3} {'conc':>4} {'shadow':>6} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'CPU':>5} {'compared':>8} {'shed':>5} {'errors':>6}"
    )
    for repeat, concurrency, name, stats, cores, grown in rows:
        print(
            f"{repeat + 1:>3} {concurrency:>4} {name:>6} {stats['throughput']:>7.1f} "
            f"{stats['p50']:>7.1f} {stats['p99']:>7.1f} {cores:>5.2f} "
            f"{grown['compared']:>8.0f} {grown['shed']:>5.0f} {grown['errors']:>6.0f}"
        )
    for concurrency in args.concurrency:
        throughput = {
            name: sum(
                s["throughput"] for _, c, n, s, _, _ in rows if c == concurrency and n == name
            )
            for name in servers
        }
        print(
            f"concurrency {concurrency}: throughput with shadow / without = "
            f"{throughput['shadow'] / throughput['off']:.3f}"
        )


if __name__ == "__main__":
    main()
