"""Package stage: the same inputs build the same bento bytes, anywhere, touching no BentoML store.

Runs `python -m stages.package` (as dvc.yaml does) on a tiny Keras model in copies of this repo.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tarfile

import keras
import pytest
import yaml

from pipeline.bento import CONTAINER_BENTOML_HOME, ENTRYPOINT, included_files
from pipeline.export import export_model
from pipeline.hashing import file_sha256
from serving.contract import MODEL_FILE, MODEL_NAME, ModelCard
from serving.engines import SERVICES
from tests.support.dvc import set_param
from tests.support.git import copy_workspace
from tests.support.paths import PIPELINE_PATHS, REPO_ROOT
from tests.support.processes import python_module

TEST_METRICS = {"accuracy": 0.9, "precision": 0.9, "recall": 0.9, "f1": 0.9, "roc_auc": 0.95}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    model = keras.Sequential(
        [keras.Input((4, 4, 3)), keras.layers.Flatten(), keras.layers.Dense(1)]
    )
    model.save(directory / MODEL_FILE)
    return directory


def package(workspace, model_dir, user_bentoml_home):
    """Run the stage in ``workspace`` on a Keras-engine export; return its archive's path."""
    metrics = workspace / PIPELINE_PATHS["evaluate_dir"] / "metrics.json"
    metrics.write_text(json.dumps({"test": TEST_METRICS}))
    export_dir = workspace / PIPELINE_PATHS["export_dir"]
    export_model(model_dir / MODEL_FILE, export_dir, "keras")
    archive = workspace / PIPELINE_PATHS["bento_archive"]
    env = dict(os.environ, BENTOML_HOME=str(user_bentoml_home), BENTOML_DO_NOT_TRACK="true")
    args = [str(model_dir), str(export_dir), str(metrics), str(archive)]
    result = python_module("stages.package", workspace, *args, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return archive


def bento_contents(archive) -> tuple[dict, ModelCard, list[str]]:
    """bento.yaml, the model's card and the shipped source files of an archive."""
    with tarfile.open(archive) as tar:
        bento = yaml.safe_load(tar.extractfile("bento.yaml"))
        (model_yaml,) = [name for name in tar.getnames() if name.endswith("/model.yaml")]
        card = ModelCard.from_metadata(yaml.safe_load(tar.extractfile(model_yaml))["metadata"])
        files = [member.name for member in tar.getmembers() if member.isfile()]
    return bento, card, sorted(n.removeprefix("src/") for n in files if n.startswith("src/"))


@pytest.fixture(scope="module")
def built(model_dir, tmp_path_factory):
    """A bento archive the stage built in a copy of this repo, and the user's BentoML home."""
    root = tmp_path_factory.mktemp("built")
    user_home = root / "user-bentoml"
    return package(copy_workspace(root / "a" / "repo"), model_dir, user_home), user_home


def test_same_inputs_in_two_directories_give_identical_archives(built, model_dir, tmp_path):
    first, user_home = built
    second = package(copy_workspace(tmp_path / "elsewhere" / "b"), model_dir, user_home)
    assert first.read_bytes() == second.read_bytes()
    # dvc repro changes no state outside Git and DVC: the user's BentoML store is untouched.
    assert not user_home.exists() or not any(user_home.rglob("*.yaml"))

    bento, card, sources = bento_contents(first)
    assert bento["name"] == MODEL_NAME and bento["version"] == card.version
    assert bento["service"] == SERVICES["keras"]  # the front that runs this model's engine
    assert card.model_sha256 == file_sha256(model_dir / MODEL_FILE)
    assert card.engine == "keras" and card.dvc_md5.endswith(".dir")
    # The Keras engine brings TensorFlow into the bento; the bentofile alone does not.
    with tarfile.open(first) as tar:
        requirements = tar.extractfile("env/python/requirements.txt").read().decode()
    assert "tensorflow-cpu==" in requirements
    assert "tensorflow" not in (REPO_ROOT / "bentofile.yaml").read_text()
    assert card.test_metrics == TEST_METRICS and card.threshold == 0.5
    assert card.train_params["seed"] == 42 and isinstance(card.train_params["seed"], int)
    # The bento ships the service and its contract, and no pipeline stage.
    assert sources == sorted(path.as_posix() for path in included_files())
    assert not [name for name in sources if name.startswith("stages/")]


def test_the_archive_records_nothing_of_the_python_that_built_it(built):
    """BentoML notes the building interpreter's version in each model's context: the bento
    of the same inputs built with another Python (or patch version) must be the same bytes."""
    with tarfile.open(built[0]) as tar:
        bento = yaml.safe_load(tar.extractfile("bento.yaml"))
        metadata = [tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".yaml")]
    (model,) = [yaml.safe_load(text) for text in metadata if "\ncontext:" in text]
    assert model["context"]["python_version"] == bento["image"]["python_version"]
    assert not [text for text in metadata if platform.python_version() in text]


def test_the_images_start_script_turns_respawn_on_and_moves_bentomls_home(built, tmp_path):
    """What the image of `bentoml containerize` runs first: BentoML's start script, as the
    package stage ships it. Given the image's environment, the command it starts (here `env`,
    in place of `bentoml serve`) sees neither the variable that turns respawn off nor BentoML's
    home on the read-only root filesystem (tests/end_to_end/test_container.py runs the image)."""
    with tarfile.open(built[0]) as tar:
        (tmp_path / "entrypoint.sh").write_bytes(tar.extractfile(ENTRYPOINT).read())
    image_env = {
        "PATH": os.environ["PATH"],
        "BENTO_PATH": str(tmp_path),
        "BENTOML_HOME": "/home/bentoml/",
        "BENTOML_CONTAINERIZED": "true",
    }
    started = subprocess.run(
        ["bash", str(tmp_path / "entrypoint.sh"), "env"],
        cwd=tmp_path,
        env=image_env,
        capture_output=True,
        text=True,
        check=True,
    )
    environment = dict(line.split("=", 1) for line in started.stdout.splitlines())
    assert "BENTOML_CONTAINERIZED" not in environment
    assert environment["BENTOML_HOME"] == CONTAINER_BENTOML_HOME
    assert environment["BENTO_PATH"] == str(tmp_path)  # the rest of the image's environment


def test_a_threshold_change_is_a_new_bento_carrying_the_new_threshold(built, model_dir, tmp_path):
    before = bento_contents(built[0])[1]
    workspace = copy_workspace(tmp_path / "repo")
    set_param(workspace, "evaluate.threshold", 0.62)
    after = bento_contents(package(workspace, model_dir, tmp_path / "home"))[1]
    assert after.threshold == 0.62 and after.rule.predict(0.61) == 0
    assert after.version != before.version and after.model_sha256 == before.model_sha256
