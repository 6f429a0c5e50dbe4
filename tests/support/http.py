"""HTTP on loopback: small servers for tests, free ports, multipart bodies."""

from __future__ import annotations

import contextlib
import functools
import http.server
import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path

import requests


@contextlib.contextmanager
def serve_http(handler_class, **handler_kwargs) -> Iterator[str]:
    """Run an HTTP server on a free 127.0.0.1 port; yield its base URL; stop it on exit."""
    handler = functools.partial(handler_class, **handler_kwargs)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True  # a handler still sleeping cannot block the teardown
    with in_thread(server) as url:
        yield url


@contextlib.contextmanager
def in_thread(server: socketserver.BaseServer) -> Iterator[str]:
    """Serve ``server`` (bound to 127.0.0.1) from a thread; yield its base URL; stop it on exit."""
    # Polled every 50 ms for shutdown (not the default 0.5 s): each teardown waits that long.
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class QuietFileHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - keep test output readable
        pass


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    with serve_http(QuietFileHandler, directory=str(directory)) as url:
        yield url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def multipart_body(field: str, contents: list[bytes]) -> tuple[bytes, str]:
    """A multipart body with each of ``contents`` as a file ``<i>.jpg`` in ``field``; its
    Content-Type (with the boundary)."""
    files = [(field, (f"{i}.jpg", content)) for i, content in enumerate(contents)]
    prepared = requests.Request("POST", "http://127.0.0.1/", files=files).prepare()
    return prepared.body, prepared.headers["Content-Type"]
