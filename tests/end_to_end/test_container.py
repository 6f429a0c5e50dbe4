"""The bento as an OCI image: `bentoml containerize --backend podman`, run on 127.0.0.1.

There is no Docker engine on the build machines; podman builds and runs the same image.
tests/podman/ holds what this machine needs: podman settings and a local stand-in for the
`python:3.11-slim` base image (Docker Hub is unreachable). The image also runs as Compose runs
it: read-only, with docker-compose.yml's tmpfs and volumes alone; and a worker killed in it is
replaced with nothing done by hand.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml

from serving.contract import MODEL_NAME
from serving.prediction_log import read_records
from serving.settings import FEEDBACK_DIR_ENV, PREDICTION_LOG_DIR_ENV
from tests.support.http import free_port
from tests.support.needs import require_tools
from tests.support.paths import REPO_ROOT
from tests.support.processes import running_server
from tests.support.service import split_photos

pytestmark = pytest.mark.slow
PODMAN_DIR = REPO_ROOT / "tests" / "podman"
# The bound for a killed worker to be replaced and the service ready again.
HEALED_WITHIN_SECONDS = 30
WORKER_MODULE = "_bentoml_impl.worker.service"  # what BentoML's worker processes run


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


def read_only_run(name: str, volumes_dir: Path) -> list[str]:
    """`podman run` as docker-compose.yml runs the classifier: the root filesystem read-only,
    its tmpfs and its volumes (host directories here) and nothing else writable, the service's
    data directories where Compose puts them."""
    classifier = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"][
        "classifier"
    ]
    assert classifier["read_only"] is True
    # podman adds tmpfs on /tmp, /run and /var/tmp to a read-only container unless told not to.
    command = ["podman", "run", "--rm", "--init", "--name", name]
    command += ["--read-only", "--read-only-tmpfs=false"]
    for target in classifier["tmpfs"]:
        command += ["--tmpfs", target]
    for volume in classifier["volumes"]:
        source, target = volume.split(":")[:2]
        (volumes_dir / source).mkdir(parents=True)
        # :U gives it to the image's user, as Compose's one-shot feedback-spool service does.
        command += ["-v", f"{volumes_dir / source}:{target}:U"]
    for variable in (FEEDBACK_DIR_ENV, PREDICTION_LOG_DIR_ENV):
        command += ["-e", f"{variable}={classifier['environment'][variable]}"]
    return command


@contextlib.contextmanager
def read_only_container(image: str, env: dict, tmp_path: Path):
    """(name, url, volumes' host directory) of the image running read-only, until the end."""
    name = f"{MODEL_NAME}-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    volumes = tmp_path / "volumes"
    command = read_only_run(name, volumes) + ["-p", f"127.0.0.1:{port}:3000", image]
    try:
        with running_server(command, url, tmp_path / "container.log", env=env):
            yield name, url, volumes
    finally:
        subprocess.run(["podman", "rm", "-f", name], env=env, capture_output=True)


def test_the_read_only_container_serves_predictions_feedback_and_metrics(
    image, container_env, reproduced, tmp_path
):
    label, path = split_photos(reproduced.workspace)[0]
    photo = Path(path).read_bytes()
    with read_only_container(image, container_env, tmp_path) as (_, url, volumes):
        answer = requests.post(f"{url}/predict", files={"image": ("p.jpg", photo)}, timeout=60)
        assert answer.status_code == 200, answer.text
        feedback = requests.post(
            f"{url}/feedback", files={"image": ("p.jpg", photo)}, data={"label": label}, timeout=60
        )
        assert feedback.status_code == 202, feedback.text
        metrics = requests.get(f"{url}/metrics", timeout=60)
        assert metrics.status_code == 200
        assert 'classifier_predictions_total{label="' in metrics.text
    # Nothing accepted is lost: the feedback's photo and the answer are on the volumes.
    spool = volumes / "feedback-spool"  # docker-compose.yml's names
    assert [p for p in spool.rglob(feedback.json()["photo_sha256"]) if p.is_file()]
    records = list(read_records(volumes / "prediction-log"))
    assert answer.json()["answer_id"] in [record.get("answer_id") for record in records]


def worker_pids(name: str, env: dict) -> list[str]:
    """The PIDs (in the container) of BentoML's worker processes, from `podman top`."""
    top = subprocess.run(
        ["podman", "top", name, "pid", "args"], env=env, capture_output=True, text=True, check=True
    )
    return [line.split()[0] for line in top.stdout.splitlines() if WORKER_MODULE in line]


def test_a_killed_worker_is_replaced_and_the_service_ready_again_within_30_s(
    image, container_env, reproduced, tmp_path
):
    """BentoML respawns a dead worker only outside containers; the bento's start script
    (pipeline/bento.py container_start) makes the image's server respawn it too."""
    _, path = split_photos(reproduced.workspace)[0]
    with read_only_container(image, container_env, tmp_path) as (name, url, _):
        (worker,) = worker_pids(name, container_env)
        kill = ["podman", "exec", name, "bash", "-c", f"kill -KILL {worker}"]
        subprocess.run(kill, env=container_env, check=True, timeout=60)
        killed = time.monotonic()
        healed = None
        while healed is None and time.monotonic() - killed < 2 * HEALED_WITHIN_SECONDS:
            with contextlib.suppress(requests.RequestException):
                ready = requests.get(f"{url}/readyz", timeout=2).status_code == 200
                if ready and worker_pids(name, container_env) not in ([], [worker]):
                    healed = time.monotonic() - killed
            time.sleep(0.25)
        print(f"worker SIGKILLed: /readyz 200 again, from a new worker, after {healed} s")
        assert healed is not None and healed <= HEALED_WITHIN_SECONDS
        with open(path, "rb") as handle:
            answer = requests.post(f"{url}/predict", files={"image": handle}, timeout=60)
        assert answer.status_code == 200, answer.text
