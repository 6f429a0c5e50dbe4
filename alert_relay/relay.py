"""The relay's HTTP server: Alertmanager posts to ``/alerts``; each notification with a firing
alert becomes one repository_dispatch on GitHub (``dispatch.EVENT_TYPE``).

Nothing accepted is lost: the relay answers 200 only once GitHub has accepted the dispatch.
When GitHub fails, times out or cannot be reached, it answers 5xx, and Alertmanager retries the
notification (until its group_interval ends, then again at the next one). A body that is not a
notification gets a 4xx, which Alertmanager does not retry: sending it again cannot help.

Configuration, from the environment (docs/deploy-and-monitor.md, *Alerts start retraining*):
``RELAY_GITHUB_REPOSITORY`` (owner/name), the token from the file ``RELAY_GITHUB_TOKEN_FILE``
or the variable ``RELAY_GITHUB_TOKEN``, and ``RELAY_GITHUB_API_URL`` (GitHub's by default).
"""

from __future__ import annotations

import argparse
import http.server
import json
import logging
import os
import re
import signal
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from alert_relay.dispatch import BadNotification, dispatch_request, parse_notification

WEBHOOK_PATH = "/alerts"  # deploy/monitoring/alertmanager.yml's webhook URL ends with it
HEALTH_PATH = "/healthz"
DEFAULT_PORT = 9095
DEFAULT_API_URL = "https://api.github.com"
REPOSITORY_ENV = "RELAY_GITHUB_REPOSITORY"
TOKEN_FILE_ENV = "RELAY_GITHUB_TOKEN_FILE"
TOKEN_ENV = "RELAY_GITHUB_TOKEN"
API_URL_ENV = "RELAY_GITHUB_API_URL"
# A notification of ten alerts is about 10 KB; 1 MiB leaves room for hundreds.
MAX_BODY_BYTES = 1024 * 1024
READ_TIMEOUT_SECONDS = 10  # a client that stalls mid-body gets 408
GITHUB_TIMEOUT_SECONDS = 10  # then 504, and Alertmanager tries again
REPOSITORY = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*)/[A-Za-z0-9._-]+")

log = logging.getLogger("alert_relay")


class ConfigError(ValueError):
    """The relay cannot start: the message says which variable to set, and to what."""


@dataclass(frozen=True)
class Config:
    repository: str  # owner/name
    token: str
    api_url: str = DEFAULT_API_URL
    timeout: float = GITHUB_TIMEOUT_SECONDS

    def __repr__(self) -> str:  # never print the token
        return f"Config(repository={self.repository!r}, api_url={self.api_url!r})"

    @property
    def dispatch_url(self) -> str:
        return f"{self.api_url.rstrip('/')}/repos/{self.repository}/dispatches"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        """The configuration in ``env``; an empty variable counts as unset (compose's
        ``${VAR:-}`` gives an empty one)."""
        repository = env.get(REPOSITORY_ENV, "").strip()
        if not repository:
            raise ConfigError(
                f"{REPOSITORY_ENV} is not set: the GitHub repository (owner/name) whose "
                "retrain workflow the alerts start"
            )
        if not REPOSITORY.fullmatch(repository):
            raise ConfigError(f"{REPOSITORY_ENV}={repository!r} is not owner/name")
        api_url = env.get(API_URL_ENV, "").strip() or DEFAULT_API_URL
        parsed = urllib.parse.urlsplit(api_url)
        if parsed.scheme not in {"http", "https"} or not parsed.netloc:
            raise ConfigError(f"{API_URL_ENV}={api_url!r} is not an http(s) URL")
        return cls(repository=repository, token=read_token(env), api_url=api_url)


def read_token(env: Mapping[str, str]) -> str:
    token_file = env.get(TOKEN_FILE_ENV, "").strip()
    token_value = env.get(TOKEN_ENV, "").strip()
    if token_file and token_value:
        raise ConfigError(f"both {TOKEN_FILE_ENV} and {TOKEN_ENV} are set: keep one")
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as error:
            raise ConfigError(
                f"cannot read the token file {TOKEN_FILE_ENV}={token_file}: {error.strerror} "
                "(it must exist and be readable by the relay's user)"
            ) from None
        if not token:
            raise ConfigError(f"the token file {TOKEN_FILE_ENV}={token_file} is empty")
        return token
    if token_value:
        return token_value
    raise ConfigError(
        f"no GitHub token: set {TOKEN_FILE_ENV} (a file holding it) or {TOKEN_ENV}; it needs "
        "the right to start workflows (fine-grained: Contents read and write)"
    )


class DispatchFailed(RuntimeError):
    """GitHub did not accept the dispatch; ``status`` is what the relay answers (5xx)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def send_dispatch(config: Config, body: dict) -> None:
    """POST ``body`` to GitHub's repository_dispatch; DispatchFailed unless it answers 2xx."""
    request = urllib.request.Request(
        config.dispatch_url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={
            "Accept": "application/vnd.github+json",
            "Authorization": f"Bearer {config.token}",
            "Content-Type": "application/json",
            "User-Agent": "dandelion-alert-relay",
            "X-GitHub-Api-Version": "2022-11-28",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=config.timeout) as response:
            response.read(MAX_BODY_BYTES)
    except urllib.error.HTTPError as error:
        detail = error.read(500).decode(errors="replace").strip()
        raise DispatchFailed(f"GitHub answered {error.code}: {detail}", 502) from None
    except TimeoutError:
        raise DispatchFailed(f"GitHub did not answer within {config.timeout:g} s", 504) from None
    except urllib.error.URLError as error:
        if isinstance(error.reason, TimeoutError):
            message = f"GitHub did not answer within {config.timeout:g} s"
            raise DispatchFailed(message, 504) from None
        raise DispatchFailed(f"GitHub cannot be reached: {error.reason}", 502) from None
    except OSError as error:  # a connection reset mid-answer
        raise DispatchFailed(f"GitHub's answer was cut: {error}", 502) from None


class RelayHandler(http.server.BaseHTTPRequestHandler):
    server: RelayServer
    server_version = "dandelion-alert-relay"
    # One request per connection: an idle keep-alive connection would hold its thread, and
    # so the relay's shutdown, for the read timeout. Alertmanager sends few requests.
    protocol_version = "HTTP/1.0"
    timeout = READ_TIMEOUT_SECONDS  # applies to every read of the request

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == HEALTH_PATH:
            self.answer(200, {"status": "ok"})
        else:
            self.answer(404, {"error": f"no such path; Alertmanager posts to {WEBHOOK_PATH}"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path != WEBHOOK_PATH:
            self.answer(404, {"error": f"no such path; Alertmanager posts to {WEBHOOK_PATH}"})
            return
        body = self.read_body()
        if body is None:
            return
        try:
            notification = parse_notification(body)
        except BadNotification as error:
            self.answer(error.status, {"error": str(error)})
            return
        request = dispatch_request(notification)
        if request is None:
            log.info("no firing alert in the notification: nothing dispatched")
            self.answer(200, {"dispatched": False, "reason": "no firing alert"})
            return
        names = ", ".join(alert["name"] for alert in request["client_payload"]["alerts"])
        try:
            send_dispatch(self.server.config, request)
        except DispatchFailed as error:
            log.error("dispatch for %s failed, Alertmanager will retry: %s", names, error)
            self.answer(error.status, {"error": str(error)})
            return
        log.info("dispatched %s to %s: %s", request["event_type"], self.server.config, names)
        self.answer(200, {"dispatched": True, "event_type": request["event_type"]})

    def do_PUT(self) -> None:  # noqa: N802
        self.answer(405, {"error": f"only POST {WEBHOOK_PATH} and GET {HEALTH_PATH}"})

    do_DELETE = do_PATCH = do_PUT  # noqa: N815

    def read_body(self) -> bytes | None:
        """The request's body, or None once a 4xx has been answered."""
        if self.headers.get("Transfer-Encoding"):
            self.answer(411, {"error": "send the body with a Content-Length"})
            return None
        length = self.headers.get("Content-Length")
        if length is None:
            self.answer(411, {"error": "Content-Length is required"})
            return None
        if not length.isdigit():
            self.answer(400, {"error": f"bad Content-Length {length!r}"})
            return None
        if int(length) > MAX_BODY_BYTES:
            self.answer(413, {"error": f"the body is over {MAX_BODY_BYTES} bytes"})
            return None
        try:
            body = self.rfile.read(int(length))
        except TimeoutError:
            self.answer(408, {"error": f"the body did not arrive within {self.timeout} s"})
            return None
        if len(body) < int(length):
            self.answer(400, {"error": "the body is shorter than its Content-Length"})
            return None
        return body

    def answer(self, status: int, document: dict) -> None:
        payload = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's name
        log.info("%s %s", self.address_string(), format % args)


class RelayServer(http.server.ThreadingHTTPServer):
    # Stopping waits for requests in flight (each bounded by the timeouts above): a dispatch
    # GitHub accepted is answered 200, not cut into a retry that would dispatch it twice.
    daemon_threads = False

    def __init__(self, address: tuple[str, int], config: Config):
        super().__init__(address, RelayHandler)
        self.config = config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="dandelion-alert-relay",
        description="Relay Alertmanager's webhook to GitHub's repository_dispatch "
        f"(event type model-degraded). Configured by {REPOSITORY_ENV}, {TOKEN_FILE_ENV} or "
        f"{TOKEN_ENV}, and {API_URL_ENV}.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = Config.from_env(os.environ)
    except ConfigError as error:
        print(f"dandelion-alert-relay: not started: {error}", file=sys.stderr)
        return 2
    server = RelayServer((args.host, args.port), config)

    def stop(signum, frame) -> None:
        threading.Thread(target=server.shutdown).start()  # shutdown() waits for serve_forever

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    log.info("relaying http://%s:%s%s to %s", host, port, WEBHOOK_PATH, config.dispatch_url)
    server.serve_forever()
    server.server_close()
    log.info("stopped")
    return 0
