"""pipeline/cluster.py: which cluster (if any) a stage runs on, and clear errors when it cannot.

The fast tier has no Ray (the `ray` extra): every check here happens before Ray is imported.
A real cluster, its token and a wrong one: tests/end_to_end/test_ray_features.py.
"""

from __future__ import annotations

import socket
import time

import pytest

from pipeline.cluster import (
    INSTALL_HINT,
    RAY_ADDRESS_VARIABLE,
    REACH_TIMEOUT_SECONDS,
    ClusterError,
    connected,
    host_and_port,
    ray_address,
)
from tests.support.http import free_port
from tests.support.paths import REPO_ROOT
from tests.support.processes import python_code


@pytest.mark.parametrize("environ", [{}, {RAY_ADDRESS_VARIABLE: ""}, {RAY_ADDRESS_VARIABLE: " "}])
def test_no_address_means_in_process(environ):
    assert ray_address(environ) is None


def test_the_address_is_rays_own_variable():
    assert RAY_ADDRESS_VARIABLE == "RAY_ADDRESS"
    assert ray_address({"RAY_ADDRESS": " 10.0.0.5:6379\n"}) == "10.0.0.5:6379"


@pytest.mark.parametrize(
    ("address", "expected"),
    [("10.0.0.5:6379", ("10.0.0.5", 6379)), ("ray://head.example:10001", ("head.example", 10001))],
)
def test_host_and_port(address, expected):
    assert host_and_port(address) == expected


@pytest.mark.parametrize("address", ["auto", "head.example", "head:port", "ray://:6379"])
def test_a_malformed_address_is_named(address):
    with pytest.raises(ClusterError, match=f"RAY_ADDRESS={address!r} is not a Ray address"):
        host_and_port(address)


def test_connecting_without_an_address_says_what_to_set(monkeypatch):
    monkeypatch.delenv(RAY_ADDRESS_VARIABLE, raising=False)
    with pytest.raises(ClusterError, match="no Ray cluster configured: set RAY_ADDRESS"):
        with connected():
            pass


def test_an_unreachable_cluster_fails_fast_and_clearly():
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with pytest.raises(ClusterError) as caught:
        with connected(address):
            pass
    assert time.monotonic() - started < REACH_TIMEOUT_SECONDS
    message = str(caught.value)
    assert message.startswith(f"cannot reach the Ray cluster at {address} (RAY_ADDRESS):")
    assert "unset RAY_ADDRESS to run in this process" in message
    assert "\n" not in message


def test_without_ray_installed_the_error_says_how_to_install_it():
    """A fresh interpreter where `import ray` fails, as it does without the extra, given an
    address that does answer."""
    code = (
        "import sys; sys.modules['ray'] = None\n"  # what an absent package raises: ImportError
        "from pipeline.cluster import ClusterError, connected\n"
        "try:\n"
        "    with connected(sys.argv[1]):\n"
        "        pass\n"
        "except ClusterError as error:\n"
        "    print(error)\n"
    )
    with socket.create_server(("127.0.0.1", 0)) as listener:
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        result = python_code(code, REPO_ROOT, address, env={}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"RAY_ADDRESS is set but Ray is not installed: {INSTALL_HINT}\n"
