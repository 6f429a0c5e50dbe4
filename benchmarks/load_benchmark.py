"""Load benchmark: the service on each engine against the framework's floor, and where the CPU goes.

Needs the pipeline's outputs in data/ (`dvc repro` or `dvc pull`). Four servers, one at a
time, in one run, on 127.0.0.1:

- bare framework: benchmarks/bare_service.py, a BentoML service that reads the multipart
                  upload and answers a constant (the floor of any /predict);
- int8 service, f32 service (OpenVINO), keras service: data/model exported for that engine
                  (pipeline/export.py, the INT8 one calibrated as the export stage does) and
                  built into a bento by the package stage's functions (pipeline/bento.py), each
                  in a temporary BentoML home, served as users serve a bento (`bentoml serve
                  <tag>`: the engine in the front's process, or for Keras a batching model
                  service behind it, serving/engines.py SERVICES).

Each concurrency level runs for ``--seconds``, sending the dataset's median-size photo (or,
``--photos test``, the test photos in turn). Load comes from hey (Debian's package) where it
is installed, otherwise from the aiohttp clients of tests/support/load.py; the output says
which. CPU covers each server's whole process tree and the load generator separately. The
engine's own CPU per image (no HTTP, measured beside the export) is the inference share of a
request; the rest of the server's CPU per request is its request path.

    python -m benchmarks.load_benchmark [--seconds 10] [--concurrency 1 32] [--out load.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import requests
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.engine_benchmark import images_per_second
from pipeline.shards import PhotoShards, ShardError
from serving.contract import MODEL_FILE, MODEL_NAME
from serving.engines import BATCHING
from serving.settings import MAX_BATCH_SIZE
from tests.support.http import free_port
from tests.support.load import hey_photo, send_photos
from tests.support.paths import EVALUATE_METRICS, PIPELINE_PATHS, REPO_ROOT
from tests.support.processes import running_server
from tests.support.service import split_photo_bytes

MODEL_TAG = f"{MODEL_NAME}:latest"
BARE = "bare framework"
# Served engine by server name, in the order they are loaded.
ENGINE_SERVERS = {
    "int8 service": "openvino-int8",
    "f32 service": "openvino",
    "keras service": "keras",
}
SERVERS = (BARE, *ENGINE_SERVERS)
# Issue 27's targets, each service against the Keras service in the same run.
TARGET_SPEEDUP = 4.0  # c=32 throughput over the Keras service's
TARGET_P50_MS = 5.0  # at concurrency 1
TARGET_NON_INFERENCE_MS = 3.5  # server CPU per request beyond the engine's


async def load(
    url: str, photos: list[bytes], concurrency: int, total: int, strict: bool = True
) -> dict:
    """``total`` POSTs of the photos (cycled) from ``concurrency`` clients; latency stats.

    ``strict``: the first answer that is not a 200 stops the run; otherwise failures (any
    other status, or no answer) are counted in ``errors``.
    """
    started = time.perf_counter()
    outcomes = await send_photos(
        url, photos, concurrency, total=total, stop_on_failure=strict, timeout=60
    )
    elapsed = time.perf_counter() - started
    latencies = [outcome.seconds for outcome in outcomes]
    quantiles = np.percentile(latencies, [50, 95, 99]) * 1000
    return {
        "p50": quantiles[0],
        "p95": quantiles[1],
        "p99": quantiles[2],
        "throughput": total / elapsed,
        "errors": [outcome.status for outcome in outcomes if outcome.status != 200],
        "latencies": latencies,
    }


def tree_rss_mib(process: subprocess.Popen) -> float:
    parent = psutil.Process(process.pid)
    return sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)]) / 2**20


def tree_cpu_seconds(process: subprocess.Popen) -> float:
    """User + system CPU time of a server's whole process tree so far."""
    parent = psutil.Process(process.pid)
    return sum(sum(p.cpu_times()[:2]) for p in [parent, *parent.children(recursive=True)])


def own_cpu_seconds() -> float:
    """User + system CPU time of this process (the load generator) so far."""
    return sum(psutil.Process().cpu_times()[:2])


def cpu_ms_per_image(score, images: np.ndarray, batch: int, seconds: float) -> float:
    """CPU time (all of this process's threads) ``score`` spends per image, in batches of
    ``batch``."""
    before, started = own_cpu_seconds(), time.perf_counter()
    rate = images_per_second(score, images, batch, seconds)
    return (own_cpu_seconds() - before) / (rate * (time.perf_counter() - started)) * 1000


def readyz_seconds(url: str, started: float) -> float:
    """Seconds from ``started`` to the first /readyz 200 (running_server already waited)."""
    while requests.get(f"{url}/readyz", timeout=30).status_code != 200:
        time.sleep(0.1)
    return time.monotonic() - started


def retries(url: str) -> float:
    """The front's classifier_model_call_retries_total (NaN for a server without it)."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "classifier_model_call_retries_total":
                return sample.value
    return float("nan")


def private_bento_home(archive: Path, prefix: str, **environ: str) -> tuple[Path, dict[str, str]]:
    """A scratch directory whose BentoML home holds the bento ``archive``, and the environment
    that serves from it (``environ`` added); one line and exit if it cannot be imported."""
    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    env = dict(
        os.environ,
        BENTOML_HOME=str(scratch / "bentoml"),
        BENTOML_DO_NOT_TRACK="true",
        FEEDBACK_DIR=str(scratch / "feedback"),
        **environ,
    )
    # An absolute path: `bentoml import` reads a relative one from the filesystem's root.
    imported = subprocess.run(
        [sys.executable, "-m", "bentoml", "import", str(archive.resolve())],
        env=env,
        capture_output=True,
        text=True,
    )
    if imported.returncode:
        shutil.rmtree(scratch, ignore_errors=True)
        sys.exit(f"cannot import {archive}: {imported.stderr.strip().splitlines()[-1:]}")
    return scratch, env


def median_photo() -> tuple[str, bytes]:
    """The dataset's photo of median file size (the lower one of the middle two): its path as
    the split file names it (data/raw/<label>/<file>), and its bytes (from data/raw's shards)."""
    raw_dir = PIPELINE_PATHS["raw_dir"]
    try:
        shards = PhotoShards(REPO_ROOT / raw_dir)
    except ShardError as error:
        sys.exit(str(error))
    names = sorted(shards.names(), key=lambda name: (shards.size(name), name))
    if not names:
        sys.exit(f"no photos in {raw_dir}: run `dvc pull` (or `dvc repro`)")
    name = names[(len(names) - 1) // 2]
    return f"{raw_dir}/{name}", shards.read(name)


def export_engine(engine: str, export_dir: Path) -> None:
    """data/model exported for ``engine`` as the export stage exports it."""
    from pipeline.export import export_model

    keras_file = REPO_ROOT / PIPELINE_PATHS["model_dir"] / MODEL_FILE
    if engine != "openvino-int8":
        export_model(keras_file, export_dir, engine)
        return
    from pipeline.params import QuantizeParams
    from pipeline.quantize import calibration_set

    train = np.load(REPO_ROOT / PIPELINE_PATHS["arrays_dir"] / "train.npz")["images"]
    calibration = calibration_set(train, QuantizeParams.load())
    export_model(keras_file, export_dir, engine, calibration=calibration)


def build_engine(scratch: Path, engine: str, batches: list[int], seconds: float) -> dict:
    """data/model exported for ``engine`` into ``scratch/export``, its bento built into the
    BentoML home ``scratch/bentoml`` by the package stage's functions, and the engine's CPU
    per test image in each of ``batches`` (batch 1 alone for an engine the service does not
    batch). Runs in a process of its own (``--build``), as the package stage: its functions
    must be the first to use BentoML in their process."""
    from pipeline.bento import build_bento, included_files, model_card
    from serving.engines import load_engine

    # The card carries evaluate's test metrics; they do not change how the service serves.
    test_metrics = json.loads((REPO_ROOT / EVALUATE_METRICS).read_text())["test"]
    export_engine(engine, scratch / "export")
    card = model_card(
        REPO_ROOT / PIPELINE_PATHS["model_dir"], scratch / "export", test_metrics, included_files()
    )
    tag = build_bento(scratch / "export", card, scratch / "archive.bento", scratch / "bentoml")
    score = load_engine(scratch / "export")
    test = np.load(REPO_ROOT / PIPELINE_PATHS["arrays_dir"] / "test.npz")["images"]
    sizes = sorted({min(b, MAX_BATCH_SIZE) for b in batches}) if BATCHING[engine] else [1]
    return {
        "tag": tag,
        "inference_ms": {b: cpu_ms_per_image(score, test, b, seconds) for b in sizes},
    }


def build_in_subprocess(scratch: Path, engine: str, batches: list[int], seconds: float) -> dict:
    """``build_engine`` in a fresh interpreter, whose output is its last line."""
    command = [sys.executable, "-m", "benchmarks.load_benchmark", "--build", str(scratch)]
    command += ["--engine", engine, "--concurrency", *map(str, batches)]
    command += ["--engine-seconds", str(seconds)]
    ran = subprocess.run(
        command,
        cwd=REPO_ROOT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", BENTOML_DO_NOT_TRACK="true"),
        capture_output=True,
        text=True,
    )
    if ran.returncode:
        sys.exit(f"building the {engine} bento failed:\n{ran.stderr[-4000:]}")
    built = json.loads(ran.stdout.strip().splitlines()[-1])
    built["inference_ms"] = {int(b): ms for b, ms in built["inference_ms"].items()}  # JSON keys
    return built


def drive(client: str, url: str, photos: list[bytes], concurrency: int, seconds: float) -> dict:
    """``concurrency`` clients sending photos to ``url`` for ``seconds``: answers and latency."""
    if client == "hey":
        run = hey_photo(url, photos[0], concurrency, seconds)
        return {
            "requests": run.requests,
            "failures": run.failures,
            "failure_kinds": {
                **{str(k): v for k, v in run.statuses.items() if k != 200},
                **run.errors,
            },
            "throughput": run.throughput,
            "p50_ms": run.percentiles_ms.get(50, float("nan")),
            "p99_ms": run.percentiles_ms.get(99, float("nan")),
            "client_cpu_seconds": run.client_cpu_seconds,
        }
    before, started = own_cpu_seconds(), time.perf_counter()
    outcomes = asyncio.run(send_photos(url, photos, concurrency, seconds=seconds, timeout=90))
    elapsed = time.perf_counter() - started
    failed = [str(outcome.status) for outcome in outcomes if outcome.status != 200]
    latencies = [outcome.seconds for outcome in outcomes if outcome.status == 200]
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000 if latencies else (np.nan, np.nan)
    return {
        "requests": len(outcomes),
        "failures": len(failed),
        "failure_kinds": {kind: failed.count(kind) for kind in sorted(set(failed))},
        "throughput": (len(outcomes) - len(failed)) / elapsed,
        "p50_ms": float(p50),
        "p99_ms": float(p99),
        "client_cpu_seconds": own_cpu_seconds() - before,
    }


def measure_server(
    name: str,
    command: list[str],
    env: dict[str, str],
    client: str,
    photos: list[bytes],
    levels: list[int],
    seconds: float,
    inference_ms: dict[int, float],
) -> dict:
    """Serve ``command`` (``{port}`` filled in), then load it at each level in turn."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    started = time.monotonic()
    rows = []
    with running_server(
        [part.format(port=port) for part in command],
        url,
        logs / f"load-{port}.log",
        env=env,
        cwd=REPO_ROOT,
    ) as process:
        ready = readyz_seconds(url, started)
        drive(client, f"{url}/predict", photos, 4, 1)  # warm-up
        for concurrency in levels:
            cpu_before, level_started = tree_cpu_seconds(process), time.perf_counter()
            row = drive(client, f"{url}/predict", photos, concurrency, seconds)
            server_cpu = tree_cpu_seconds(process) - cpu_before
            requests_sent = max(row["requests"], 1)
            # The batch the engine gets, at best: as many images as clients (when batching).
            inference = inference_ms[min(inference_ms, key=lambda b: abs(b - concurrency))]
            row.update(
                concurrency=concurrency,
                server_cpu_ms=server_cpu / requests_sent * 1000,
                client_cpu_ms=row["client_cpu_seconds"] / requests_sent * 1000,
                inference_ms=inference,
                server_cores=server_cpu / (time.perf_counter() - level_started),
                rss_mib=tree_rss_mib(process),
            )
            row["non_inference_ms"] = row["server_cpu_ms"] - inference
            rows.append(row)
        retried = retries(url) if name != BARE else float("nan")
    print(f"{name}: done ({len(rows)} levels)", file=sys.stderr)
    return {"ready_seconds": ready, "model_call_retries": retried, "levels": rows}


def targets(results: dict, top: int) -> list[dict]:
    """Issue 27's targets, for each OpenVINO service measured, against the Keras service."""

    def level(server: str, concurrency: int) -> dict | None:
        rows = results.get(server, {}).get("levels", [])
        return next((row for row in rows if row["concurrency"] == concurrency), None)

    checks = []
    keras = level("keras service", top)
    for server in ("int8 service", "f32 service"):
        at_top, at_one = level(server, top), level(server, 1)
        if at_top and keras:
            speedup = at_top["throughput"] / keras["throughput"]
            checks.append(
                (server, f"throughput at c={top} / Keras service's", speedup, ">=", TARGET_SPEEDUP)
            )
        if at_one:
            checks.append((server, "p50 at c=1, ms", at_one["p50_ms"], "<=", TARGET_P50_MS))
        if at_top:
            checks.append(
                (
                    server,
                    f"non-inference CPU per request at c={top}, ms",
                    at_top["non_inference_ms"],
                    "<=",
                    TARGET_NON_INFERENCE_MS,
                )
            )
    return [
        {
            "server": server,
            "target": what,
            "measured": value,
            "goal": f"{relation} {goal}",
            "met": bool(value >= goal if relation == ">=" else value <= goal),
        }
        for server, what, value, relation, goal in checks
    ]


def report(run: dict) -> None:
    print(
        f"client: {run['client']}; photo: {run['photo']} ({run['photos']} photos, median "
        f"{run['photo_bytes']} bytes); {run['seconds']} s per level; {run['cpus']} CPUs; "
        f"load average before {run['load_before']}, after {run['load_after']}"
    )
    print(
        f"{'server':<15} {'conc':>4} {'requests':>8} {'fail':>5} {'req/s':>7} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'cores':>5} {'RSS MiB':>7} {'CPU ms/req':>10} {'inference':>9} "
        f"{'other':>6} {'client':>6}"
    )
    for name, server in run["servers"].items():
        for row in server["levels"]:
            print(
                f"{name:<15} {row['concurrency']:>4} {row['requests']:>8} {row['failures']:>5} "
                f"{row['throughput']:>7.1f} {row['p50_ms']:>7.1f} {row['p99_ms']:>7.1f} "
                f"{row['server_cores']:>5.2f} {row['rss_mib']:>7.0f} "
                f"{row['server_cpu_ms']:>10.2f} {row['inference_ms']:>9.2f} "
                f"{row['non_inference_ms']:>6.2f} {row['client_cpu_ms']:>6.2f}"
            )
            if row["failures"]:
                print(f"{'':<15} failures: {row['failure_kinds']}")
    for name, server in run["servers"].items():
        print(
            f"{name}: /readyz 200 after {server['ready_seconds']:.1f} s; "
            f"model-call retries {server['model_call_retries']:.0f}"
        )
    for engine, measured in run["inference_ms"].items():
        per_batch = ", ".join(f"batch {b}: {ms:.2f}" for b, ms in measured.items())
        print(f"{engine} engine, CPU ms per image (no HTTP): {per_batch}")
    print("targets (issue 27):")
    for check in run["targets"]:
        print(
            f"  {check['server']:<13} {check['target']:<45} {check['measured']:>7.2f} "
            f"(target {check['goal']}): {'pass' if check['met'] else 'MISS'}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    parser.add_argument(
        "--photos",
        choices=["median", "test"],
        default="median",
        help="the dataset's median-size photo in every request, or the test photos in turn "
        "(aiohttp only: hey sends one body)",
    )
    parser.add_argument("--client", choices=["auto", "hey", "aiohttp"], default="auto")
    parser.add_argument(
        "--engine-seconds", type=float, default=5.0, help="per engine CPU measurement"
    )
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # internal
    parser.add_argument("--engine", help=argparse.SUPPRESS)  # internal
    args = parser.parse_args()
    if args.build:
        built = build_engine(args.build, args.engine, args.concurrency, args.engine_seconds)
        print(json.dumps(built))
        return

    client = args.client
    if client == "auto":
        client = "hey" if shutil.which("hey") and args.photos == "median" else "aiohttp"
    if client == "hey" and args.photos == "test":
        parser.error("hey sends one body: --photos test needs --client aiohttp")
    if args.photos == "median":
        name, photo = median_photo()
        photos = [photo]
    else:
        name, photos = "test split", [photo for _, photo in split_photo_bytes(REPO_ROOT)]

    scratch = Path(tempfile.mkdtemp(prefix="load-benchmark-"))
    try:
        built = {
            engine: build_in_subprocess(
                scratch / engine, engine, args.concurrency, args.engine_seconds
            )
            for name, engine in ENGINE_SERVERS.items()
            if name in args.servers
        }
        tags = ", ".join(f"{engine} {b['tag']}" for engine, b in built.items())
        print(f"built: {tags or 'nothing'}", file=sys.stderr)
        load_before = os.getloadavg()  # what else runs on the machine, bentos built
        env = dict(os.environ, BENTOML_DO_NOT_TRACK="true", TF_CPP_MIN_LOG_LEVEL="2")
        serve = [sys.executable, "-m", "bentoml", "serve"]
        address = ["--host", "127.0.0.1", "--port", "{port}"]
        results = {}
        for name in args.servers:
            if name == BARE:
                command, server_env, inference = (
                    [*serve, "benchmarks.bare_service:BareService"],
                    env,
                    {1: 0.0},
                )
            else:
                engine = ENGINE_SERVERS[name]
                home = scratch / engine
                command = [*serve, built[engine]["tag"]]
                server_env = dict(
                    env, BENTOML_HOME=str(home / "bentoml"), FEEDBACK_DIR=str(home / "feedback")
                )
                inference = built[engine]["inference_ms"]
            results[name] = measure_server(
                name,
                [*command, *address],
                server_env,
                client,
                photos,
                args.concurrency,
                args.seconds,
                inference,
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    run = {
        "client": client,
        "photo": name,
        "photo_bytes": len(photos[0])
        if len(photos) == 1
        else int(np.median([len(p) for p in photos])),
        "photos": len(photos),
        "seconds": args.seconds,
        "cpus": os.cpu_count(),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "servers": results,
        "inference_ms": {engine: b["inference_ms"] for engine, b in built.items()},
        "targets": targets(results, max(args.concurrency)),
    }
    report(run)
    if args.out:
        args.out.write_text(json.dumps(run, indent=2) + "\n")


if __name__ == "__main__":
    main()
