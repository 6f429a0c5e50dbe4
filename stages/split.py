"""Split stage: stratified train / val / test split that keeps byte-identical files together.

Files are grouped by the SHA-256 of their content, and whole groups are assigned to a split,
so the same picture can never be trained on and tested on. Groups whose copies carry
different labels are ambiguous and left out (listed on stderr).

Photos a person reviewed and excluded (the catalogue's ``excluded`` column holds the reason,
e.g. after the label-noise report of stages/crossval.py) are assigned first and then marked
``excluded``, so that excluding one photo never moves any other between splits.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import random
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from stages.logs import summarised
from stages.params import load_params

SPLITS = ("train", "val", "test")
EXCLUDED = "excluded"  # the split of a reviewed exclusion: no stage reads it
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"}


@dataclass(frozen=True)
class SplitRow:
    path: str
    label: str
    split: str
    sha256: str


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def list_images(raw_dir: Path) -> list[tuple[Path, str]]:
    """``(path, label)`` for every image under ``raw_dir/<label>/``, in a stable order."""
    return [
        (path, label_dir.name)
        for label_dir in sorted(p for p in raw_dir.iterdir() if p.is_dir())
        for path in sorted(label_dir.iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]


def split_images(
    images: list[tuple[Path, str]], val_ratio: float, test_ratio: float, seed: int
) -> tuple[list[SplitRow], list[str]]:
    """Assign every image to a split; return the rows and the ambiguous files left out."""
    if not (0 <= val_ratio < 1 and 0 <= test_ratio < 1 and val_ratio + test_ratio < 1):
        raise ValueError(
            f"split ratios must be in [0, 1) and leave room for training "
            f"(val_ratio={val_ratio}, test_ratio={test_ratio})"
        )

    groups: dict[str, list[tuple[Path, str]]] = defaultdict(list)
    for path, label in images:
        groups[file_sha256(path)].append((path, label))

    by_label: dict[str, list[str]] = defaultdict(list)
    ambiguous = []
    for digest, members in groups.items():
        labels = {label for _, label in members}
        if len(labels) > 1:
            ambiguous.extend(str(path) for path, _ in members)
        else:
            by_label[labels.pop()].append(digest)

    rng = random.Random(seed)
    rows = []
    for label in sorted(by_label):
        digests = sorted(by_label[label])
        rng.shuffle(digests)
        total = sum(len(groups[d]) for d in digests)
        targets = {"test": round(total * test_ratio), "val": round(total * val_ratio)}
        filled = {"test": 0, "val": 0}
        for digest in digests:
            # Fill test, then val, then everything else is train.
            split = next((s for s in ("test", "val") if filled[s] < targets[s]), "train")
            if split != "train":
                filled[split] += len(groups[digest])
            rows.extend(
                SplitRow(path.as_posix(), label, split, digest) for path, _ in groups[digest]
            )
    rows.sort(key=lambda row: row.path)
    return rows, sorted(ambiguous)


def read_exclusions(catalogue: Path) -> dict[str, str]:
    """``<label>/<filename>`` -> reason, for the catalogue's rows with an ``excluded`` reason."""
    with open(catalogue, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {
        f"{row['label'].strip()}/{row['filename'].strip()}": (row.get("excluded") or "").strip()
        for row in rows
        if (row.get("excluded") or "").strip()
    }


def apply_exclusions(rows: list[SplitRow], exclusions: dict[str, str]) -> list[SplitRow]:
    """``rows`` with every excluded photo's split set to ``excluded``, the others as they were."""

    def key(row: SplitRow) -> str:
        return f"{Path(row.path).parent.name}/{Path(row.path).name}"

    return [
        SplitRow(row.path, row.label, EXCLUDED, row.sha256) if key(row) in exclusions else row
        for row in rows
    ]


def write_split(rows: list[SplitRow], out_path: Path) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split", "sha256"])
        writer.writerows((r.path, r.label, r.split, r.sha256) for r in rows)


def read_split(path: Path) -> list[SplitRow]:
    with open(path, newline="") as handle:
        return [SplitRow(**row) for row in csv.DictReader(handle)]


@summarised("split")
def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("raw_dir", type=Path)
    parser.add_argument("catalogue", type=Path, help="for its reviewed exclusions")
    parser.add_argument("out_csv", type=Path)
    args = parser.parse_args(argv)

    params = load_params()["split"]
    rows, ambiguous = split_images(
        list_images(args.raw_dir), params["val_ratio"], params["test_ratio"], params["seed"]
    )
    for path in ambiguous:
        print(f"split: left out {path}: the same bytes carry another label", file=sys.stderr)
    exclusions = read_exclusions(args.catalogue)
    rows = apply_exclusions(rows, exclusions)
    for name, reason in sorted(exclusions.items()):
        print(f"split: excluded {name}: {reason}")
    write_split(rows, args.out_csv)
    counts = ", ".join(f"{sum(r.split == s for r in rows)} {s}" for s in (*SPLITS, EXCLUDED))
    return f"{len(rows)} images ({counts}) -> {args.out_csv}"


if __name__ == "__main__":
    main()
