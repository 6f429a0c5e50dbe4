"""Package stage: build the evaluated model and the service into a bento, reproducibly.

The bento holds the model file, its ``ModelCard`` (the metadata the service reads: classes,
decision threshold, input size, upload limits, train params and the test metrics of exactly
this model) and the service code that ``bentofile.yaml`` includes. Its version is a hash of
all of these, so the same inputs always give the same tag.

Two promises shape this stage:

- It changes no state outside Git and DVC: BentoML works in a throwaway home, and only the
  exported archive is kept. Registering the model and deploying the bento is a separate,
  explicit step after ``dvc repro``: ``python -m stages.promote``.
- The same inputs give the same archive bytes, so ``dvc.lock`` is identical from any clean
  run. BentoML stamps build times into ``bento.yaml`` and ``model.yaml`` and its export keeps
  file times; those become fixed values (``BUILD_TIME``) and the archive is written with
  sorted entries and neutral file attributes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path

import yaml

from serving.contract import MODEL_FILE, MODEL_NAME, ModelCard, sha256_of
from serving.engines import ENGINE_PACKAGES, engine_of
from stages.logs import summarised
from stages.params import load_params

BENTOFILE = "bentofile.yaml"
# The Unix epoch stands in for BentoML's build times; any fixed value would do.
BUILD_TIME = "1970-01-01T00:00:00+00:00"
CREATION_TIME_LINE = re.compile(r"^(\s*)creation_time: .*$", re.MULTILINE)


def included_files(bentofile: Path | str = BENTOFILE) -> list[Path]:
    """The project files the bento ships: ``bentofile.yaml`` and what its ``include`` matches."""
    bentofile = Path(bentofile)
    patterns = yaml.safe_load(bentofile.read_text())["include"]
    matched = {path for pattern in patterns for path in bentofile.parent.glob(pattern)}
    return sorted({bentofile, *(path for path in matched if path.is_file())})


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
    model_dir: Path, export_dir: Path, params: dict, test_metrics: dict, code: list[Path]
) -> ModelCard:
    """The card for the model exported to ``export_dir``; its version hashes it and ``code``."""
    content = {
        "model_sha256": sha256_of(model_dir / MODEL_FILE),
        "engine": engine_of(export_dir),
        "dvc_md5": dvc_md5(export_dir),
        "classes": list(params["classes"]),
        "threshold": float(params["evaluate"]["threshold"]),
        "image_size": int(params["preprocess"]["image_size"]),
        "serve": dict(params["serve"]),
        "train_params": dict(params["train"], features=dict(params["features"])),
        "test_metrics": dict(test_metrics),
    }
    digest = hashlib.sha256(json.dumps(content, sort_keys=True).encode())
    for path in code:
        digest.update(f"\0{path.as_posix()}\0".encode() + path.read_bytes())
    return ModelCard(version=digest.hexdigest()[:16], **content)


def build_bento(export_dir: Path, card: ModelCard, archive: Path, bento_home: Path) -> str:
    """Build the bento in the BentoML home ``bento_home`` and export it to ``archive``."""
    # BentoML resolves its home once per process, on first use: make sure this is the first.
    os.environ["BENTOML_HOME"] = str(bento_home)
    import bentoml
    from bentoml._internal.configuration.containers import BentoMLContainer

    if Path(BentoMLContainer.bentoml_home.get()) != bento_home:
        raise RuntimeError("BentoML was used in this process before: run the stage on its own")

    tag = f"{MODEL_NAME}:{card.version}"
    with bentoml.models.create(tag, metadata=card.to_metadata()) as model:
        for path in sorted(export_dir.iterdir()):
            shutil.copyfile(path, model.path_of(path.name))
    # bentofile.yaml, plus the packages of the engine this model is served with (only the
    # Keras engine brings TensorFlow into the image).
    config = yaml.safe_load(Path(BENTOFILE).read_text())
    config["python"]["packages"] += ENGINE_PACKAGES[card.engine]
    bento = bentoml.bentos.build(**config, version=card.version, build_ctx=".")
    folder = bento_home / "export"
    bentoml.bentos.export_bento(bento.tag, str(folder), output_format="folder")
    write_reproducible_archive(folder, archive)
    return str(bento.tag)


def write_reproducible_archive(folder: Path, archive: Path) -> None:
    """``folder`` as the xz-compressed tar BentoML imports, the same bytes for the same files."""
    for metadata in [folder / "bento.yaml", *folder.glob("models/*/*/model.yaml")]:
        text = metadata.read_text()
        metadata.write_text(CREATION_TIME_LINE.sub(rf"\1creation_time: '{BUILD_TIME}'", text))

    def neutral(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        info.mode = 0o755 if info.isdir() or info.mode & 0o100 else 0o644
        return info

    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(archive.name + ".part")
    with tarfile.open(partial, "w:xz", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(folder.rglob("*")):
            tar.add(
                path, arcname=path.relative_to(folder).as_posix(), recursive=False, filter=neutral
            )
    os.replace(partial, archive)


@summarised("package")
def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir", type=Path, help="train's output (the MLflow run's model)")
    parser.add_argument("export_dir", type=Path, help="export's output: what the bento serves")
    parser.add_argument("metrics_json", type=Path, help="evaluate's metrics")
    parser.add_argument("bento_archive", type=Path)
    args = parser.parse_args(argv)

    test_metrics = json.loads(args.metrics_json.read_text())["test"]
    card = model_card(
        args.model_dir, args.export_dir, load_params(), test_metrics, included_files()
    )
    with tempfile.TemporaryDirectory(prefix="bentoml-home-") as home:
        tag = build_bento(args.export_dir, card, args.bento_archive, Path(home))
    print("package: register and deploy the bento with `python -m stages.promote`")
    return (
        f"bento {tag} (threshold {card.threshold}, test accuracy "
        f"{card.test_metrics['accuracy']:.3f}) -> {args.bento_archive}"
    )


if __name__ == "__main__":
    main()
