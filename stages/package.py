"""Package stage: promote the evaluated model if it beats the champion, then ship the champion.

1. MLflow Model Registry: the trained model is registered, and the alias ``champion`` moved
   to it, only if its test metric (``package.metric``) beats the current champion's by more
   than ``package.min_improvement``. Otherwise nothing in the registry changes.
2. The champion, whichever run it came from, is stored in BentoML's model store with its
   metrics, params and Git/DVC revision as metadata, built into a bento (bentofile.yaml)
   and exported as an archive.

The prediction service (serving/service.py) reads everything it needs from the stored
model: the Keras file, and as metadata the classes, input size, upload limits, and the
version, training params, test metrics and revision shown by its /model-info endpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import bentoml
import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from serving.service import MODEL_FILE, MODEL_NAME
from stages.params import load_params
from stages.tracking import use_project_store
from stages.train import RUN_FILE

CHAMPION = "champion"


def save_to_bentoml(
    model_file: Path,
    *,
    version: str,
    classes: list[str],
    image_size: int,
    serve_params: dict,
    train_params: dict,
    test_metrics: dict,
    revision: dict[str, str],
    trained_at: str | None = None,
) -> bentoml.Model:
    """Store ``model_file`` as ``dandelion-vs-grass:<version>``, replacing an older copy.

    The stage only runs when something it depends on changed (e.g. the `serve` limits in
    the metadata), so a stored model of the same version is replaced, never reused.
    """
    tag = f"{MODEL_NAME}:{version}"
    for store in (bentoml.bentos, bentoml.models):  # bentos first: they reference the model
        with contextlib.suppress(bentoml.exceptions.NotFound):
            store.delete(tag)
    metadata = {
        "version": version,
        "classes": list(classes),
        "image_size": int(image_size),
        "serve": dict(serve_params),
        "train_params": dict(train_params),
        "test_metrics": dict(test_metrics),
        **revision,  # git_revision (commit that trained it) and dvc_md5 (of its model dir)
        "trained_at": trained_at or datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with bentoml.models.create(tag, labels={"stage": "champion"}, metadata=metadata) as model:
        shutil.copyfile(model_file, model.path_of(MODEL_FILE))
    return bentoml.models.get(tag)


def current_champion(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no registered model or no alias yet
        return None


def promote_if_better(
    client: MlflowClient,
    name: str,
    run_id: str,
    test_metrics: dict,
    metric: str,
    min_improvement: float,
    tags: dict[str, str],
) -> tuple[ModelVersion, bool]:
    """The champion after the gate, and whether ``run_id``'s model just became it."""
    candidate = float(test_metrics[metric])
    champion = current_champion(client, name)
    if champion is not None:
        if champion.run_id == run_id:
            return champion, False
        if candidate <= float(champion.tags[f"test_{metric}"]) + min_improvement:
            return champion, False
    version = mlflow.register_model(
        f"runs:/{run_id}/model",
        name,
        tags={
            **tags,
            **{f"test_{key}": str(value) for key, value in test_metrics.items()},
        },
    )
    client.set_registered_model_alias(name, CHAMPION, version.version)
    return client.get_model_version(name, version.version), True


def package_champion(
    client: MlflowClient, champion: ModelVersion, params: dict, bento_archive: Path
) -> bentoml.Model:
    """Store the champion in BentoML, build its bento and export it to ``bento_archive``."""
    run = client.get_run(champion.run_id)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(
            mlflow.artifacts.download_artifacts(
                f"models:/{champion.name}/{champion.version}",
                dst_path=tmp,
            )
        )
        (model_file,) = local.rglob("*.keras")
        stored = save_to_bentoml(
            model_file,
            version=f"v{champion.version}",
            classes=params["classes"],
            image_size=params["preprocess"]["image_size"],
            serve_params=params["serve"],
            train_params={
                k.removeprefix("train."): v
                for k, v in run.data.params.items()
                if k.startswith("train.")
            },
            test_metrics={
                k.removeprefix("test_"): float(v)
                for k, v in champion.tags.items()
                if k.startswith("test_")
            },
            revision={key: champion.tags.get(key, "") for key in ("git_revision", "dvc_md5")},
            trained_at=datetime.fromtimestamp(run.info.start_time / 1000, UTC).isoformat(
                timespec="seconds"
            ),
        )
    bento = bentoml.bentos.build_bentofile("bentofile.yaml", version=f"v{champion.version}")
    bento_archive.parent.mkdir(parents=True, exist_ok=True)
    bento_archive.unlink(missing_ok=True)
    bentoml.bentos.export_bento(bento.tag, str(bento_archive.resolve()))  # relative: fs root
    return stored


def revision_tags(run_id: str, model_dir: Path) -> dict[str, str]:
    """Which Git commit trained the model, and the model's DVC hash (from dvc.lock)."""
    run = mlflow.get_run(run_id)
    lock = yaml.safe_load(Path("dvc.lock").read_text())
    outs = {out["path"]: out["md5"] for out in lock["stages"]["train"]["outs"]}
    return {
        "git_revision": run.data.tags.get("mlflow.source.git.commit", ""),
        "dvc_md5": outs.get(str(model_dir), ""),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("metrics_json", type=Path)
    parser.add_argument("bento_archive", type=Path)
    args = parser.parse_args(argv)

    params = load_params()
    settings = params["package"]
    run_id = json.loads((args.model_dir / RUN_FILE).read_text())["run_id"]
    test_metrics = json.loads(args.metrics_json.read_text())
    use_project_store()
    client = MlflowClient()
    champion, promoted = promote_if_better(
        client,
        MODEL_NAME,
        run_id,
        test_metrics,
        settings["metric"],
        settings["min_improvement"],
        revision_tags(run_id, args.model_dir),
    )
    stored = package_champion(client, champion, params, args.bento_archive)
    verb = "promoted to" if promoted else "kept as"
    print(
        f"package: version {champion.version} {verb} {CHAMPION} "
        f"(test {settings['metric']} {champion.tags['test_' + settings['metric']]}); "
        f"BentoML model {stored.tag}, bento {args.bento_archive}"
    )


if __name__ == "__main__":
    main()
