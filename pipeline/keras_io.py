"""Saving a Keras model as the same bytes every time: the model file is a DVC output."""

from __future__ import annotations

import json
import tempfile
import zipfile
from pathlib import Path


def save_reproducibly(model, path: Path) -> None:
    """``model.save(path)``, the same bytes for the same model.

    Keras stamps the save time into ``metadata.json``, numbers shared objects in
    ``config.json`` by their memory address, and dates the zip's entries: all three become
    fixed values. Weights and config are otherwise Keras' own, and ``load_model`` reads it.
    """
    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / path.name
        model.save(saved)
        with zipfile.ZipFile(saved) as source, zipfile.ZipFile(path, "w") as target:
            for entry in source.infolist():
                content = source.read(entry)
                if entry.filename == "metadata.json":
                    metadata = dict(json.loads(content), date_saved="1970-01-01@00:00:00")
                    content = json.dumps(metadata).encode()
                elif entry.filename == "config.json":
                    content = json.dumps(_renumber_shared_objects(json.loads(content))).encode()
                fixed = zipfile.ZipInfo(entry.filename, date_time=(1980, 1, 1, 0, 0, 0))
                target.writestr(fixed, content, compress_type=entry.compress_type)


def _renumber_shared_objects(config, ids: dict | None = None):
    """``config`` with every ``shared_object_id`` replaced by its order of first appearance."""
    ids = {} if ids is None else ids
    if isinstance(config, dict):
        return {
            key: ids.setdefault(value, len(ids))
            if key == "shared_object_id"
            else _renumber_shared_objects(value, ids)
            for key, value in config.items()
        }
    if isinstance(config, list):
        return [_renumber_shared_objects(item, ids) for item in config]
    return config
