"""Helpers shared by the tests and the benchmark script (no pytest imports here)."""

from __future__ import annotations

import ast
import contextlib
import csv
import functools
import hashlib
import http.server
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import numpy as np
import requests
import yaml
from PIL import Image

from serving.contract import PREDICTIONS_FILE
from stages.params import pipeline_paths

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = REPO_ROOT.parent / "shared"
DATASET_MIRROR = SHARED / "datasets" / "greenr-airflow"
WEIGHTS_DIR = SHARED / "weights"
MOBILENET_WEIGHTS = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
REPORT_SCRIPT = REPO_ROOT / ".github" / "scripts" / "report.py"
# The pipeline's paths, declared once in dvc.yaml's `vars` (catalogue, model_dir, ...).
PIPELINE_PATHS: dict[str, str] = pipeline_paths(REPO_ROOT / "dvc.yaml")
# Its stages, in the order dvc.yaml lists them (the order a cold `dvc repro` runs them).
PIPELINE_STAGES: list[str] = list(yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"])
EVALUATE_METRICS = f"{PIPELINE_PATHS['evaluate_dir']}/metrics.json"
EVALUATE_PREDICTIONS = f"{PIPELINE_PATHS['evaluate_dir']}/{PREDICTIONS_FILE}"


@contextlib.contextmanager
def serve_http(handler_class, **handler_kwargs) -> Iterator[str]:
    """Run an HTTP server on a free 127.0.0.1 port; yield its base URL; stop it on exit."""
    handler = functools.partial(handler_class, **handler_kwargs)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True  # a handler still sleeping cannot block the teardown
    thread = threading.Thread(target=server.serve_forever, daemon=True)
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


def prepare_keras_home(keras_home: Path) -> Path:
    """A KERAS_HOME whose cache holds the offline ImageNet backbone (copied, as its README says)."""
    models = keras_home / "models"
    models.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(WEIGHTS_DIR / MOBILENET_WEIGHTS, models / MOBILENET_WEIGHTS)
    return keras_home


def copy_workspace(dest: Path) -> Path:
    """Copy the project's files (tracked and not ignored) into a fresh Git repo at ``dest``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    git(dest, "init", "-q", "-b", "main")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", "workspace copy")
    return dest


def git(cwd: Path, *args: str, env=None, check: bool = True) -> subprocess.CompletedProcess:
    """``git`` with a fixed test identity (for commits), its output captured."""
    identity = ["-c", "user.name=test", "-c", "user.email=test@localhost"]
    return subprocess.run(
        ["git", *identity, *args], cwd=cwd, env=env, check=check, capture_output=True, text=True
    )


def set_param(workspace: Path, dotted_key: str, value) -> None:
    path = workspace / "params.yaml"
    params = yaml.safe_load(path.read_text())
    *parents, leaf = dotted_key.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def pipeline_env(keras_home: Path, bentoml_home: Path) -> dict[str, str]:
    """Environment for running ``dvc`` in a workspace copy with this interpreter's tools."""
    env = dict(
        os.environ,
        KERAS_HOME=str(keras_home),
        BENTOML_HOME=str(bentoml_home),
        BENTOML_DO_NOT_TRACK="true",
    )
    env.pop("MLFLOW_TRACKING_URI", None)  # the workspace's own default store
    return with_interpreter_tools(env)


def with_interpreter_tools(env: dict[str, str]) -> dict[str, str]:
    """``env`` with this interpreter's scripts (dvc, ruff...) first on PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return dict(env, PATH=path)


def stages_run(dvc_output: str) -> list[str]:
    """The stages a `dvc repro` / `dvc exp run` ran, in order, from its output."""
    return re.findall(r"Running stage '(\w+)'", dvc_output)


def python_module(
    module: str, cwd: Path, *args: str, env: dict[str, str], timeout: float = 900
) -> subprocess.CompletedProcess:
    """``python -m module args`` with this interpreter, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dvc(workspace: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return python_module("dvc", workspace, *args, env=env)


@dataclass(frozen=True)
class ReportRun:
    result: subprocess.CompletedProcess
    markdown: Path  # images beside it
    github_output: Path  # the step outputs the workflows read


def run_report(workspace: Path, base: str, out_dir: Path, env=None) -> ReportRun:
    """Run .github/scripts/report.py in ``workspace`` as the workflows do."""
    markdown, github_output = out_dir / "report" / "report.md", out_dir / "github_output"
    github_output.unlink(missing_ok=True)
    result = subprocess.run(
        [sys.executable, str(REPORT_SCRIPT), base, str(markdown)],
        cwd=workspace,
        capture_output=True,
        text=True,
        env=dict(env or os.environ, GITHUB_OUTPUT=str(github_output)),
    )
    return ReportRun(result, markdown, github_output)


def make_image(color=(200, 180, 40), size=(64, 48), mode="RGB", fmt="JPEG", seed=0) -> bytes:
    """A small image with some texture, encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(color) + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@dataclass(frozen=True)
class S3Endpoint:
    """An S3-compatible server on loopback, a bucket on it and credentials that may use it."""

    url: str
    bucket: str
    access_key_id: str
    secret_access_key: str

    def client(self):
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name="us-east-1",
        )

    def objects(self) -> dict[str, bytes]:
        client = self.client()
        listing = client.list_objects_v2(Bucket=self.bucket).get("Contents", [])
        return {
            item["Key"]: client.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read()
            for item in listing
        }


@contextlib.contextmanager
def moto_s3_server() -> Iterator[str]:
    """moto's standalone S3 server on a free 127.0.0.1 port (as dvc-s3's own tests use it)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def fresh_moto_account(url: str, bucket: str) -> S3Endpoint:
    """Empty the moto server and make it check credentials, as MinIO always does.

    After ``reset-auth N`` moto serves N requests without credentials (the IAM set-up
    below) and then authenticates and authorises every request against IAM.
    """
    requests.post(f"{url}/moto-api/reset", timeout=10).raise_for_status()
    requests.post(f"{url}/moto-api/reset-auth", data=b"3", timeout=10).raise_for_status()
    iam = boto3.client(
        "iam",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="setup",
        aws_secret_access_key="setup",
    )
    iam.create_user(UserName="pipeline")
    policy = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }
    iam.put_user_policy(UserName="pipeline", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="pipeline")["AccessKey"]
    endpoint = S3Endpoint(url, bucket, key["AccessKeyId"], key["SecretAccessKey"])
    endpoint.client().create_bucket(Bucket=bucket)
    return endpoint


def configure_remote(workspace: Path, s3: S3Endpoint, env: dict[str, str], **overrides) -> None:
    """Point the project's `minio` remote at ``s3`` in .dvc/config.local (never committed)."""
    settings = {
        "url": f"s3://{s3.bucket}/dandelion-vs-grass",
        "endpointurl": s3.url,
        "access_key_id": s3.access_key_id,
        "secret_access_key": s3.secret_access_key,
        **overrides,
    }
    for key, value in settings.items():
        result = dvc(workspace, "remote", "modify", "--local", "minio", key, value, env=env)
        assert result.returncode == 0, result.stderr


def output_paths(workspace) -> list[str]:
    """Every output DVC caches (and so pushes), as the pipeline declares them."""
    from dvc.repo import Repo

    with Repo(str(workspace)) as repo:
        return sorted(out.def_path for out in repo.index.outs if out.use_cache)


def file_hashes(workspace, paths) -> dict[str, str]:
    hashes = {}
    for path in paths:
        root = workspace / path
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for file in files:
            hashes[str(file.relative_to(workspace))] = hashlib.sha256(file.read_bytes()).hexdigest()
    return hashes


def delete_cache_and_outputs(workspace: Path, outputs: list[str]) -> None:
    """What a fresh clone lacks: the DVC cache and every cached output."""
    shutil.rmtree(workspace / ".dvc" / "cache")
    for path in outputs:
        target = workspace / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()


def service_constant(name: str):
    """A module-level constant of serving/service.py, read without importing BentoML."""
    tree = ast.parse((REPO_ROOT / "serving" / "service.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [t.id for t in node.targets] == [name]:
            return ast.literal_eval(node.value)
    raise LookupError(name)


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


def split_photos(workspace: Path) -> list[tuple[str, str]]:
    """(label, path in the shared mirror) of every photo in the pipeline's test split."""
    with open(workspace / "data/split.csv", newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] == "test"]
    return [
        (row["label"], str(DATASET_MIRROR / "data" / row["label"] / row["path"].split("/")[-1]))
        for row in rows
    ]


@contextlib.contextmanager
def running_server(
    command: list[str],
    url: str,
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    ready_path: str = "/readyz",
    timeout: float = 240,
    cwd: Path | None = None,
) -> Iterator[subprocess.Popen]:
    """Start a server, wait until ``url + ready_path`` answers 200, stop it (and its children)."""
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            env=env,
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopping it stops its workers
        )
    try:
        _wait_until_ready(f"{url}{ready_path}", process, log_path, timeout)
        yield process
    finally:
        stop_process_group(process)


def _wait_until_ready(probe: str, process: subprocess.Popen, log_path: Path, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()
        with contextlib.suppress(requests.RequestException):
            if requests.get(probe, timeout=2).status_code == 200:
                return
        time.sleep(1)
    raise AssertionError(f"{probe} not ready after {timeout}s:\n{log_path.read_text()[-3000:]}")


def stop_process_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@dataclass(frozen=True)
class Prediction:
    """One row of evaluate's predictions file, with the photo's path in the shared mirror."""

    photo: str
    label: str
    predicted: str
    score: float
    novelty: float


def evaluated_predictions(workspace: Path) -> list[Prediction]:
    """What evaluate decided for every test photo (data/raw/<label>/<file> -> the mirror)."""
    with open(workspace / EVALUATE_PREDICTIONS, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [
        Prediction(
            str(DATASET_MIRROR / "data" / Path(row["path"]).relative_to(PIPELINE_PATHS["raw_dir"])),
            row["label"],
            row["predicted"],
            float(row["score"]),
            float(row["novelty"]),
        )
        for row in rows
    ]


@dataclass(frozen=True)
class RunningService:
    url: str
    metrics: dict  # what evaluate reported (test split) for the served model
    workspace: Path


@contextlib.contextmanager
def serving(bento_tag: str, workspace: Path, env: dict, log_dir: Path) -> Iterator[RunningService]:
    """`bentoml serve bento_tag` on a free loopback port, for the model ``workspace`` evaluated."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "bentoml", "serve", bento_tag]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    with running_server(command, url, log_dir / "serve.log", env=env):
        metrics = json.loads((workspace / EVALUATE_METRICS).read_text())["test"]
        yield RunningService(url, metrics, workspace)


def served_answers(url: str, photos: list[str], workers: int = 8) -> list[dict]:
    """`POST /predict` of every photo (bounded: one request each), the JSON answers in order."""
    from concurrent.futures import ThreadPoolExecutor

    def predict(photo: str) -> dict:
        with open(photo, "rb") as handle:
            response = requests.post(f"{url}/predict", files={"image": handle}, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(predict, photos))
