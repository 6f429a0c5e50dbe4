"""Load benchmark: the BentoML service vs a naive FastAPI server vs the hardware limit.

Needs the champion in BentoML's store and the photos in data/ (`dvc repro` or `dvc pull`,
then `python -m stages.promote`). Everything runs on 127.0.0.1, in one go, on the same test photos:

- service: `bentoml serve dandelion-vs-grass:latest` (adaptive batching);
- naive:   one `model.predict` per request behind a minimal FastAPI app, as the project's
           earlier prototypes served it;
- limit:   batched `model.predict` on preprocessed photos, no HTTP at all.

    python tests/load_benchmark.py [--requests 240] [--concurrency 1 8 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
from fastapi import FastAPI, UploadFile  # module level: FastAPI resolves the annotations
from support import (
    REPO_ROOT,
    free_port,
    running_server,
    split_photos,
)

from serving.contract import MODEL_FILE

MODEL_TAG = "dandelion-vs-grass:latest"


async def load(url: str, photos: list[bytes], concurrency: int, total: int) -> dict:
    """``total`` POSTs of the photos (cycled) from ``concurrency`` workers; latency stats."""
    latencies: list[float] = []
    next_index = iter(range(total))

    async def worker(client: httpx.AsyncClient) -> None:
        for index in next_index:
            content = photos[index % len(photos)]
            started = time.perf_counter()
            response = await client.post(url, files={"image": ("photo.jpg", content)})
            latencies.append(time.perf_counter() - started)
            if response.status_code != 200:
                raise RuntimeError(f"{url}: HTTP {response.status_code} {response.text}")

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    quantiles = np.percentile(latencies, [50, 95, 99]) * 1000
    return {
        "p50": quantiles[0],
        "p95": quantiles[1],
        "p99": quantiles[2],
        "throughput": total / elapsed,
    }


def tree_rss_mib(process: subprocess.Popen) -> float:
    parent = psutil.Process(process.pid)
    return sum(p.memory_info().rss for p in [parent, *parent.children(recursive=True)]) / 2**20


def tree_cpu_seconds(process: subprocess.Popen) -> float:
    """User + system CPU time of a server's whole process tree so far."""
    parent = psutil.Process(process.pid)
    return sum(sum(p.cpu_times()[:2]) for p in [parent, *parent.children(recursive=True)])


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


def batched_limit(model_path: str, arrays: np.ndarray, seconds: float = 10.0) -> float:
    """Images/s of `model.predict` on batches of 32 preprocessed photos (after warm-up)."""
    import keras

    model = keras.models.load_model(model_path, compile=False)
    batch = arrays[:32]
    model.predict(batch, verbose=0)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        model.predict(batch, batch_size=32, verbose=0)
        done += len(batch)
    return done / (time.perf_counter() - started)


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

    stored = bentoml.models.get(MODEL_TAG)
    model_path = stored.path_of(MODEL_FILE)
    image_size = stored.info.metadata["image_size"]
    paths = [REPO_ROOT / "data/raw" / label / Path(p).name for label, p in split_photos(REPO_ROOT)]
    photos = [path.read_bytes() for path in paths]
    logs = Path(os.environ.get("TMPDIR", "/tmp"))

    env = dict(os.environ, BENTOML_DO_NOT_TRACK="true", TF_CPP_MIN_LOG_LEVEL="2")
    rows = []
    for name, command in [
        (
            "bentoml service",
            [
                sys.executable,
                "-m",
                "bentoml",
                "serve",
                MODEL_TAG.split(":")[0],
                "--host",
                "127.0.0.1",
                "--port",
                "{port}",
            ],
        ),
        (
            "naive FastAPI",
            [sys.executable, __file__, "--serve-naive", "{port}", model_path, str(image_size)],
        ),
    ]:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with running_server(
            [part.format(port=port) for part in command],
            url,
            logs / f"load-{port}.log",
            env=env,
            cwd=REPO_ROOT,
        ) as process:
            asyncio.run(load(f"{url}/predict", photos, 4, 16))  # warm-up
            for concurrency in args.concurrency:
                cpu_before, started = tree_cpu_seconds(process), time.perf_counter()
                stats = asyncio.run(load(f"{url}/predict", photos, concurrency, args.requests))
                cores = (tree_cpu_seconds(process) - cpu_before) / (time.perf_counter() - started)
                rows.append((name, concurrency, stats, tree_rss_mib(process), cores))

    arrays = np.stack([load_image(path, image_size) for path in paths])
    limit = batched_limit(model_path, arrays)

    print(f"{args.requests} requests per level, {len(photos)} test photos, {os.cpu_count()} CPUs")
    print(
        f"{'server':<16} {'conc':>4} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'req/s':>7} {'RSS MiB':>8} {'CPU':>5}"
    )
    for name, concurrency, stats, rss, cores in rows:
        print(
            f"{name:<16} {concurrency:>4} {stats['p50']:>8.1f} {stats['p95']:>8.1f} "
            f"{stats['p99']:>8.1f} {stats['throughput']:>7.1f} {rss:>8.0f} {cores:>5.2f}"
        )
    print(f"{'batched predict':<16} {'-':>4} {'':>8} {'':>8} {'':>8} {limit:>7.1f}   (images/s)")
    service = {c: s for n, c, s, *_ in rows if n == "bentoml service"}
    naive = {c: s for n, c, s, *_ in rows if n == "naive FastAPI"}
    top = max(args.concurrency)
    print(
        f"service / naive at concurrency {top}: "
        f"{service[top]['throughput'] / naive[top]['throughput']:.1f}x; "
        f"service / batched limit: {service[top]['throughput'] / limit:.2f}"
    )


if __name__ == "__main__":
    main()
