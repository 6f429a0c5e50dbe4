"""Which prediction requests the front takes, and how it stops taking them.

An ``Admission`` belongs to one front instance (serving/service.py). A prediction request is
``accepted`` before its body is read (the one check both kinds of route make: drain, headers,
the large-request turn) and counted open until answered; it is ``admitted`` once its body is
read, or refused with 503 and Retry-After at once. On SIGTERM it drains: no new requests, the
open ones finish, then the server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from starlette.datastructures import Headers

from serving.errors import Rejection
from serving.settings import DRAIN_SECONDS, LARGE_REQUEST_BYTES, MAX_PREDICTIONS_IN_FLIGHT

if TYPE_CHECKING:
    from serving.uploads import Upload

logger = logging.getLogger("bentoml.service.dandelion")


class Admission:
    def __init__(self) -> None:
        self.in_flight = 0  # prediction requests admitted and not yet answered
        self.open_requests = 0  # prediction requests accepted, from their first byte
        self.draining = False  # SIGTERM received: finishing the open requests, taking no more
        self.large_requests = asyncio.Lock()  # their turn, one at a time

    @contextlib.asynccontextmanager
    async def accepted(self, headers: Headers, upload: Upload) -> AsyncIterator[None]:
        """Count the request as open until answered, or refuse it before reading its body:
        503 while draining, 4xx for headers that cannot announce ``upload``. A request over
        LARGE_REQUEST_BYTES first waits for the large ones before it."""
        if self.draining:
            raise Rejection("shutting_down", "the service is shutting down: retry shortly")
        upload.check_headers(headers)
        large = int(headers["content-length"]) > LARGE_REQUEST_BYTES
        self.open_requests += 1
        try:
            async with self.large_requests if large else contextlib.nullcontext():
                yield
        finally:
            self.open_requests -= 1

    @contextlib.asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        """Hold one of the MAX_PREDICTIONS_IN_FLIGHT places, or answer 503 at once. Taken once
        the body is read: a slow client does not hold a place, and the 503 reaches the client
        (a socket closed with unread bytes is reset, and the reset can discard the answer)."""
        if self.in_flight >= MAX_PREDICTIONS_IN_FLIGHT:
            raise Rejection(
                "overloaded",
                f"the service is at capacity ({MAX_PREDICTIONS_IN_FLIGHT} predictions in "
                "progress): retry shortly",
            )
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def drain_on_sigterm(self, then: Callable[[float], None] = lambda seconds: None) -> None:
        """On SIGTERM, stop taking requests but finish those accepted, call ``then`` (in a
        thread) with the seconds left of the drain, then stop the server.

        Uvicorn's own handler (which BentoML's worker runs) stops listening at once, and the
        connections that then wait in the socket's queue hang until the process exits. So
        this handler comes first: /readyz turns 503 and new predictions get 503 at once, the
        open requests finish (within DRAIN_SECONDS), and only then is uvicorn told to stop.
        Called where the service starts, in its event loop.
        """
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled there (a test serving the app in a thread)
        loop = asyncio.get_running_loop()
        stop_server = signal.getsignal(signal.SIGTERM)  # uvicorn's handler

        async def drain() -> None:
            deadline = time.monotonic() + DRAIN_SECONDS
            while self.open_requests and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            logger.info("SIGTERM: open requests finished, stopping")
            await asyncio.to_thread(then, max(deadline - time.monotonic(), 0.0))
            if callable(stop_server):
                stop_server(signal.SIGTERM, None)
            else:  # no handler to pass on to: exit as SIGTERM would have
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.raise_signal(signal.SIGTERM)

        def on_sigterm(signum: int, frame: object) -> None:
            if self.draining:
                return
            self.draining = True
            logger.info("SIGTERM: taking no new requests, finishing %d", self.open_requests)
            loop.call_soon_threadsafe(loop.create_task, drain())

        signal.signal(signal.SIGTERM, on_sigterm)
