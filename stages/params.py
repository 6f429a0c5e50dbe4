"""Read ``params.yaml``, the single home of every tunable."""

from pathlib import Path

import yaml


def load_params(path: Path | str = "params.yaml") -> dict:
    with open(path) as handle:
        return yaml.safe_load(handle)
