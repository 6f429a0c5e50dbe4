"""The split file (``data/split.csv``): each photo's path, label, split and SHA-256."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from pipeline.hashing import sha256_of

TEST = "test"  # the original photos' held-out split: it never changes (stages/split.py)
PRODUCTION_TEST = "production_test"  # reviewed photos held out: it grows as photos are accepted
SPLITS = ("train", "val", TEST, PRODUCTION_TEST)  # one preprocessed .npz each
# The splits the features stage computes the backbone's features of. Not production_test:
# evaluate scores it through the exported model, as it does test, and no stage reads its
# features, so the backbone need not rerun over every photo when a reviewed one is held out.
FEATURE_SPLITS = ("train", "val", TEST)
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


def split_digest(rows: list[SplitRow], split: str = TEST) -> str:
    """A split's identity: SHA-256 over its photos' SHA-256s, sorted, one a line. Two models'
    test metrics are comparable only if their test splits' are the same (pipeline/promote.py)."""
    digests = sorted(row.sha256 for row in rows if row.split == split)
    return sha256_of("".join(f"{digest}\n" for digest in digests).encode())
