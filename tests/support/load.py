"""Load on the served photo endpoint: many aiohttp clients, each outcome recorded; or hey.

aiohttp, because the load generator shares the server's cores: it costs about 0.7 ms of CPU
per request here against 1.8 ms for httpx. hey (Debian's package), where it is installed,
costs less still, but sends one body and records no outcome per request.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import resource
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from tests.support.http import multipart_body


@dataclass(frozen=True)
class Outcome:
    started: float  # time.monotonic() when the request was sent
    status: int | str  # the HTTP status, or "refused" (at connect), "reset" or an error name
    seconds: float
    retry_after: str | None


async def send_photos(
    url: str,
    photos: list[bytes],
    concurrency: int,
    *,
    total: int | None = None,
    seconds: float | None = None,
    backoff: bool = False,
    fresh_connections: bool = False,
    stop_on_failure: bool = False,
    timeout: float = 90,
    source_address: Callable[[int], str] | None = None,
) -> list[Outcome]:
    """POST the photos (cycled) to ``url``, field ``image``, from ``concurrency`` clients, each
    sending its next request when the last is answered; until ``total`` requests were sent
    or ``seconds`` have passed (bounded: one of them is required).

    ``backoff``: after a 503 a client waits as Retry-After says, as well-behaved clients do;
    otherwise it sends again at once. ``fresh_connections``: a new connection per request, so
    that a request either reaches the server or is refused at connect, and is never lost on a
    kept-alive connection the server has just closed. ``stop_on_failure``: the first answer
    that is not a 200 raises RuntimeError (a benchmark's figures would mean nothing).
    ``source_address``: client ``i`` connects from the local address ``source_address(i)``,
    with a session of its own, as separate machines would (a proxy's per-client limits)."""
    if total is None and seconds is None:
        raise ValueError("give total or seconds: the load must be bounded")
    outcomes: list[Outcome] = []
    deadline = time.monotonic() + seconds if seconds is not None else float("inf")
    indices = itertools.count() if total is None else iter(range(total))

    async def client(session: aiohttp.ClientSession) -> None:
        for index in indices:
            if time.monotonic() >= deadline:
                return
            form = aiohttp.FormData()
            form.add_field("image", photos[index % len(photos)], filename="photo.jpg")
            started, retry_after = time.monotonic(), None
            try:
                async with session.post(url, data=form) as response:
                    await response.read()
                    status, retry_after = response.status, response.headers.get("Retry-After")
            except aiohttp.ClientConnectorError:
                status = "refused"
            except aiohttp.ClientOSError:  # reset in the socket's queue, unread
                status = "reset"
            except (TimeoutError, aiohttp.ClientError) as error:
                status = type(error).__name__
            outcomes.append(Outcome(started, status, time.monotonic() - started, retry_after))
            if stop_on_failure and status != 200:
                raise RuntimeError(f"{url}: {status}")
            if backoff and status == 503:
                await asyncio.sleep(float(retry_after))
            elif not isinstance(status, int):
                await asyncio.sleep(0.05)  # the server is going away: do not spin

    client_timeout = aiohttp.ClientTimeout(total=timeout)
    if source_address is None:
        connector = aiohttp.TCPConnector(limit=concurrency, force_close=fresh_connections)
        async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
            await asyncio.gather(*(client(session) for _ in range(concurrency)))
        return outcomes

    async def own_client(index: int) -> None:
        connector = aiohttp.TCPConnector(
            limit=1, force_close=fresh_connections, local_addr=(source_address(index), 0)
        )
        async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
            await client(session)

    await asyncio.gather(*(own_client(index) for index in range(concurrency)))
    return outcomes


# hey (Debian's package, written in Go): a load generator whose own CPU per request is a small
# share of what the aiohttp clients above cost, so more of the shared cores go to the server.
# It sends one body to every request, so it loads with one photo.


@dataclass(frozen=True)
class HeyRun:
    """What one run of hey measured, from its summary (the summary, not ``-o csv``: only the
    summary counts the requests that got no answer)."""

    seconds: float  # hey's "Total": from the first request sent to the last answer
    statuses: dict[int, int]  # HTTP status -> answers
    errors: dict[str, int]  # requests without an answer (refused, reset, timeout) by message
    percentiles_ms: dict[int, float]  # latency of the answered requests, by percentile
    client_cpu_seconds: float  # user + system CPU time hey itself used

    @property
    def requests(self) -> int:
        return sum(self.statuses.values()) + sum(self.errors.values())

    @property
    def failures(self) -> int:
        """Requests not answered 200."""
        return self.requests - self.statuses.get(200, 0)

    @property
    def throughput(self) -> float:
        """200 answers per second."""
        return self.statuses.get(200, 0) / self.seconds


def parse_hey_summary(summary: str) -> dict:
    """hey's summary (its default output) as seconds, statuses, errors and percentiles_ms."""
    section, parsed = "", {"statuses": {}, "errors": {}, "percentiles_ms": {}}
    for line in summary.splitlines():
        if line and not line[0].isspace():
            section = line.rstrip(":")
        elif match := re.fullmatch(r"\s+Total:\s+([\d.]+) secs", line):
            parsed["seconds"] = float(match[1])
        elif section == "Latency distribution" and (
            match := re.fullmatch(r"\s+(\d+)% in ([\d.]+) secs", line)
        ):
            if int(match[1]):  # hey prints "0% in 0.0000 secs" for a percentile it lacks
                parsed["percentiles_ms"][int(match[1])] = float(match[2]) * 1000
        elif section == "Status code distribution" and (
            match := re.fullmatch(r"\s+\[(\d+)\]\s+(\d+) responses", line)
        ):
            parsed["statuses"][int(match[1])] = int(match[2])
        elif section == "Error distribution" and (
            match := re.fullmatch(r"\s+\[(\d+)\]\s+(.*)", line)
        ):
            parsed["errors"][match[2]] = int(match[1])
    if "seconds" not in parsed:
        raise ValueError(f"not a hey summary:\n{summary}")
    return parsed


def hey_photo(
    url: str, photo: bytes, concurrency: int, seconds: float, timeout: float = 90
) -> HeyRun:
    """POST ``photo`` to ``url``, field ``image``, from ``concurrency`` hey workers, each sending
    its next request when the last is answered, for ``seconds``."""
    body, content_type = multipart_body("image", [photo])
    with tempfile.NamedTemporaryFile(prefix="hey-body-") as body_file:
        body_file.write(body)
        body_file.flush()
        command = [
            *("hey", "-z", f"{seconds}s", "-c", str(concurrency), "-t", str(int(timeout))),
            *("-m", "POST", "-T", content_type, "-D", body_file.name, url),
        ]
        # hey is the only child that ends meanwhile, so the children's CPU time grows by its.
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        ran = subprocess.run(command, capture_output=True, text=True, check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return HeyRun(client_cpu_seconds=cpu, **parse_hey_summary(ran.stdout))
