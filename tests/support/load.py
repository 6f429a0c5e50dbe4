"""Load on the served photo endpoint: many aiohttp clients, each outcome recorded.

aiohttp, because the load generator shares the server's cores: it costs about 0.7 ms of CPU
per request here against 1.8 ms for httpx.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp


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
