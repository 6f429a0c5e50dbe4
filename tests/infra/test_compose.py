"""docker-compose.yml, validated by a real Compose implementation, and the DVC remote config.

No container engine can run MinIO on the build machines, so the stack is checked with
`docker-compose config` (Debian's docker-compose), which parses, validates and interpolates
the file exactly as `docker compose up` would before starting anything.
"""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from dvc.repo import Repo

from alert_relay.relay import (
    DEFAULT_PORT,
    REPOSITORY_ENV,
    TOKEN_FILE_ENV,
    WEBHOOK_PATH,
    Config,
    ConfigError,
)
from serving.challenger import ChallengerConfig, challenger_config
from serving.contract import MODEL_NAME
from serving.prediction_log import PredictionLog
from serving.settings import (
    CANARY,
    CANARY_PERCENT_ENV,
    CHALLENGER_ENV,
    CHALLENGER_MODE_ENV,
    FEEDBACK_DIR_ENV,
    FEEDBACK_S3_ENDPOINT_ENV,
    FEEDBACK_STORE_ENV,
    PREDICTION_LOG_ENV,
    PREDICTION_LOG_OFF,
    SHADOW,
    TRAFFIC_TIMEOUT_SECONDS,
)
from tests.support.git import copy_workspace
from tests.support.needs import require_tools
from tests.support.paths import REPO_ROOT


def compose_config(*extra_args: str, extra_env: dict[str, str] | None = None) -> dict:
    """What `docker-compose config` makes of the stack (each variant run once: a second)."""
    (binary,) = require_tools("docker-compose")
    env_items = tuple(sorted((extra_env or {}).items()))
    return copy.deepcopy(_compose_config(binary, extra_args, env_items))


@functools.cache
def _compose_config(binary: str, extra_args: tuple[str, ...], env_items: tuple) -> dict:
    ours = (
        "MINIO_",
        "MLFLOW_",
        "CLASSIFIER_",
        "PROMETHEUS_",
        "GRAFANA_",
        "GIT_REVISION",
        "FEEDBACK_",
        "ALERTMANAGER_",
        "RELAY_",
        "GITHUB_DISPATCH_",
        "PREDICTION",
        "CHALLENGER",
        "CANARY_",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    env.update(env_items)
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


SERVE_PROFILE = (
    "classifier",
    "proxy",
    "feedback-spool",
    "prometheus",
    "alertmanager",
    "alert-relay",
    "grafana",
)
# Built locally by `bentoml containerize`, never pulled: the service, its volume's owner fix,
# and the relay (the image's Python runs the checkout's alert_relay).
LOCAL_IMAGE = ("classifier", "feedback-spool", "alert-relay")
MONITORING = REPO_ROOT / "deploy" / "monitoring"


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
    assert set(services) == {"minio", "create-buckets", "mlflow"} | set(SERVE_PROFILE)

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
        ["git", "check-ignore", ".dvc/config.local", ".env", ".secrets/github-dispatch-token"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert ignored.stdout.split() == [".dvc/config.local", ".env", ".secrets/github-dispatch-token"]


def test_pre_commit_refuses_a_force_added_credential_file(tmp_path):
    workspace = copy_workspace(tmp_path / "repo")
    (workspace / ".dvc" / "config.local").write_text("[remote minio]\nsecret_access_key = x\n")
    (workspace / ".secrets").mkdir()
    (workspace / ".secrets" / "github-dispatch-token").write_text("github_pat_x\n")
    for path in (".dvc/config.local", ".secrets/github-dispatch-token"):
        subprocess.run(["git", "add", "-f", path], cwd=workspace, check=True)
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
    assert ".secrets/github-dispatch-token" in result.stdout


def mounts(service: dict) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (named volumes left out)."""
    binds = {}
    for volume in service.get("volumes", []):
        host, container = volume.split(":")[:2]
        if host.startswith(("/", ".")):
            binds[container] = Path(host).resolve()
    return binds


def test_the_serve_profile_adds_service_spool_owner_prometheus_alertmanager_relay_grafana():
    services = compose_config("--profile", "serve")["services"]
    for name, service in services.items():
        assert service.get("profiles", []) == (["serve"] if name in SERVE_PROFILE else []), name


def test_every_pulled_image_is_pinned_by_tag_and_digest():
    for name, service in compose_config("--profile", "serve")["services"].items():
        image = service["image"]
        if name in LOCAL_IMAGE:
            assert service["pull_policy"] == "never"
            assert service["image"] == compose_config()["services"]["classifier"]["image"]
        elif "build" not in service:
            reference, _, digest = image.partition("@sha256:")
            assert ":" in reference.split("/")[-1] and len(digest) == 64, name


def test_the_prediction_service_runs_the_containerized_bento_and_drains_on_stop():
    classifier = compose_config(extra_env={"GIT_REVISION": "abc1234"})["services"]["classifier"]
    assert classifier["image"] == f"{MODEL_NAME}:latest"  # the promoted bento, containerized
    assert classifier["environment"]["GIT_REVISION"] == "abc1234"
    assert classifier["init"] is True
    assert "/readyz" in " ".join(classifier["healthcheck"]["test"])
    grace = classifier["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) > TRAFFIC_TIMEOUT_SECONDS
    assert published_ports(classifier) == []  # reached through the proxy (test_proxy.py)


def test_prometheus_scrapes_the_service_and_loads_the_rules_from_the_repository():
    services = compose_config()["services"]
    prometheus = services["prometheus"]
    binds = mounts(prometheus)
    assert binds["/etc/prometheus/prometheus.yml"] == MONITORING / "prometheus.yml"
    assert binds["/etc/prometheus/rules"] == MONITORING / "rules"
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert config["rule_files"] == ["rules/*.rules.yml"]  # relative to the config file
    (job,) = config["scrape_configs"]
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host == "classifier"
    assert services["proxy"]["environment"]["CLASSIFIER_UPSTREAM"] == target  # the same port


def test_grafana_is_provisioned_from_the_repository_files():
    services = compose_config()["services"]
    binds = mounts(services["grafana"])
    provisioning = MONITORING / "grafana" / "provisioning"
    assert binds["/etc/grafana/provisioning"] == provisioning
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "dashboards.yml").read_text())[
        "providers"
    ]
    assert binds[provider["options"]["path"]] == MONITORING / "grafana" / "dashboards"
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    url = urlparse(datasource["url"])
    prometheus_ports = [c for _, _, c in published_ports(services["prometheus"])]
    assert url.hostname == "prometheus" and str(url.port) in prometheus_ports


def named_volumes(service: dict) -> dict[str, str]:
    """Container path -> volume name of a service's named volumes."""
    return {
        volume.split(":")[1]: volume.split(":")[0]
        for volume in service.get("volumes", [])
        if not volume.startswith(("/", "."))
    }


def test_feedback_is_spooled_on_a_volume_the_service_owns_and_stored_in_the_stack_s_bucket():
    config = compose_config("--env-file", str(REPO_ROOT / ".env.example"))
    services = config["services"]
    classifier, owner = services["classifier"], services["feedback-spool"]
    env = classifier["environment"]
    # The spool outlives the container, on a named volume...
    spool_dir = env[FEEDBACK_DIR_ENV]
    volume = named_volumes(classifier)[spool_dir]
    assert volume in config["volumes"]
    # ... made the image user's before the service starts (a new volume is root's).
    assert classifier["depends_on"]["feedback-spool"]["condition"] == (
        "service_completed_successfully"
    )
    assert named_volumes(owner)[spool_dir] == volume and owner["user"] == "root"
    assert owner["entrypoint"][:2] == ["chown", "bentoml:bentoml"]
    assert spool_dir in owner["entrypoint"][2:]
    # The store: a bucket the bootstrap makes, on MinIO, with the credentials MinIO (and so
    # the DVC remote and MLflow) use.
    store = urlparse(env[FEEDBACK_STORE_ENV])
    assert store.scheme == "s3" and store.path.strip("/")
    assert store.netloc == services["create-buckets"]["environment"]["FEEDBACK_BUCKET"]
    assert '"local/$$FEEDBACK_BUCKET"' in " ".join(services["create-buckets"]["command"])
    endpoint = urlparse(env[FEEDBACK_S3_ENDPOINT_ENV])
    assert endpoint.hostname == "minio"
    assert str(endpoint.port) in [c for _, _, c in published_ports(services["minio"])]
    minio = services["minio"]["environment"]
    assert env["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert env["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"] == "change-me-please"
    assert env["AWS_REQUEST_CHECKSUM_CALCULATION"] == "when_required"


def test_prometheus_sends_alerts_to_the_stack_s_alertmanager_with_the_repository_s_config():
    services = compose_config()["services"]
    alertmanager = services["alertmanager"]
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    (manager,) = config["alerting"]["alertmanagers"]
    (target,) = manager["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host == "alertmanager"
    assert port in [container for _, _, container in published_ports(services[host])]
    assert mounts(alertmanager)["/etc/alertmanager/alertmanager.yml"] == (
        MONITORING / "alertmanager.yml"
    )
    command = alertmanager["command"]
    assert "--config.file=/etc/alertmanager/alertmanager.yml" in command
    assert "--cluster.listen-address=" in command  # one instance: no gossip port
    # The notification log survives a restart: a restart does not dispatch again.
    (storage,) = [arg.split("=", 1)[1] for arg in command if arg.startswith("--storage.path=")]
    assert named_volumes(alertmanager)[storage] in compose_config()["volumes"]
    # Monitoring must not wait on the relay, which stops at start without its token file.
    assert "alert-relay" not in services["alertmanager"].get("depends_on", {})
    assert "alertmanager" not in services["prometheus"].get("depends_on", {})


def test_alertmanager_reaches_the_relay_which_runs_the_checkout_s_alert_relay():
    config = compose_config("--env-file", str(REPO_ROOT / ".env.example"))
    relay = config["services"]["alert-relay"]
    alertmanager = yaml.safe_load((MONITORING / "alertmanager.yml").read_text())
    (webhook,) = [
        hook
        for receiver in alertmanager["receivers"]
        for hook in receiver.get("webhook_configs", [])
    ]
    url = urlparse(webhook["url"])
    assert (url.hostname, url.port, url.path) == ("alert-relay", DEFAULT_PORT, WEBHOOK_PATH)
    # python -m alert_relay on its default port, reachable from the other containers only.
    entrypoint = relay["entrypoint"]
    assert entrypoint[1:4] == ["-m", "alert_relay", "--host"] and "--port" not in entrypoint
    assert "ports" not in relay and relay["init"] is True
    code = mounts(relay)
    env = relay["environment"]
    assert code[f"{env['PYTHONPATH']}/alert_relay"] == REPO_ROOT / "alert_relay"
    assert env[REPOSITORY_ENV] == "owner/name"  # from .env
    # The token: a compose secret from a git-ignored file, never a variable in Git.
    (secret,) = relay["secrets"]
    assert env[TOKEN_FILE_ENV] == f"/run/secrets/{secret['source']}"
    token_file = Path(config["secrets"][secret["source"]]["file"])
    assert token_file == REPO_ROOT / ".secrets" / "github-dispatch-token"
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", str(token_file)], cwd=REPO_ROOT, timeout=30
    )
    assert ignored.returncode == 0
    moved = compose_config(extra_env={"GITHUB_DISPATCH_TOKEN_FILE": "/srv/token"})
    assert moved["secrets"][secret["source"]]["file"] == "/srv/token"


def test_without_the_relay_s_settings_the_stack_renders_and_the_relay_refuses_to_start(tmp_path):
    """Compose interpolates every service whatever the profile: the relay's settings default
    to empty (no ${VAR:?}), and the relay itself stops at start, naming what is missing."""
    default, serve = (compose_config(*p)["services"] for p in ([], ["--profile", "serve"]))
    assert default["alert-relay"] == serve["alert-relay"]
    env = dict(serve["alert-relay"]["environment"])
    assert env[REPOSITORY_ENV] == "" and env["RELAY_GITHUB_API_URL"] == ""
    # The relay's own check, on the environment compose gives it (the token file not made).
    env[TOKEN_FILE_ENV] = str(tmp_path / "github-dispatch-token")
    with pytest.raises(ConfigError, match=f"^{REPOSITORY_ENV} is not set"):
        Config.from_env(env)
    env[REPOSITORY_ENV] = "owner/name"
    with pytest.raises(ConfigError, match="cannot read the token file"):
        Config.from_env(env)


CHALLENGER_OVERRIDE = REPO_ROOT / "docker-compose.challenger.yml"


def test_answers_are_logged_to_files_on_a_volume_the_service_owns_and_to_the_stack_s_bucket():
    config = compose_config("--env-file", str(REPO_ROOT / ".env.example"))
    services = config["services"]
    classifier, owner = services["classifier"], services["feedback-spool"]
    env = classifier["environment"]
    # The settings as the service reads them at start-up (docs/serving.md, *Prediction log*).
    log = PredictionLog.from_environ(env)
    assert log.sinks == ("files", "s3")
    assert log.keep_photos is False  # photos are not kept unless asked (privacy)
    assert challenger_config(env) is None  # the champion alone, without the override
    # Rotating files on a named volume, given to the image's user before the service starts.
    directory = str(log.directory)
    volume = named_volumes(classifier)[directory]
    assert volume in config["volumes"] and volume != named_volumes(classifier)["/feedback"]
    assert named_volumes(owner)[directory] == volume and directory in owner["entrypoint"][2:]
    # A bucket the bootstrap makes, on MinIO, with the credentials the feedback store uses.
    bucket = urlparse(log.store_url)
    assert bucket.scheme == "s3" and bucket.path.strip("/")
    assert bucket.netloc == services["create-buckets"]["environment"]["PREDICTIONS_BUCKET"]
    assert '"local/$$PREDICTIONS_BUCKET"' in " ".join(services["create-buckets"]["command"])
    assert log.endpoint_url == env[FEEDBACK_S3_ENDPOINT_ENV]
    # Off, or files only, from .env (the stack's variable has the service's name).
    off = compose_config(extra_env={PREDICTION_LOG_ENV: PREDICTION_LOG_OFF})["services"]
    assert PredictionLog.from_environ(off["classifier"]["environment"]).sinks == ()


def with_challenger(extra_env: dict[str, str]) -> dict:
    base = str(REPO_ROOT / "docker-compose.yml")
    return compose_config(
        "-f", base, "-f", str(CHALLENGER_OVERRIDE), "--profile", "serve", extra_env=extra_env
    )


def test_the_challenger_override_mounts_a_bento_archive_and_sets_shadow_or_canary():
    archive = "./bentos/dandelion-vs-grass.bento"
    served = compose_config("--profile", "serve")["services"]
    shadow = with_challenger({"CHALLENGER_BENTO": archive})["services"]
    # Only the service changes, and only by the challenger's settings and its archive.
    for stack in (served, shadow):
        for service in stack.values():
            service["volumes"] = sorted(service.get("volumes", []))  # merged in no fixed order
            # Debian's docker-compose (1.29) drops pull_policy from the files it merges; the
            # Compose plugin (`docker compose`) keeps it.
            service.pop("pull_policy", None)
    assert {name for name in served if served[name] != shadow[name]} == {"classifier"}
    env = shadow["classifier"]["environment"]
    added = {k: v for k, v in env.items() if k not in served["classifier"]["environment"]}
    assert set(added) == {CHALLENGER_ENV, CHALLENGER_MODE_ENV, CANARY_PERCENT_ENV}
    # As the service reads them at start-up (docs/serving.md, *Challenger: shadow and canary*).
    assert challenger_config(env) == ChallengerConfig("/challenger/challenger.bento", SHADOW, None)
    PredictionLog.from_environ(env)  # the log's settings are the stack's, and still taken
    (mounted,) = [
        volume
        for volume in shadow["classifier"]["volumes"]
        if volume not in served["classifier"]["volumes"]
    ]
    host, container, mode = mounted.split(":")
    assert Path(host) == (REPO_ROOT / archive).resolve() and container == env[CHALLENGER_ENV]
    assert mode == "ro"
    # The stack's variables have the service's names.
    canary = with_challenger(
        {"CHALLENGER_BENTO": archive, CHALLENGER_MODE_ENV: CANARY, CANARY_PERCENT_ENV: "25"}
    )["services"]["classifier"]["environment"]
    assert challenger_config(canary) == ChallengerConfig(env[CHALLENGER_ENV], CANARY, 25.0)
    # The default share, widened to a canary with CHALLENGER_MODE alone, is one it takes too.
    assert challenger_config({**env, CHALLENGER_MODE_ENV: CANARY}).percent == 10


def test_the_challenger_override_without_an_archive_stops_before_starting_anything():
    (binary,) = require_tools("docker-compose")
    env = {k: v for k, v in os.environ.items() if k != "CHALLENGER_BENTO"}
    result = subprocess.run(
        [binary, "-f", "docker-compose.yml", "-f", CHALLENGER_OVERRIDE.name, "config"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "set CHALLENGER_BENTO to the challenger's .bento file" in result.stderr
