"""docker-compose.yml, validated by a real Compose implementation, and the DVC remote config.

No container engine can run MinIO on the build machines, so the stack is checked with
`docker-compose config` (Debian's docker-compose), which parses, validates and interpolates
the file exactly as `docker compose up` would before starting anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from urllib.parse import urlparse

import pytest
import yaml
from dvc.repo import Repo
from support import REPO_ROOT, copy_workspace


def compose_config(*extra_args: str) -> dict:
    binary = shutil.which("docker-compose")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is missing: .ci/run installs it (apt-get)")
        pytest.skip("docker-compose not installed (Debian package docker-compose)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MINIO_", "MLFLOW_"))}
    result = subprocess.run(
        [binary, "--project-directory", str(REPO_ROOT), *extra_args, "config"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def dvc_remote() -> dict[str, str]:
    """The default remote as committed (.dvc/config alone, not config.local)."""
    with Repo(str(REPO_ROOT)) as repo:
        committed = repo.config.read("repo")
    assert committed["core"]["remote"] == "minio"
    return committed["remote"]["minio"]


def published_ports(service: dict) -> list[tuple[str, str, str]]:
    """(host ip, host port, container port) of each "IP:HOST:CONTAINER/proto" entry."""
    return [tuple(port.split("/")[0].split(":")) for port in service.get("ports", [])]


def test_stack_has_minio_bootstrap_and_mlflow():
    services = compose_config()["services"]
    assert set(services) == {"minio", "create-buckets", "mlflow"}

    minio = services["minio"]
    assert "@sha256:" in minio["image"] and ":RELEASE." in minio["image"]
    assert minio["healthcheck"]["test"]
    assert any(volume.split(":")[1] == "/data" for volume in minio["volumes"])
    assert "minio-data" in compose_config()["volumes"]

    bootstrap = services["create-buckets"]
    assert bootstrap["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb --ignore-existing" in " ".join(bootstrap["command"])

    mlflow = services["mlflow"]
    assert mlflow["depends_on"]["create-buckets"]["condition"] == ("service_completed_successfully")
    assert "--artifacts-destination=s3://mlflow/" in mlflow["command"]
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    assert mlflow["environment"]["AWS_REQUEST_CHECKSUM_CALCULATION"] == "when_required"


def test_every_port_is_published_on_loopback_only():
    for name, service in compose_config()["services"].items():
        for host_ip, _, _ in published_ports(service):
            assert host_ip == "127.0.0.1", name


def test_credentials_default_to_dev_values_and_the_env_file_overrides_them():
    default = compose_config()["services"]
    assert default["minio"]["environment"]["MINIO_ROOT_PASSWORD"] == "minioadmin"
    overridden = compose_config("--env-file", str(REPO_ROOT / ".env.example"))["services"]
    assert overridden["minio"]["environment"]["MINIO_ROOT_PASSWORD"] == "change-me-please"
    assert overridden["mlflow"]["environment"]["AWS_SECRET_ACCESS_KEY"] == "change-me-please"


def test_dvc_remote_points_at_the_bucket_and_port_the_stack_provides():
    remote = dvc_remote()
    services = compose_config()["services"]
    bucket = urlparse(remote["url"]).netloc
    assert bucket == services["create-buckets"]["environment"]["DVC_BUCKET"]
    endpoint = urlparse(remote["endpointurl"])
    s3_api = [
        host for _, host, container in published_ports(services["minio"]) if container == "9000"
    ]
    assert endpoint.hostname == "localhost" and [str(endpoint.port)] == s3_api


def test_no_credentials_are_committed():
    remote = dvc_remote()
    assert not {"access_key_id", "secret_access_key", "session_token"} & set(remote)
    ignored = subprocess.run(
        ["git", "check-ignore", ".dvc/config.local", ".env"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert ignored.stdout.split() == [".dvc/config.local", ".env"]


def test_pre_commit_refuses_a_force_added_credential_file(tmp_path):
    workspace = copy_workspace(tmp_path / "repo")
    (workspace / ".dvc" / "config.local").write_text("[remote minio]\nsecret_access_key = x\n")
    subprocess.run(["git", "add", "-f", ".dvc/config.local"], cwd=workspace, check=True)
    result = subprocess.run(
        [sys.executable, "-m", "pre_commit", "run", "no-credential-files"],
        cwd=workspace,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PRE_COMMIT_HOME=str(tmp_path / "pre-commit-cache")),
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert ".dvc/config.local" in result.stdout and "credentials stay local" in result.stdout
