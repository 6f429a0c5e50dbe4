"""The alerting chain's parts as tests run them: the project's alertmanager.yml pointed at a
relay, real Alertmanager on 127.0.0.1, the relay (in this process or as ``python -m``), and
alerts posted to Alertmanager's v2 API as Prometheus posts them."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import requests
import yaml

from alert_relay.relay import (
    API_URL_ENV,
    HEALTH_PATH,
    REPOSITORY_ENV,
    TOKEN_FILE_ENV,
    Config,
    RelayServer,
)
from tests.support.http import free_port, in_thread
from tests.support.monitoring import MONITORING
from tests.support.needs import require_tools
from tests.support.processes import running_server

ALERTMANAGER_CONFIG = MONITORING / "alertmanager.yml"
RETRAIN_RECEIVER = "retrain"
REPOSITORY = "dandelion-team/dandelion-vs-grass"
TOKEN = "github_pat_test_only_0123456789"


def alertmanager_config() -> dict:
    return yaml.safe_load(ALERTMANAGER_CONFIG.read_text())


def retrain_webhook(config: dict) -> dict:
    (receiver,) = [r for r in config["receivers"] if r["name"] == RETRAIN_RECEIVER]
    (webhook,) = receiver["webhook_configs"]
    return webhook


def config_for_relay(path: Path, relay_url: str) -> Path:
    """The project's alertmanager.yml with only the relay's host and port replaced."""
    config = alertmanager_config()
    webhook = retrain_webhook(config)
    webhook["url"] = relay_url + urlsplit(webhook["url"]).path
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@contextlib.contextmanager
def running_alertmanager(config: Path, root: Path) -> Iterator[str]:
    """Debian's Alertmanager on a free 127.0.0.1 port, its own storage, no cluster."""
    (binary,) = require_tools("prometheus-alertmanager")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        binary,
        f"--config.file={config}",
        f"--storage.path={root / 'alertmanager-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
    ]
    with running_server(command, url, root / "alertmanager.log", ready_path="/-/ready", timeout=30):
        yield url


def relay_env(github_url: str, token_file: Path) -> dict[str, str]:
    token_file.write_text(TOKEN + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return dict(
        env,
        **{REPOSITORY_ENV: REPOSITORY, TOKEN_FILE_ENV: str(token_file), API_URL_ENV: github_url},
    )


@contextlib.contextmanager
def relay_process(github_url: str, root: Path) -> Iterator[str]:
    """``python -m alert_relay`` on a free port, configured from its environment."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = relay_env(github_url, root / "token")
    command = [sys.executable, "-m", "alert_relay", "--host", "127.0.0.1", "--port", str(port)]
    with running_server(
        command, url, root / "relay.log", env=env, ready_path=HEALTH_PATH, timeout=30
    ):
        yield url


@contextlib.contextmanager
def relay_in_process(config: Config) -> Iterator[str]:
    with in_thread(RelayServer(("127.0.0.1", 0), config)) as url:
        yield url


def post_alert(alertmanager_url: str, labels: dict, annotations: dict, age: timedelta) -> None:
    """One firing alert, as Prometheus posts it, that started ``age`` ago."""
    started = datetime.now(UTC) - age
    alert = {
        "labels": labels,
        "annotations": annotations,
        "startsAt": started.isoformat(),
        "generatorURL": "http://127.0.0.1:9090/graph",
    }
    response = requests.post(f"{alertmanager_url}/api/v2/alerts", json=[alert], timeout=10)
    assert response.status_code == 200, response.text
