"""The bento as an OCI image: `bentoml containerize --backend podman`, run on 127.0.0.1.

There is no Docker engine on the build machines; podman builds and runs the same image.
tests/podman/ holds what this machine needs: podman settings and a local stand-in for the
`python:3.11-slim` base image (Docker Hub is unreachable).
"""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
import requests

from serving.contract import MODEL_NAME
from tests.support.http import free_port
from tests.support.needs import require_tools
from tests.support.paths import REPO_ROOT
from tests.support.processes import running_server
from tests.support.service import split_photos

pytestmark = pytest.mark.slow
PODMAN_DIR = REPO_ROOT / "tests" / "podman"


@pytest.fixture(scope="session")
def container_env(reproduced, promoted):
    """podman set up; the image is built from the promoted `dandelion-vs-grass:latest`."""
    require_tools("podman", "debootstrap", "runc")
    env = dict(reproduced.env, CONTAINERS_CONF=str(PODMAN_DIR / "containers.conf"))
    subprocess.run(["bash", str(PODMAN_DIR / "base-image.sh")], env=env, check=True, timeout=600)
    return env


@pytest.fixture(scope="session")
def image(container_env):
    tag = f"{MODEL_NAME}:test-{uuid.uuid4().hex[:8]}"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "bentoml",
            "containerize",
            f"{MODEL_NAME}:latest",
            "--backend",
            "podman",
            "-t",
            tag,
        ],
        env=container_env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    yield tag
    subprocess.run(["podman", "rmi", "-f", tag], env=container_env, capture_output=True)


def test_the_image_has_no_tensorflow_and_stays_small(image, container_env):
    inspect = ["podman", "image", "inspect", "--format", "{{.Size}}", image]
    size = int(subprocess.run(inspect, env=container_env, capture_output=True, text=True).stdout)
    print(f"image {image}: {size / 1e9:.2f} GB")
    code = "import importlib.metadata as m; print(*(d.metadata['Name'] for d in m.distributions()))"
    listed = subprocess.run(
        ["podman", "run", "--rm", "--entrypoint", "python3", image, "-c", code],
        env=container_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert listed.returncode == 0, listed.stderr
    packages = {name.lower() for name in listed.stdout.split()}
    assert "openvino" in packages and not {"tensorflow", "tensorflow-cpu", "keras"} & packages
    assert size <= 1.2e9  # the Keras engine's image was 2.58 GB


def test_container_serves_the_champion(service, image, container_env, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = ["podman", "run", "--rm", "--init", "-p", f"127.0.0.1:{port}:3000", image]
    with running_server(command, url, tmp_path / "container.log", env=container_env):
        correct = 0
        photos = split_photos(service.workspace)
        for label, path in photos:
            with open(path, "rb") as handle:
                answer = requests.post(f"{url}/predict", files={"image": handle}, timeout=60)
            assert answer.status_code == 200, answer.text
            correct += answer.json()["label"] == label
        assert correct / len(photos) >= service.metrics["accuracy"] - 1e-9
        bad = requests.post(f"{url}/predict", files={"image": ("x.jpg", b"nope")}, timeout=60)
        assert bad.status_code == 415
