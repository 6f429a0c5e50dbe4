"""The `minio` DVC remote and MLflow artifacts against a real S3 server on 127.0.0.1.

The server is moto's standalone S3 server with credential checks switched on, or a real
MinIO when MINIO_ENDPOINT is set (see the `s3` fixture).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time

import mlflow
import pytest
import yaml

from tests.support.dvc import delete_cache_and_outputs, dvc, file_hashes, output_paths
from tests.support.git import git
from tests.support.http import free_port
from tests.support.paths import EVALUATE_METRICS, PIPELINE_PATHS
from tests.support.processes import running_server
from tests.support.s3 import S3Endpoint, configure_remote

pytestmark = pytest.mark.slow

# Stores that reject botocore's default checksums need this setting (see docs/team-setup.md).
CHECKSUM_WHEN_REQUIRED = {
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}


def snapshot(workspace) -> dict[str, str]:
    """Hashes of every output and every cache file."""
    return file_hashes(workspace, [*output_paths(workspace), ".dvc/cache"])


@pytest.mark.parametrize("checksums", ["botocore default", "when_required"])
def test_push_then_pull_restores_every_output(pipeline_copy, reproduced, s3, checksums):
    env = dict(reproduced.env, **(CHECKSUM_WHEN_REQUIRED if checksums == "when_required" else {}))
    configure_remote(pipeline_copy, s3, env)
    outputs = output_paths(pipeline_copy)
    assert {PIPELINE_PATHS[key] for key in ("raw_dir", "arrays_dir", "model_dir")} <= set(outputs)
    before = file_hashes(pipeline_copy, outputs)

    push = dvc(pipeline_copy, "push", env=env)
    assert push.returncode == 0, push.stdout + push.stderr
    cache_files = [p for p in (pipeline_copy / ".dvc/cache/files/md5").rglob("*") if p.is_file()]
    stored = s3.objects()
    assert len(stored) == len(cache_files) > 0
    assert all(key.startswith("dandelion-vs-grass/files/md5/") for key in stored)
    in_sync = dvc(pipeline_copy, "status", "--cloud", "--json", env=env)
    assert in_sync.returncode == 0 and json.loads(in_sync.stdout) == {}, in_sync.stdout

    delete_cache_and_outputs(pipeline_copy, outputs)

    pull = dvc(pipeline_copy, "pull", env=env)
    assert pull.returncode == 0, pull.stdout + pull.stderr
    assert file_hashes(pipeline_copy, outputs) == before
    for args in (["status", "--cloud", "--json"], ["status", "--json"]):
        status = dvc(pipeline_copy, *args, env=env)
        assert status.returncode == 0 and json.loads(status.stdout) == {}, status.stdout


def test_a_pushed_experiment_is_pulled_with_its_outputs_into_a_fresh_clone(
    pipeline_copy, reproduced, s3, tmp_path
):
    env = reproduced.env
    origin = tmp_path / "origin.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(origin))
    git(pipeline_copy, "add", "-A")  # whatever the run left (nothing tracked changes)
    git(pipeline_copy, "commit", "-q", "--allow-empty", "-m", "pipeline run")
    git(pipeline_copy, "remote", "add", "origin", str(origin))
    git(pipeline_copy, "push", "-q", "origin", "main")
    configure_remote(pipeline_copy, s3, env)

    run = dvc(pipeline_copy, "exp", "run", "-n", "dropout-03", "-S", "train.dropout=0.3", env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    metrics = (pipeline_copy / EVALUATE_METRICS).read_text()
    model = file_hashes(pipeline_copy, [PIPELINE_PATHS["model_dir"]])
    push = dvc(pipeline_copy, "exp", "push", "origin", "dropout-03", env=env)
    assert push.returncode == 0, push.stdout + push.stderr

    teammate = tmp_path / "teammate"
    git(tmp_path, "clone", "-q", str(origin), str(teammate))
    configure_remote(teammate, s3, env)
    pull = dvc(teammate, "exp", "pull", "origin", "dropout-03", env=env)
    assert pull.returncode == 0, pull.stdout + pull.stderr
    listed = dvc(teammate, "exp", "list", "--name-only", env=env)
    assert "dropout-03" in listed.stdout.split()

    apply = dvc(teammate, "exp", "apply", "dropout-03", env=env)
    assert apply.returncode == 0, apply.stdout + apply.stderr
    assert yaml.safe_load((teammate / "params.yaml").read_text())["train"]["dropout"] == 0.3
    assert (teammate / EVALUATE_METRICS).read_text() == metrics
    assert file_hashes(teammate, [PIPELINE_PATHS["model_dir"]]) == model


def test_wrong_credentials_fail_clearly_and_touch_nothing(pipeline_copy, reproduced, s3):
    env = reproduced.env
    configure_remote(pipeline_copy, s3, env, secret_access_key="not-the-secret")
    before = snapshot(pipeline_copy)

    for args in (["push"], ["status", "--cloud"], ["fetch"]):
        result = dvc(pipeline_copy, *args, env=env)
        assert result.returncode != 0, args
        output = result.stdout + result.stderr
        assert "SignatureDoesNotMatch" in output or "Forbidden" in output, output

    assert snapshot(pipeline_copy) == before
    assert s3.objects() == {}


def test_an_endpoint_that_is_not_listening_fails_within_30_seconds(pipeline_copy, reproduced):
    dead = S3Endpoint(f"http://127.0.0.1:{free_port()}", "dvc-store", "key", "secret")
    configure_remote(pipeline_copy, dead, reproduced.env)
    before = snapshot(pipeline_copy)

    started = time.monotonic()
    result = dvc(pipeline_copy, "push", env=reproduced.env)
    elapsed = time.monotonic() - started

    assert result.returncode != 0
    assert "Could not connect to the endpoint URL" in result.stdout + result.stderr
    assert elapsed < 30, f"took {elapsed:.1f}s"
    assert snapshot(pipeline_copy) == before


@contextlib.contextmanager
def mlflow_server(s3: S3Endpoint, workdir):
    """`mlflow server` on loopback storing artifacts in the S3 bucket (the compose set-up)."""
    port = free_port()
    env = dict(
        os.environ,
        AWS_ACCESS_KEY_ID=s3.access_key_id,
        AWS_SECRET_ACCESS_KEY=s3.secret_access_key,
        MLFLOW_S3_ENDPOINT_URL=s3.url,
    )
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination",
        f"s3://{s3.bucket}/mlflow",
    ]
    url = f"http://127.0.0.1:{port}"
    log_path = workdir / "mlflow-server.log"
    with running_server(command, url, log_path, env=env, ready_path="/health", timeout=90):
        yield url


def test_mlflow_model_artifact_lands_in_the_bucket_and_downloads_identical(
    reproduced, s3, tmp_path, monkeypatch
):
    # The team set-up (docs/team-setup.md): downloads go through the tracking server, because
    # presigned URLs would name the S3 endpoint as the server sees it (http://minio:9000 in
    # compose). moto could not serve them here anyway: its IAM check rejects presigned requests.
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD", "false")
    monkeypatch.setenv("MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD", "false")
    # Bounded client retries: a failure shows up in seconds, not after minutes of backoff.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    model_file = reproduced.workspace / PIPELINE_PATHS["model_dir"] / "classifier.keras"
    with mlflow_server(s3, tmp_path) as url:
        client = mlflow.MlflowClient(tracking_uri=url)
        experiment_id = client.create_experiment("team")
        run = client.create_run(experiment_id)
        client.log_artifact(run.info.run_id, str(model_file), artifact_path="model")
        client.set_terminated(run.info.run_id)

        stored = {key: body for key, body in s3.objects().items() if key.endswith(".keras")}
        assert list(stored) == [
            f"mlflow/{experiment_id}/{run.info.run_id}/artifacts/model/classifier.keras"
        ]
        assert stored.popitem()[1] == model_file.read_bytes()

        downloaded = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id,
            artifact_path="model/classifier.keras",
            dst_path=str(tmp_path / "download"),
            tracking_uri=url,
        )
        assert open(downloaded, "rb").read() == model_file.read_bytes()
