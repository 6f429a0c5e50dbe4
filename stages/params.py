"""Read ``params.yaml``, the single home of every tunable, and dvc.yaml's declared paths."""

from pathlib import Path

import yaml


def load_params(path: Path | str = "params.yaml") -> dict:
    with open(path) as handle:
        return yaml.safe_load(handle)


def pipeline_paths(dvc_yaml: Path | str = "dvc.yaml") -> dict[str, str]:
    """The pipeline's paths (catalogue, model_dir, ...), declared once in dvc.yaml's ``vars``."""
    with open(dvc_yaml) as handle:
        return yaml.safe_load(handle)["vars"][0]
