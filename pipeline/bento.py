"""The bento: what it ships, the model card it carries, and its archive, the same bytes for the
same inputs.

The bento holds the export, its ``ModelCard`` (the metadata the service reads: classes,
decision threshold, input size, upload limits, train params and the test metrics of exactly
this model) and the service code that ``bentofile.yaml`` includes. Its version is a hash of all
of these. BentoML stamps build times into ``bento.yaml`` and ``model.yaml`` and its export keeps
file times; those become fixed values (``BUILD_TIME``) and the archive is written with sorted
entries and neutral file attributes, so ``dvc.lock`` is identical from any clean run. The
image's start script gets two lines, so that its server heals and writes under /tmp alone
(``container_start``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from pipeline import bentoml_store
from pipeline.hashing import file_sha256
from pipeline.params import (
    EvaluateParams,
    FeaturesParams,
    ParamsError,
    PreprocessParams,
    ServeParams,
    TrainParams,
    classes,
)
from serving.contract import MODEL_FILE, MODEL_NAME, ModelCard
from serving.engines import ENGINE_PACKAGES, SERVICES, engine_of
from serving.settings import MAX_BATCH_SIZE

BENTOFILE = "bentofile.yaml"
CONSTRAINTS = "constraints.txt"  # the one list of pinned versions; the bento's come from it
# The Unix epoch stands in for BentoML's build times; any fixed value would do.
BUILD_TIME = "1970-01-01T00:00:00+00:00"
CREATION_TIME_LINE = re.compile(r"^(\s*)creation_time: .*$", re.MULTILINE)
PYTHON_VERSION_LINE = re.compile(r"^(\s*)python_version: .*$", re.MULTILINE)
# BentoML's start script in the bento: the ENTRYPOINT of the image `bentoml containerize` builds.
ENTRYPOINT = "env/docker/entrypoint.sh"
ENTRYPOINT_OPTIONS = "set -Eeuo pipefail\n"  # its first command; ours go right after it
# Where BentoML keeps its scratch in the image: under /tmp, the one writable path it needs.
CONTAINER_BENTOML_HOME = "/tmp/bentoml"
# The archive's xz preset: the export's float weights barely compress at any preset (10.6 MB of
# tar: 9.50 MB at 0, 9.47 MB at the default 6), so the lightest one.
ARCHIVE_PRESET = 0
CONTAINER_START = f"""\
# Added by the package stage: pipeline/bento.py, container_start.
unset BENTOML_CONTAINERIZED
export BENTOML_HOME={CONTAINER_BENTOML_HOME}
"""


def included_files(bentofile: Path | str = BENTOFILE) -> list[Path]:
    """The project files the bento ships: ``bentofile.yaml`` and what its ``include`` matches."""
    bentofile = Path(bentofile)
    patterns = yaml.safe_load(bentofile.read_text())["include"]
    matched = {path for pattern in patterns for path in bentofile.parent.glob(pattern)}
    return sorted({bentofile, *(path for path in matched if path.is_file())})


def pins(python_version: str, constraints: Path | str = CONSTRAINTS) -> dict[str, str]:
    """Every pin of ``constraints`` that applies to that Python: its normalized name and its
    specifier (``==version``). Comments, whole-line or trailing, are not pins."""
    found: dict[str, str] = {}
    for line in Path(constraints).read_text().splitlines():
        line = line.partition(" #")[0].strip()
        if line and not line.startswith("#"):
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(
                {"python_version": python_version}
            ):
                found[canonicalize_name(requirement.name)] = str(requirement.specifier)
    return found


def pinned(
    names: list[str], python_version: str, constraints: Path | str = CONSTRAINTS
) -> list[str]:
    """``name==version`` for each of ``names``, as ``constraints`` pins it for that Python."""
    found = pins(python_version, constraints)
    unpinned = [
        name for name in names if not found.get(canonicalize_name(name), "").startswith("==")
    ]
    if unpinned:
        raise ValueError(f"{constraints} pins no version of {unpinned} for Python {python_version}")
    return [f"{name}{found[canonicalize_name(name)]}" for name in names]


def dvc_md5(path: Path) -> str:
    """DVC's hash of a file or directory (``<md5>.dir``), the value ``dvc.lock`` records."""
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory(prefix="dvc-hash-") as scratch:
        *_, obj = build(HashFileDB(fs, scratch), str(path), fs, "md5")
    return obj.hash_info.value


def model_card(
    model_dir: Path, export_dir: Path, test_metrics: dict, code: list[Path]
) -> ModelCard:
    """The card for the model exported to ``export_dir``, from params.yaml; its version hashes
    it, ``code`` and the lines the bento's start script gets (``container_start``)."""
    serve = ServeParams.load()
    if serve.max_batch_files > MAX_BATCH_SIZE:
        raise ParamsError(
            f"params.yaml: serve.max_batch_files must be at most {MAX_BATCH_SIZE} "
            "(serving/settings.py MAX_BATCH_SIZE: the most images one engine call scores), "
            f"not {serve.max_batch_files}"
        )
    content = {
        "model_sha256": file_sha256(model_dir / MODEL_FILE),
        "engine": engine_of(export_dir),
        "dvc_md5": dvc_md5(export_dir),
        "classes": classes(),
        "threshold": float(EvaluateParams.load().threshold),
        "image_size": PreprocessParams.load().image_size,
        "serve": serve.to_dict(),
        "train_params": dict(
            TrainParams.load().to_dict(), features=FeaturesParams.load().to_dict()
        ),
        "test_metrics": dict(test_metrics),
    }
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode())
    for path in code:
        digest.update(f"\0{path.as_posix()}\0".encode() + path.read_bytes())
    digest.update(f"\0{ENTRYPOINT}\0{CONTAINER_START}".encode())  # the bento ships it too
    return ModelCard(version=digest.hexdigest()[:16], **content)


def build_bento(export_dir: Path, card: ModelCard, archive: Path, bento_home: Path) -> str:
    """Build the bento in the BentoML home ``bento_home`` and export it to ``archive``."""
    bentoml_store.use_home(bento_home)  # before anything else uses BentoML in this process
    import bentoml

    with bentoml.models.create(
        f"{MODEL_NAME}:{card.version}", metadata=card.to_metadata()
    ) as model:
        for path in sorted(export_dir.iterdir()):
            shutil.copyfile(path, model.path_of(path.name))
    config = yaml.safe_load(Path(BENTOFILE).read_text())
    config["service"] = SERVICES[card.engine]  # the front that runs this engine
    config["name"] = MODEL_NAME
    config["labels"] = {**config.get("labels", {}), "project": MODEL_NAME}
    # Pinned from constraints.txt for the image's Python, with the packages of the engine this
    # model is served with (only the Keras engine brings TensorFlow into the image).
    names = config["python"]["packages"] + ENGINE_PACKAGES[card.engine]
    config["python"]["packages"] = pinned(names, str(config["docker"]["python_version"]))
    bento = bentoml.bentos.build(**config, version=card.version, build_ctx=".")
    folder = bento_home / "export"
    bentoml.bentos.export_bento(bento.tag, str(folder), output_format="folder")
    container_start(folder)
    write_reproducible_archive(folder, archive)
    return str(bento.tag)


def container_start(folder: Path) -> None:
    """Make the server in the bento's image heal itself and write under /tmp alone.

    - BentoML respawns dead workers only where ``BENTOML_CONTAINERIZED`` is unset
      (``bentoml/serving.py``, ``create_watcher``: ``respawn=not running_inside_container()``),
      and the Dockerfile of ``bentoml containerize`` sets it: a worker that dies (the OOM
      killer, a crash) would leave the server up with no worker and ``/readyz`` unanswered
      until someone restarts the container (Compose never restarts an unhealthy one). Nothing
      else in BentoML reads the variable.
    - BentoML's home (the image sets ``/home/bentoml/``) holds nothing the served bento needs:
      it runs from ``$BENTO_PATH``. The server only makes its empty store there at start, and
      Prometheus' multiprocess files. Under /tmp, one scratch mount (a tmpfs, an emptyDir) lets
      the root filesystem be read-only.

    The image's environment cannot do either: a Dockerfile cannot unset a variable, and the
    bento's ``envs`` cannot override one BentoML's Dockerfile sets itself. BentoML's own way
    to change the Dockerfile (``docker.dockerfile_template``) turns the bento back into the
    legacy format. So the bento's start script does it, before it starts the server.
    """
    entrypoint = folder / ENTRYPOINT
    text = entrypoint.read_text()
    if ENTRYPOINT_OPTIONS not in text:
        raise RuntimeError(
            f"{ENTRYPOINT} no longer has the line {ENTRYPOINT_OPTIONS.strip()!r} that "
            "pipeline/bento.py container_start adds its lines after"
        )
    if CONTAINER_START not in text:
        entrypoint.write_text(
            text.replace(ENTRYPOINT_OPTIONS, ENTRYPOINT_OPTIONS + CONTAINER_START, 1)
        )


def write_reproducible_archive(folder: Path, archive: Path) -> None:
    """``folder`` as the xz-compressed tar BentoML imports, the same bytes for the same files.

    What BentoML records of the machine that built the bento is made a function of the bento's
    inputs: the build times become ``BUILD_TIME``, and the Python that saved each model (its
    ``context``) becomes the Python of the bento's image, the one that will load it.
    """
    bento = folder / "bento.yaml"
    image_python = yaml.safe_load(bento.read_text())["image"]["python_version"]
    for metadata in [bento, *folder.glob("models/*/*/model.yaml")]:
        text = CREATION_TIME_LINE.sub(rf"\1creation_time: '{BUILD_TIME}'", metadata.read_text())
        if metadata != bento:  # bento.yaml's python_version is the image's already
            text = PYTHON_VERSION_LINE.sub(rf"\1python_version: '{image_python}'", text)
        metadata.write_text(text)

    def neutral(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        info.mode = 0o755 if info.isdir() or info.mode & 0o100 else 0o644
        return info

    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(archive.name + ".part")
    with tarfile.open(partial, "w:xz", preset=ARCHIVE_PRESET, format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(
                path, arcname=path.relative_to(folder).as_posix(), recursive=False, filter=neutral
            )
    os.replace(partial, archive)


def bento_version_of(archive: Path) -> str:
    """``name:version`` of a bento archive, from its ``bento.yaml``."""
    with tarfile.open(archive) as tar:
        bento = yaml.safe_load(tar.extractfile("bento.yaml"))
    return f"{bento['name']}:{bento['version']}"
