"""A stand-in for GitHub's repository_dispatch API on 127.0.0.1: it records every POST and
answers 204 as GitHub does, or 500 to the next ``fail_next`` requests, or late by ``delay``."""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from tests.support.http import serve_http


@dataclass
class Dispatch:
    path: str
    headers: dict[str, str]
    body: dict


@dataclass
class GitHubStandIn:
    url: str = ""
    fail_next: int = 0  # answer 500 to this many requests, then 204
    delay: float = 0.0  # seconds before answering
    attempts: int = 0  # every POST, failed ones included
    received: list[Dispatch] = field(default_factory=list)  # the ones answered 204
    changed: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(self, count: int, timeout: float) -> list[Dispatch]:
        """The first ``count`` accepted dispatches, waiting up to ``timeout`` seconds."""
        with self.changed:
            arrived = self.changed.wait_for(lambda: len(self.received) >= count, timeout)
            assert arrived, f"{len(self.received)} dispatch(es) after {timeout}s, not {count}"
            return list(self.received)


class DispatchHandler(http.server.BaseHTTPRequestHandler):
    def __init__(self, *args, state: GitHubStandIn, **kwargs):
        self.state = state
        super().__init__(*args, **kwargs)

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        time.sleep(self.state.delay)
        with self.state.changed:
            self.state.attempts += 1
            failing = self.state.fail_next > 0
            if failing:
                self.state.fail_next -= 1
            else:
                dispatch = Dispatch(self.path, dict(self.headers.items()), json.loads(body))
                self.state.received.append(dispatch)
            self.state.changed.notify_all()
        if failing:
            answer = json.dumps({"message": "Server Error"}).encode()
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)
        else:
            self.send_response(204)
            self.end_headers()

    def log_message(self, format, *args):  # noqa: A002 - keep test output readable
        pass


@contextlib.contextmanager
def github_stand_in(**settings) -> Iterator[GitHubStandIn]:
    state = GitHubStandIn(**settings)
    with serve_http(DispatchHandler, state=state) as url:
        state.url = url
        yield state
