"""Flood benchmark: clients that resend at once, against the service directly and through the
reverse proxy (deploy/proxy/), in one run.

The bento archive is imported into a private BentoML home and served as users serve it
(`bentoml serve`, the bento's own code); Debian's nginx runs the proxy's templates in front of
it (tests/support/proxy.py), all on 127.0.0.1. Each of ``--concurrency`` clients sends the
test photos to /predict one after another and, whatever the answer (503 or 429 included),
sends the next at once, never honouring Retry-After: the abusive client of issue 26. Each
client has its own loopback address (127.0.x.y), as separate machines would, so the proxy's
per-client limits meet many clients, not one; a last run sends all of them from one address
(one abusive client with many connections).

    python -m benchmarks.flood_benchmark BENTO [--concurrency 128] [--seconds 20]

Per target: requests answered, the shares admitted (200), refused per client (429) and at
capacity (503), the admitted p50/p99 and the refusals' p50, and the load average around it
(the machine is shared), and the cores each part used: the service's process tree, nginx's,
and this load generator's (on the same 2 cores: what it takes, the servers lack).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.load_benchmark import own_cpu_seconds, private_bento_home, tree_cpu_seconds
from pipeline.bento import bento_version_of
from tests.support.http import free_port
from tests.support.load import Outcome, send_photos
from tests.support.paths import REPO_ROOT
from tests.support.processes import running_server
from tests.support.proxy import running_proxy
from tests.support.service import evaluated_predictions


def client_address(index: int) -> str:
    """A loopback address of its own for client ``index`` (the kernel routes 127/8 to lo)."""
    return f"127.0.{1 + index // 250}.{1 + index % 250}"


def summary(
    name: str, outcomes: list[Outcome], seconds: float, cores: dict[str, float], load: str
) -> str:
    total = len(outcomes)
    admitted = [o.seconds for o in outcomes if o.status == 200]
    refused = [o.seconds for o in outcomes if o.status in (429, 503)]
    share = {code: sum(o.status == code for o in outcomes) / total for code in (200, 429, 503)}
    other = total - sum(round(s * total) for s in share.values())

    def ms(values: list[float], q: float) -> str:
        return f"{np.percentile(values, q) * 1000:.0f}" if values else "-"

    return (
        f"{name:<26} {total:>8} {total / seconds:>7.0f} {share[200]:>8.1%} {share[429]:>6.1%} "
        f"{share[503]:>6.1%} {other:>5} {len(admitted) / seconds:>7.1f} {ms(admitted, 50):>8} "
        f"{ms(admitted, 99):>8} {ms(refused, 50):>8} "
        f"{cores['service']:>11.2f} {cores['nginx']:>5.2f} {cores['clients']:>7.2f}   {load}"
    )


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bento", type=Path, help="the bento archive to serve")
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=20, help="per target")
    args = parser.parse_args()

    photos = [Path(p.photo).read_bytes() for p in evaluated_predictions(REPO_ROOT)]
    scratch, env = private_bento_home(
        args.bento,
        "flood-benchmark-",
        PREDICTION_LOG="off",  # the floods alone are measured
    )
    port = free_port()
    service = f"127.0.0.1:{port}"
    command = [sys.executable, "-m", "bentoml", "serve", bento_version_of(args.bento)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    runs = [
        ("direct", f"http://{service}", False),
        ("proxy", None, False),
        ("proxy, one client address", None, True),
    ]
    rows = []
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, scratch, ignore_errors=True)  # runs last
        server = stack.enter_context(
            running_server(command, f"http://{service}", scratch / "serve.log", env=env)
        )
        proxy = stack.enter_context(running_proxy(service, scratch / "nginx"))
        asyncio.run(send_photos(f"http://{service}/predict", photos, 4, seconds=3))  # warm up
        for name, url, one_address in runs:
            time.sleep(5)  # the last flood's requests are over
            target = f"{url or proxy.url}/predict"
            before = load_average()
            processes = {"service": server, "nginx": proxy.process}
            cpu = {part: tree_cpu_seconds(process) for part, process in processes.items()}
            cpu["clients"], started = own_cpu_seconds(), time.perf_counter()
            # Each request sent the moment the last is answered, whatever the answer: no
            # backoff, Retry-After never honoured.
            outcomes = asyncio.run(
                send_photos(
                    target,
                    photos,
                    args.concurrency,
                    seconds=args.seconds,
                    source_address=None if one_address else client_address,
                )
            )
            elapsed = time.perf_counter() - started
            cpu_after = {part: tree_cpu_seconds(process) for part, process in processes.items()}
            cpu_after["clients"] = own_cpu_seconds()
            cores = {part: (cpu_after[part] - cpu[part]) / elapsed for part in cpu}
            load = f"{before} -> {load_average()}"
            rows.append(summary(name, outcomes, args.seconds, cores, load))

    print(
        f"{args.concurrency} clients resending at once, {args.seconds:.0f} s per target, "
        f"{len(photos)} test photos, {os.cpu_count()} CPUs; load average 1/5/15 min "
        "before -> after"
    )
    print(
        f"{'target':<26} {'requests':>8} {'req/s':>7} {'admitted':>8} {'429':>6} {'503':>6} "
        f"{'other':>5} {'200/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'ref. p50':>8} "
        f"{'CPU service':>11} {'nginx':>5} {'clients':>7}   load"
    )
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
