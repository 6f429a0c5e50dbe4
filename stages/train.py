"""Train stage: the classifier (pipeline/training.py) on the cached features, tracked.

Per-epoch metrics go to dvclive (learning curves for ``dvc plots``) and the run (params,
metrics, model) to MLflow. The model directory holds the model alone: the MLflow run finds
it by the model file's SHA-256 (tag ``model_sha256``), so no run id enters a DVC output.
"""

from __future__ import annotations

import os

import numpy as np

from pipeline.hashing import file_sha256
from pipeline.logs import import_tensorflow_quietly
from pipeline.params import FeaturesParams, TrainParams
from pipeline.stage import arguments, summarised
from serving.contract import MODEL_FILE


@summarised("train")
def main(argv: list[str] | None = None) -> str:
    args = arguments(argv, __doc__, "arrays_dir", "features_dir", "model_dir", "live_dir")
    params, backbone_params = TrainParams.load(), FeaturesParams.load()
    import_tensorflow_quietly()
    # TensorFlow, MLflow's Keras flavour and dvclive: after TensorFlow's logging is set.
    import keras
    import mlflow
    import tensorflow as tf
    from dvclive import Live

    from pipeline.keras_io import save_reproducibly
    from pipeline.tracking import MODEL_SHA256_TAG, use_project_store
    from pipeline.training import train_classifier

    images, features = (
        {split: dict(np.load(directory / f"{split}.npz")) for split in ("train", "val")}
        for directory in (args.arrays_dir, args.features_dir)
    )
    use_project_store()
    # Params, per-epoch metrics and optimizer settings come from autologging; the model
    # trained by fit() is only the head, so the full classifier is logged explicitly.
    mlflow.keras.autolog(log_models=False, log_datasets=False, silent=True)
    # `dvc exp run` (queued or not) exports the experiment name: the MLflow run gets the same
    # name, so runs and `dvc exp show` rows match.
    run_name = os.environ.get("DVC_EXP_NAME")
    with (
        mlflow.start_run(run_name=run_name),
        Live(str(args.live_dir), dvcyaml=False, save_dvc_exp=False) as live,
    ):
        mlflow.log_params(
            {
                f"{section.name}.{key}": value
                for section in (backbone_params, params)
                for key, value in section.to_dict().items()
            }
        )
        classifier, summary = train_classifier(images, features, params, backbone_params, live)
        for name, value in summary.items():
            live.log_metric(name, value, plot=False)
        mlflow.log_metrics({name.replace("/", "_"): value for name, value in summary.items()})

        args.model_dir.mkdir(parents=True, exist_ok=True)
        model_path = args.model_dir / MODEL_FILE
        save_reproducibly(classifier, model_path)
        mlflow.set_tag(MODEL_SHA256_TAG, file_sha256(model_path))  # how evaluate/promote find it
        # The signature records dtypes and shapes only: outputs of the model's declared shape,
        # rather than a prediction, which would build the classifier's predict graph again.
        examples = images["val"]["images"][:2]
        outputs = np.zeros((len(examples), *classifier.output_shape[1:]), dtype=np.float32)
        signature = mlflow.models.infer_signature(examples, outputs)
        # Stated rather than inferred: MLflow's inference re-imports the model in a subprocess.
        requirements = [f"tensorflow-cpu=={tf.__version__}", f"keras=={keras.__version__}"]
        mlflow.keras.log_model(
            classifier, name="model", pip_requirements=requirements, signature=signature
        )
    return (
        f"{summary['epochs_run']} epochs run, best epoch {summary['best/epoch']}, "
        f"val accuracy {summary['best/val_accuracy']:.3f} -> {args.model_dir}"
    )


if __name__ == "__main__":
    main()
