"""Where heavy stages run: a Ray cluster when ``RAY_ADDRESS`` is set, this process otherwise.

The address says *where* the work runs, not *what* is computed (the outputs are the same bytes
either way), so it is an environment variable, like ``DOWNLOAD_BASE_URL``, and not a param.
Ray reads its token the same way: ``RAY_AUTH_MODE=token`` with ``RAY_AUTH_TOKEN_PATH`` (a file)
or ``RAY_AUTH_TOKEN``; never in Git (docs/pipeline.md, "Features on a Ray cluster").
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

RAY_ADDRESS_VARIABLE = "RAY_ADDRESS"  # Ray's own variable: ray.init() reads it too
INSTALL_HINT = 'pip install -e ".[ray]"'
TOKEN_HINT = (
    "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (a file holding the cluster's token) "
    "or RAY_AUTH_TOKEN"
)
# How long a cluster's port may take to accept a connection before it counts as unreachable:
# Ray itself retries an absent cluster for minutes.
REACH_TIMEOUT_SECONDS = 10.0
PACKAGE_DIR = Path(__file__).resolve().parent


class ClusterError(RuntimeError):
    """The configured Ray cluster cannot be used; the message says why and what to do."""


def ray_address(environ: dict[str, str] | None = None) -> str | None:
    """The configured cluster's address, or None: run in this process."""
    value = (os.environ if environ is None else environ).get(RAY_ADDRESS_VARIABLE, "")
    return value.strip() or None


def host_and_port(address: str) -> tuple[str, int]:
    """``host:port`` of a Ray address (``host:port`` or ``ray://host:port``)."""
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise ClusterError(
            f"{RAY_ADDRESS_VARIABLE}={address!r} is not a Ray address: give host:port "
            "(the head's GCS port, 6379 by default) or ray://host:port"
        )
    return parts.hostname, port


def check_reachable(address: str, timeout: float = REACH_TIMEOUT_SECONDS) -> None:
    """ClusterError unless the cluster's port accepts a connection within ``timeout``."""
    host, port = host_and_port(address)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as error:
        raise ClusterError(
            f"cannot reach the Ray cluster at {address} ({RAY_ADDRESS_VARIABLE}): {error}; "
            f"start it, or unset {RAY_ADDRESS_VARIABLE} to run in this process"
        ) from error


def import_ray():
    try:
        import ray
    except ImportError as error:
        raise ClusterError(
            f"{RAY_ADDRESS_VARIABLE} is set but Ray is not installed: {INSTALL_HINT}"
        ) from error
    return ray


def refused_token(error: BaseException) -> bool:
    """Whether Ray's connection error was its token authentication refusing us."""
    from ray.exceptions import AuthenticationError

    while error is not None:
        # Ray retries the handshake, then raises a RuntimeError quoting the last failure's
        # traceback: the refusal is only in its text.
        if isinstance(error, AuthenticationError) or "InvalidAuthToken" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def connected(address: str | None = None) -> Iterator[str]:
    """Connected to the Ray cluster at ``address`` (default: ``RAY_ADDRESS``) until exit.

    The workers run this checkout's ``pipeline`` package (shipped to them), so a cluster
    whose image has an older one still computes what this code says.
    """
    address = address or ray_address()
    if address is None:
        raise ClusterError(f"no Ray cluster configured: set {RAY_ADDRESS_VARIABLE}=host:port")
    check_reachable(address)
    ray = import_ray()
    try:
        ray.init(
            address=address,
            logging_level=logging.WARNING,
            log_to_driver=False,
            runtime_env={"py_modules": [str(PACKAGE_DIR)], "excludes": ["__pycache__"]},
        )
    except Exception as error:
        if refused_token(error):
            raise ClusterError(
                f"the Ray cluster at {address} refused our token (missing or wrong): {TOKEN_HINT}"
            ) from None
        raise ClusterError(f"cannot connect to the Ray cluster at {address}: {error}") from error
    try:
        yield address
    finally:
        ray.shutdown()
