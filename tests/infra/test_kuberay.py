"""The KubeRay overlay (deploy/kubernetes/overlays/batch-prediction): rendered, validated offline.

kubernetes-validate has no schema for KubeRay's RayJob, and no PyPI or npm package ships
KubeRay's CRD (checked: docs/deploy-and-monitor.md, *Batch prediction on Kubernetes
(KubeRay)*), so the RayJob is checked in two parts: every pod template it holds (head,
workers, submitter) against Kubernetes' own PodTemplateSpec schema with `kubernetes-validate
--strict`, and everything around them against an allow-list of the RayJob v1 fields with
their types and required fields (RAYJOB_SPEC below, written from KubeRay's API reference),
rejecting any other key. The rest checks that the pieces fit the project: the command and
its options, the Secrets, the image.
"""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
import tomllib

import pytest
import yaml

from tests.infra.test_kubernetes import KUBERNETES_VERSIONS, dev_tool, render
from tests.support.paths import REPO_ROOT

OVERLAY = REPO_ROOT / "deploy/kubernetes/overlays/batch-prediction"
POD_TEMPLATE = "PodTemplateSpec"  # validated by kubernetes-validate, not here
STRING_MAP = {str: str}


class Enum(tuple):
    """A string field that takes one of these values."""


class Required(dict):
    """An object whose keys in ``required`` must be present."""

    def __init__(self, fields: dict, required: set[str]):
        super().__init__(fields)
        self.required = required


# The RayJob v1 fields this overlay may use (ray.io/v1, KubeRay >= 1.6.0), with their types.
# Fields of the CRD not listed (deletionStrategy, gcsFaultToleranceOptions, autoscalerOptions,
# headService, ...) are refused: add them here after checking KubeRay's API reference.
GROUP_COMMON = {
    "rayStartParams": STRING_MAP,
    "template": POD_TEMPLATE,
    "labels": STRING_MAP,
    "resources": STRING_MAP,
}
RAY_CLUSTER_SPEC = Required(
    {
        "rayVersion": str,
        "enableInTreeAutoscaling": bool,
        "suspend": bool,
        "managedBy": str,
        "headServiceAnnotations": STRING_MAP,
        "authOptions": {"mode": Enum(("disabled", "token")), "secretName": str},
        "headGroupSpec": Required(
            {**GROUP_COMMON, "serviceType": str, "enableIngress": bool}, {"template"}
        ),
        "workerGroupSpecs": [
            Required(
                {
                    **GROUP_COMMON,
                    "groupName": str,
                    "replicas": int,
                    "minReplicas": int,
                    "maxReplicas": int,
                    "numOfHosts": int,
                    "idleTimeoutSeconds": int,
                    "suspend": bool,
                },
                {"groupName", "minReplicas", "maxReplicas", "template"},
            )
        ],
    },
    {"headGroupSpec"},
)
RAYJOB_SPEC = Required(
    {
        "entrypoint": str,
        "runtimeEnvYAML": str,
        "jobId": str,
        "metadata": STRING_MAP,
        "clusterSelector": STRING_MAP,
        "managedBy": str,
        "suspend": bool,
        "submissionMode": Enum(("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")),
        "submitterPodTemplate": POD_TEMPLATE,
        "submitterConfig": {"backoffLimit": int},
        "entrypointNumCpus": float,
        "entrypointNumGpus": float,
        "entrypointResources": str,
        "backoffLimit": int,
        "activeDeadlineSeconds": int,
        "preRunningDeadlineSeconds": int,
        "shutdownAfterJobFinishes": bool,
        "ttlSecondsAfterFinished": int,
        "rayClusterSpec": RAY_CLUSTER_SPEC,
    },
    # Not required by the CRD (a job may use an existing cluster), but by this overlay: the
    # job creates its cluster and has a command.
    {"entrypoint", "rayClusterSpec"},
)
RAYJOB = Required(
    {
        "apiVersion": Enum(("ray.io/v1",)),
        "kind": Enum(("RayJob",)),
        "metadata": Required(
            {"name": str, "namespace": str, "labels": STRING_MAP, "annotations": STRING_MAP},
            {"name"},
        ),
        "spec": RAYJOB_SPEC,
    },
    {"apiVersion", "kind", "metadata", "spec"},
)


def structural_errors(value, allowed, path: str = "") -> tuple[list[str], dict[str, dict]]:
    """(errors, {path: pod template}) of ``value`` against the allow-list ``allowed``."""
    errors: list[str] = []
    templates: dict[str, dict] = {}
    if allowed == POD_TEMPLATE:
        if not isinstance(value, dict):
            errors.append(f"{path}: a pod template, not {type(value).__name__}")
        else:
            templates[path] = value
    elif isinstance(allowed, Enum):
        if value not in allowed:
            errors.append(f"{path}: {value!r} is none of {list(allowed)}")
    elif allowed is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{path}: a number, not {value!r}")
    elif isinstance(allowed, type):
        # bool is an int in Python: a YAML `true` is no integer, nor `2` a string.
        if type(value) is not allowed:
            errors.append(f"{path}: {allowed.__name__}, not {value!r}")
    elif isinstance(allowed, list):
        if not isinstance(value, list):
            errors.append(f"{path}: a list, not {value!r}")
        else:
            for index, item in enumerate(value):
                more, found = structural_errors(item, allowed[0], f"{path}[{index}]")
                errors += more
                templates |= found
    elif allowed == STRING_MAP:
        if not isinstance(value, dict) or not all(
            type(k) is str and type(v) is str for k, v in value.items()
        ):
            errors.append(f"{path}: a map of strings, not {value!r}")
    else:  # an object: only the listed keys, the required ones present
        if not isinstance(value, dict):
            return [f"{path}: an object, not {value!r}"], {}
        for key in sorted(getattr(allowed, "required", set()) - value.keys()):
            errors.append(f"{path}.{key}: required")
        for key, item in value.items():
            if key not in allowed:
                errors.append(f"{path}.{key}: not a field of RayJob v1 here")
                continue
            more, found = structural_errors(item, allowed[key], f"{path}.{key}")
            errors += more
            templates |= found
    return errors, templates


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return list(yaml.safe_load_all(render(OVERLAY)))


@pytest.fixture(scope="module")
def rayjob(rendered) -> dict:
    (job,) = [d for d in rendered if d["kind"] == "RayJob"]
    return job


@pytest.fixture(scope="module")
def pod_templates(rayjob) -> dict[str, dict]:
    errors, templates = structural_errors(rayjob, RAYJOB)
    assert errors == []
    return templates


def test_the_rayjob_has_only_rayjob_v1_fields_of_the_right_types(rayjob, pod_templates):
    # Head, one worker group, the submitter.
    assert sorted(pod_templates) == [
        ".spec.rayClusterSpec.headGroupSpec.template",
        ".spec.rayClusterSpec.workerGroupSpecs[0].template",
        ".spec.submitterPodTemplate",
    ]


def test_the_allow_list_refuses_a_misspelt_field_a_wrong_type_and_a_missing_one(rayjob):
    job = copy.deepcopy(rayjob)
    job["spec"]["shutdownAfterJobFinish"] = True  # no such field: KubeRay would drop it
    job["spec"]["backoffLimit"] = "2"
    del job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    job["spec"]["rayClusterSpec"]["authOptions"]["mode"] = "Token"
    errors, _ = structural_errors(job, RAYJOB)
    assert errors == [
        ".spec.backoffLimit: int, not '2'",
        ".spec.rayClusterSpec.authOptions.mode: 'Token' is none of ['disabled', 'token']",
        ".spec.rayClusterSpec.workerGroupSpecs[0].groupName: required",
        ".spec.shutdownAfterJobFinish: not a field of RayJob v1 here",
    ]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_pod_templates_and_the_other_objects_pass_strict_schema_validation(
    rendered, pod_templates, version, tmp_path
):
    """The ServiceAccount as rendered, and each pod template of the RayJob as the template
    of a PodTemplate object, which Kubernetes' schemas describe."""
    documents = [d for d in rendered if d["kind"] != "RayJob"]
    documents += [
        {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-")},
            "template": template,
        }
        for path, template in pod_templates.items()
    ]
    path = tmp_path / "batch-prediction.yaml"
    path.write_text(yaml.safe_dump_all(documents))
    result = subprocess.run(
        [dev_tool("kubernetes-validate"), "--strict", "-k", version, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    print(output)
    assert result.returncode == 0, output
    assert output.count("passed for resource podtemplate/") == len(pod_templates)
    assert "passed for resource serviceaccount/predict-batch" in output


def ray_containers(rayjob) -> list[dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]]
    templates += [group["template"] for group in cluster["workerGroupSpecs"]]
    return [template["spec"]["containers"][0] for template in templates]


def test_the_entrypoint_is_the_batch_prediction_command_from_a_bucket_to_parquet(rayjob):
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    command = shlex.split(rayjob["spec"]["entrypoint"])
    assert command[0] in scripts and command[1] == "predict-batch"
    source, option, out = command[2:]
    assert source.startswith("s3://") and option == "--out"
    assert out.startswith("s3://") and out.endswith(".parquet")


def test_one_image_and_one_checkout_everywhere(rayjob):
    submitter = rayjob["spec"]["submitterPodTemplate"]["spec"]["containers"][0]
    containers = [*ray_containers(rayjob), submitter]
    # The driver, the workers and `ray job submit`: the same Ray, the same checkout.
    assert len({c["image"] for c in containers}) == 1
    assert ":" in submitter["image"]  # the overlay pins a tag
    assert len({c["workingDir"] for c in containers}) == 1


def test_the_cluster_runs_the_ray_the_project_pins(rayjob):
    # KubeRay needs the cluster's Ray version, and a client refuses a cluster of another one.
    (pin,) = re.findall(r"^ray==(\S+)$", (REPO_ROOT / "constraints.txt").read_text(), re.M)
    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == pin


def test_credentials_and_the_ray_token_come_from_secrets_never_from_the_manifest(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    # Ray's token authentication on, its token from a Secret KubeRay reads (key auth_token).
    assert cluster["authOptions"] == {"mode": "token", "secretName": "predict-batch-ray-token"}
    text = yaml.safe_dump(rayjob)
    assert "RAY_AUTH_TOKEN" not in text and "RAY_AUTH_MODE" not in text  # KubeRay sets both
    for container in ray_containers(rayjob):
        env = {variable["name"]: variable for variable in container["env"]}
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            reference = env[key]["valueFrom"]["secretKeyRef"]
            assert reference == {"name": "predict-batch-s3", "key": key}, key
        # Where the store is (read as dvc-s3 and boto read it), not who may use it.
        assert env["AWS_ENDPOINT_URL"] == {"name": "AWS_ENDPOINT_URL", "value": ""}
        assert {name for name, v in env.items() if "value" in v} == {"AWS_ENDPOINT_URL"}


def test_every_pod_is_unprivileged_and_gives_ray_its_shared_memory(rendered, rayjob, pod_templates):
    # The overlay's own ServiceAccount, which mounts no token.
    service_accounts = {d["metadata"]["name"] for d in rendered if d["kind"] == "ServiceAccount"}
    for path, template in pod_templates.items():
        pod = template["spec"]
        assert pod["serviceAccountName"] in service_accounts, path
        assert pod["automountServiceAccountToken"] is False, path
        assert pod["securityContext"]["runAsNonRoot"] is True, path
        assert pod["securityContext"]["runAsUser"] != 0, path
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, path
        (container,) = pod["containers"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, path
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], path
        assert set(container["resources"]["limits"]) == {"cpu", "memory"}, path
    for container in ray_containers(rayjob):
        (shm,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert shm["name"] == "shared-memory"
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]
    volumes = {v["name"]: v for v in head["template"]["spec"]["volumes"]}
    assert volumes["shared-memory"]["emptyDir"]["medium"] == "Memory"
