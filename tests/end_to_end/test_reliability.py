"""The served bento under faults and overload: slow clients, more load than it can take, and
SIGTERM with work in flight. All on 127.0.0.1, bounded in time."""

from __future__ import annotations

import asyncio
import http.client
import os
import select
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests

from serving.contract import MODEL_NAME
from serving.settings import RETRY_AFTER_SECONDS, STALL_SECONDS
from tests.support.http import free_port, multipart_body
from tests.support.load import Outcome, send_photos
from tests.support.processes import running_server
from tests.support.service import split_photos

pytestmark = pytest.mark.slow


def photos_of(workspace) -> list[bytes]:
    """The bytes of the test split's photos."""
    photos = []
    for _, path in split_photos(workspace):
        with open(path, "rb") as handle:
            photos.append(handle.read())
    return photos


def send_slowly(url: str, route: str, body: bytes, content_type: str, how: str) -> tuple:
    """POST ``body`` with its full Content-Length, sent ``how``:

    - "stall": the first 1 kB, then nothing;
    - "trickle": 100 bytes a second;
    - "paced": in 16 pieces over about 3 s (fast enough to be accepted).

    Returns (status, JSON or text, seconds from the first byte to the answer)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=90)
    connection.putrequest("POST", f"/{route}")
    connection.putheader("Content-Type", content_type)
    connection.putheader("Content-Length", str(len(body)))
    connection.endheaders()
    started = time.monotonic()
    pieces = {
        "stall": [body[:1000]],
        "trickle": [body[i : i + 100] for i in range(0, len(body), 100)],
        "paced": np.array_split(np.frombuffer(body, np.uint8), 16),
    }[how]
    pause = {"stall": 0, "trickle": 1.0, "paced": 0.2}[how]
    try:
        for piece in pieces:
            connection.send(bytes(piece))
            # Stop sending as soon as the server has answered (it closes the connection).
            if select.select([connection.sock], [], [], pause)[0]:
                break
    except OSError:
        pass  # the server closed the connection while we were sending: read its answer
    try:
        response = connection.getresponse()
        status, text = response.status, response.read().decode()
    finally:
        connection.close()
    return status, text, time.monotonic() - started


def timed_predictions(url: str, photos: list[bytes], workers: int = 4) -> list[tuple[int, float]]:
    """POST /predict of every photo from ``workers`` threads: (status, seconds) each."""

    def predict(photo: bytes) -> tuple[int, float]:
        started = time.monotonic()
        response = requests.post(f"{url}/predict", files={"image": photo}, timeout=60)
        return response.status_code, time.monotonic() - started

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(predict, photos))


def test_stalled_and_trickling_uploads_get_408_in_seconds_while_others_are_served(service):
    photos = photos_of(service.workspace)
    # Announces a 5 MB photo and sends 1 kB of it, or 100 bytes a second.
    body, content_type = multipart_body("image", [photos[0] + b"\0" * 5_000_000])
    with ThreadPoolExecutor(max_workers=20) as pool:
        slow = [
            pool.submit(send_slowly, service.url, "predict", body, content_type, how)
            for how in ["stall", "trickle"] * 10
        ]
        time.sleep(0.5)  # the slow ones are connected and waiting
        normal = timed_predictions(service.url, photos * 2)
        answers = [future.result() for future in slow]
    for status, text, seconds in answers:
        assert status == 408 and "too slowly" in text, (status, text)
        assert seconds < STALL_SECONDS + 5  # cut at the limit, not at the 60 s timeout
    assert {status for status, _ in normal} == {200}
    cut_after = [seconds for _, _, seconds in answers]
    p99 = np.percentile([seconds for _, seconds in normal], 99) * 1000
    print(
        f"20 slow uploads cut after {min(cut_after):.1f}-{max(cut_after):.1f} s; "
        f"{len(normal)} normal predictions beside them: p99 {p99:.0f} ms"
    )


@pytest.mark.parametrize("backoff", [True, False], ids=["retry-after", "no-backoff"])
def test_past_capacity_the_service_answers_503_at_once_and_recovers(service, backoff):
    photos = photos_of(service.workspace)
    flood = send_photos(f"{service.url}/predict", photos, 128, seconds=10, backoff=backoff)
    outcomes = asyncio.run(flood)
    statuses = {outcome.status for outcome in outcomes}
    assert statuses <= {200, 503}, statuses
    refused = [outcome for outcome in outcomes if outcome.status == 503]
    assert refused, "128 clients never exceeded the capacity: nothing was shed"
    assert {outcome.retry_after for outcome in refused} == {str(RETRY_AFTER_SECONDS)}
    slowest_refusal = max(outcome.seconds for outcome in refused)
    assert slowest_refusal < 2
    served = [outcome.seconds for outcome in outcomes if outcome.status == 200]
    assert served
    # Healthy afterwards: ready, and a photo is classified.
    assert requests.get(f"{service.url}/readyz", timeout=10).status_code == 200
    assert timed_predictions(service.url, photos[:4])[0][0] == 200
    print(
        f"concurrency 128 for 10 s, {'honouring Retry-After' if backoff else 'no backoff'}: "
        f"{len(outcomes)} answers, {len(refused) / len(outcomes):.0%} 503 (slowest "
        f"{slowest_refusal * 1000:.0f} ms), 200s p50 {np.percentile(served, 50) * 1000:.0f} ms, "
        f"p99 {np.percentile(served, 99) * 1000:.0f} ms"
    )


def test_sigterm_finishes_the_accepted_requests_then_exits(promoted, reproduced, tmp_path):
    photos = photos_of(reproduced.workspace)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "bentoml", "serve", f"{MODEL_NAME}:latest"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    outcomes: list[Outcome] = []
    with running_server(command, url, tmp_path / "serve.log", env=reproduced.env) as server:
        body, content_type = multipart_body("images", photos[:32])
        batch: dict = {}
        batch_thread = threading.Thread(
            target=lambda: batch.update(
                answer=send_slowly(url, "predict_batch", body, content_type, "paced")
            )
        )

        load = send_photos(f"{url}/predict", photos, 16, seconds=6, fresh_connections=True)
        loader = threading.Thread(target=lambda: outcomes.extend(asyncio.run(load)))
        loader.start()
        batch_thread.start()
        time.sleep(1.5)  # the batch is half sent: accepted and in progress
        terminated = time.monotonic()
        os.killpg(server.pid, signal.SIGTERM)
        # /readyz turns 503 at once (or refuses the connection, once the server has exited).
        readyz = []
        while time.monotonic() - terminated < 3 and readyz[-1:] in ([], [200]):
            try:
                readyz.append(requests.get(f"{url}/readyz", timeout=2).status_code)
            except requests.ConnectionError:
                readyz.append("refused")
            time.sleep(0.02)
        unready_after = time.monotonic() - terminated
        batch_thread.join(timeout=60)
        loader.join(timeout=90)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the service did not exit within 30 s of SIGTERM")
        exited = time.monotonic() - terminated

    status, text, _ = batch["answer"]
    assert status == 200, text
    assert readyz[-1] in (503, "refused") and unready_after < 1, readyz
    before = [outcome.status for outcome in outcomes if outcome.started < terminated]
    after = [outcome.status for outcome in outcomes if outcome.started >= terminated]
    # Everything sent before SIGTERM was answered 200 (the last ones may meet the drain).
    assert before.count(200) > 16 and set(before) <= {200, 503}, before
    # After it: 503 "shutting down" while the open requests finish, then refused at connect
    # (or reset: connected in the moment between the worker's exit and BentoML closing the
    # socket, never read).
    assert set(after) <= {200, 503, "refused", "reset"} and 503 in after, after
    print(
        f"SIGTERM with a 32-photo batch half sent and 16 clients: batch 200; sent before: "
        f"{before.count(200)} 200, {before.count(503)} 503; sent after: {after.count(200)} 200, "
        f"{after.count(503)} 503, {after.count('refused')} refused at connect, "
        f"{after.count('reset')} reset unread; /readyz "
        f"{readyz[-1]} {unready_after * 1000:.0f} ms after SIGTERM; exited in {exited:.1f} s"
    )
