"""The features stage on a real local Ray cluster (token authentication on) gives the bytes it
gives in process; a client without the cluster's token gets a clear one-line error."""

from __future__ import annotations

import os

import pytest

from tests.support.paths import REPO_ROOT
from tests.support.processes import python_code

pytestmark = pytest.mark.slow

CONNECT = (
    "from pipeline.cluster import ClusterError, connected\n"
    "try:\n"
    "    with connected():\n"
    "        import ray\n"
    "        print(int(ray.cluster_resources()['CPU']))\n"
    "except ClusterError as error:\n"
    "    print(error)\n"
)


def test_a_client_with_the_token_connects(ray_cluster):
    result = python_code(CONNECT, REPO_ROOT, env=ray_cluster.client_env(dict(os.environ)))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "2\n"


@pytest.mark.parametrize("token", [None, "0" * 64])
def test_a_client_without_the_token_is_refused_clearly(ray_cluster, token):
    env = ray_cluster.client_env(dict(os.environ))
    del env["RAY_AUTH_TOKEN_PATH"]
    if token is None:
        del env["RAY_AUTH_MODE"]  # as a user who never heard of the token would run it
    else:
        env["RAY_AUTH_TOKEN"] = token
    result = python_code(CONNECT, REPO_ROOT, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        f"the Ray cluster at {ray_cluster.address} refused our token (missing or wrong): "
        "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (a file holding the cluster's token) "
        "or RAY_AUTH_TOKEN\n"
    )
