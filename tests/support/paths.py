"""Where things are: the repository, ../shared beside it, and the pipeline's declared paths."""

from __future__ import annotations

from pathlib import Path

import yaml

from pipeline.params import pipeline_paths
from pipeline.weights import IMAGENET_WEIGHTS_FILE
from serving.contract import PREDICTIONS_FILE

REPO_ROOT = Path(__file__).resolve().parents[2]
PARAMS_FILE = REPO_ROOT / "params.yaml"
# The dataset mirror and the backbone weights ship beside the checkout on build machines only.
SHARED = REPO_ROOT.parent / "shared"
DATASET_MIRROR = SHARED / "datasets" / "greenr-airflow"
WEIGHTS_DIR = SHARED / "weights"
WEIGHTS_FILE = WEIGHTS_DIR / IMAGENET_WEIGHTS_FILE  # the file Keras' cache needs
REPORT_SCRIPT = REPO_ROOT / ".github" / "scripts" / "report.py"
# The pipeline's paths, declared once in dvc.yaml's `vars` (catalogue, model_dir, ...).
PIPELINE_PATHS: dict[str, str] = pipeline_paths(REPO_ROOT / "dvc.yaml")
# Its stages, in the order dvc.yaml lists them (the order a cold `dvc repro` runs them).
PIPELINE_STAGES: list[str] = list(yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"])
EVALUATE_METRICS = f"{PIPELINE_PATHS['evaluate_dir']}/metrics.json"
EVALUATE_PREDICTIONS = f"{PIPELINE_PATHS['evaluate_dir']}/{PREDICTIONS_FILE}"
