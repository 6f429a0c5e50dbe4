"""Load benchmark: the service (OpenVINO), the same service on Keras, a naive server, the limits.

Needs the champion in BentoML's store and the photos in data/ (`dvc repro` or `dvc pull`,
then `dandelion promote`). Everything runs on 127.0.0.1, in one go, on the test photos:

- openvino service: `bentoml serve dandelion-vs-grass:latest` (the champion, as users serve it:
                    one process, the engine in the front);
- keras service:    the same service code and model, exported for the Keras engine, from a
                    temporary BentoML store, served as the package stage would serve it
                    (serving/engines.py SERVICES): the front and a model service with
                    adaptive batching;
- naive:            one Keras `model.predict` per request behind a minimal FastAPI app;
- limits:           each engine scoring preprocessed photos in batches of 32, no HTTP.

Concurrency 1 is measured again after the highest level ("1 after"), start-up is the time to
the first /readyz 200, RSS and CPU cover each server's whole process tree, and retries are
the front's repeated model-service calls (classifier_model_call_retries_total; Keras only).
CPU is also given per request, for the server and for this load generator (which shares the
cores), beside the engine's own CPU per image, so what the HTTP path costs on top of
inference is explicit.

    python -m benchmarks.load_benchmark [--requests 240] [--concurrency 1 8 32]
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
from fastapi import FastAPI, UploadFile  # module level: FastAPI resolves the annotations
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.engine_benchmark import images_per_second
from serving.contract import MODEL_FILE, MODEL_NAME
from serving.engines import SERVICES
from tests.support.http import free_port
from tests.support.load import send_photos
from tests.support.paths import REPO_ROOT
from tests.support.processes import running_server
from tests.support.service import split_photos

MODEL_TAG = f"{MODEL_NAME}:latest"


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


def cpu_ms_per_image(score, images: np.ndarray, seconds: float = 5.0) -> float:
    """CPU time (all of this process's threads) ``score`` spends per single-image call."""
    before, started = own_cpu_seconds(), time.perf_counter()
    rate = images_per_second(score, images, 1, seconds)
    return (own_cpu_seconds() - before) / (rate * (time.perf_counter() - started)) * 1000


def naive_app(model_path: str, image_size: int):
    """The baseline: FastAPI, one Keras `predict` per request, no batching."""
    import keras

    from serving.contract import load_image

    model = keras.models.load_model(model_path, compile=False)
    app = FastAPI()

    @app.get("/readyz")
    def ready() -> dict:
        return {}

    @app.post("/predict")
    def predict(image: UploadFile) -> dict:
        array = load_image(image.file, image_size)[np.newaxis]
        return {"score": float(model.predict(array, verbose=0)[0, 0])}

    return app


def keras_store(home: Path, metadata: dict, keras_file: Path) -> None:
    """A BentoML store at ``home`` holding the champion's model exported for Keras."""
    code = """
import json, shutil, sys, bentoml
from serving.contract import MODEL_FILE, MODEL_NAME
metadata, keras_file = json.loads(sys.argv[1]), sys.argv[2]
with bentoml.models.create(MODEL_NAME + ":keras", metadata=metadata) as model:
    shutil.copyfile(keras_file, model.path_of(MODEL_FILE))
"""
    subprocess.run(
        [sys.executable, "-c", code, json.dumps(dict(metadata, engine="keras")), str(keras_file)],
        env=dict(os.environ, BENTOML_HOME=str(home)),
        cwd=REPO_ROOT,
        check=True,
    )


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=240, help="per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--serve-naive", nargs=3, metavar=("PORT", "MODEL", "SIZE"), help=argparse.SUPPRESS
    )  # internal: run the baseline server
    args = parser.parse_args()
    if args.serve_naive:
        import uvicorn

        port, model_path, size = args.serve_naive
        uvicorn.run(
            naive_app(model_path, int(size)), host="127.0.0.1", port=int(port), log_level="warning"
        )
        return

    import bentoml

    from serving.contract import load_image
    from serving.engines import load_engine

    stored = bentoml.models.get(MODEL_TAG)
    keras_file = REPO_ROOT / "data/model" / MODEL_FILE
    image_size = stored.info.metadata["image_size"]
    paths = [REPO_ROOT / "data/raw" / label / Path(p).name for label, p in split_photos(REPO_ROOT)]
    photos = [path.read_bytes() for path in paths]
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    scratch = Path(tempfile.mkdtemp(prefix="load-benchmark-"))
    keras_store(scratch / "bentoml", stored.info.metadata, keras_file)

    env = dict(os.environ, BENTOML_DO_NOT_TRACK="true", TF_CPP_MIN_LOG_LEVEL="2")
    serve = [sys.executable, "-m", "bentoml", "serve"]
    address = ["--host", "127.0.0.1", "--port", "{port}"]
    servers = [
        ("openvino service", [*serve, MODEL_TAG, *address], env),
        (
            "keras service",
            [*serve, SERVICES["keras"], *address],
            dict(env, BENTOML_HOME=str(scratch / "bentoml")),
        ),
        (
            "naive FastAPI",
            [sys.executable, __file__, "--serve-naive", "{port}", str(keras_file), str(image_size)],
            env,
        ),
    ]
    levels = [*args.concurrency, args.concurrency[0]]  # the first level again, after the top
    rows, extras = [], {}
    for name, command, server_env in servers:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        started = time.monotonic()
        with running_server(
            [part.format(port=port) for part in command],
            url,
            logs / f"load-{port}.log",
            env=server_env,
            cwd=REPO_ROOT,
        ) as process:
            ready = readyz_seconds(url, started)
            asyncio.run(load(f"{url}/predict", photos, 4, 16))  # warm-up
            for index, concurrency in enumerate(levels):
                label = f"{concurrency}" if index < len(levels) - 1 else f"{concurrency} after"
                cpu_before, level_started = tree_cpu_seconds(process), time.perf_counter()
                own_before = own_cpu_seconds()
                stats = asyncio.run(load(f"{url}/predict", photos, concurrency, args.requests))
                seconds = time.perf_counter() - level_started
                server_cpu = tree_cpu_seconds(process) - cpu_before
                stats["server_ms"] = server_cpu / args.requests * 1000
                stats["client_ms"] = (own_cpu_seconds() - own_before) / args.requests * 1000
                rows.append((name, label, stats, tree_rss_mib(process), server_cpu / seconds))
            extras[name] = (ready, retries(url) if "service" in name else float("nan"))

    arrays = np.stack([load_image(path, image_size) for path in paths])
    keras_export = scratch / "keras-export"
    keras_export.mkdir()
    shutil.copyfile(keras_file, keras_export / MODEL_FILE)
    openvino = load_engine(REPO_ROOT / "data/export")
    limits = {
        "openvino": images_per_second(openvino, arrays, 32, 10),
        "keras": images_per_second(load_engine(keras_export), arrays, 32, 10),
    }
    inference_ms = cpu_ms_per_image(openvino, arrays)
    shutil.rmtree(scratch, ignore_errors=True)

    print(f"{args.requests} requests per level, {len(photos)} test photos, {os.cpu_count()} CPUs")
    print(
        f"{'server':<17} {'conc':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'req/s':>7} {'RSS MiB':>8} {'CPU':>5} {'CPU ms/req':>10} {'client ms/req':>13}"
    )
    for name, label, stats, rss, cores in rows:
        print(
            f"{name:<17} {label:>7} {stats['p50']:>8.1f} {stats['p95']:>8.1f} "
            f"{stats['p99']:>8.1f} {stats['throughput']:>7.1f} {rss:>8.0f} {cores:>5.2f} "
            f"{stats['server_ms']:>10.1f} {stats['client_ms']:>13.1f}"
        )
    for engine, limit in limits.items():
        print(
            f"{engine + ' batched':<17} {'-':>7} {'':>8} {'':>8} {'':>8} {limit:>7.1f}  (images/s)"
        )
    for name, (ready, retried) in extras.items():
        print(f"{name}: /readyz 200 after {ready:.1f} s; model-call retries {retried:.0f}")

    def at(name: str, label: str) -> tuple[dict, float]:
        (row,) = [(stats, rss) for n, lab, stats, rss, _ in rows if n == name and lab == label]
        return row

    top, first = str(max(args.concurrency)), str(args.concurrency[0])
    (ov_top, ov_rss), (keras_top, keras_rss) = at("openvino service", top), at("keras service", top)
    ov_first, ov_after = (
        at("openvino service", first)[0],
        at("openvino service", f"{first} after")[0],
    )
    print(
        f"openvino / keras service at concurrency {top}: "
        f"{ov_top['throughput'] / keras_top['throughput']:.2f}x; "
        f"openvino service / its batched limit: {ov_top['throughput'] / limits['openvino']:.2f}; "
        f"RSS openvino / keras: {ov_rss / keras_rss:.2f}; "
        f"p50 at concurrency {first} after / before the burst: "
        f"{ov_after['p50'] / ov_first['p50']:.2f}"
    )
    # What the cores allow: a request costs the server's CPU plus the load generator's.
    per_request = ov_top["server_ms"] + ov_top["client_ms"]
    cores = os.cpu_count()
    print(
        f"openvino at concurrency {top}: {per_request:.1f} ms of CPU per request "
        f"(server {ov_top['server_ms']:.1f}, of which one-image inference "
        f"{inference_ms:.1f}; load generator {ov_top['client_ms']:.1f}), so {cores} cores allow "
        f"at most {cores * 1000 / per_request:.0f} req/s = "
        f"{cores * 1000 / per_request / limits['openvino']:.2f} of the batched limit"
    )


if __name__ == "__main__":
    main()
