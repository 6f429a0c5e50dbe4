"""SHA-256, as the catalogue pins each photo's bytes and MLflow tags each trained model."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path | str) -> str:
    return sha256_of(Path(path).read_bytes())
