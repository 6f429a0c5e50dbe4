"""The split file (``data/split.csv``): each photo's path, label, split and SHA-256."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val", "test")
EXCLUDED = "excluded"  # the split of a reviewed exclusion: no stage reads it


@dataclass(frozen=True)
class SplitRow:
    path: str
    label: str
    split: str
    sha256: str


def write_split(rows: list[SplitRow], out_path: Path) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split", "sha256"])
        writer.writerows((r.path, r.label, r.split, r.sha256) for r in rows)


def read_split(path: Path) -> list[SplitRow]:
    with open(path, newline="") as handle:
        return [SplitRow(**row) for row in csv.DictReader(handle)]
