"""Split stage: stratified train / val / test split that keeps byte-identical files together.

Files are grouped by the SHA-256 of their content, and whole groups are assigned to a split,
so the same picture can never be trained on and tested on. Groups whose copies carry
different labels are ambiguous and left out (listed on stderr).

Photos a person reviewed and excluded (the catalogue's ``excluded`` column holds the reason,
e.g. after the label-noise report of the crossval stage) are assigned first and then marked
``excluded``, so that excluding one photo never moves any other between splits.
"""

from __future__ import annotations

import random
import sys
from collections import defaultdict
from pathlib import Path

from pipeline.catalogue import exclusions, read_catalogue
from pipeline.hashing import file_sha256
from pipeline.params import SplitParams
from pipeline.splits import EXCLUDED, SPLITS, SplitRow, write_split
from pipeline.stage import arguments, summarised

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"}


def list_images(raw_dir: Path) -> list[tuple[Path, str]]:
    """``(path, label)`` for every image under ``raw_dir/<label>/``, in a stable order."""
    return [
        (path, label_dir.name)
        for label_dir in sorted(p for p in raw_dir.iterdir() if p.is_dir())
        for path in sorted(label_dir.iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]


def split_images(
    images: list[tuple[Path, str]], params: SplitParams
) -> tuple[list[SplitRow], list[str]]:
    """Assign every image to a split; return the rows and the ambiguous files left out."""
    val_ratio, test_ratio = params.val_ratio, params.test_ratio
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

    rng = random.Random(params.seed)
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


def apply_exclusions(rows: list[SplitRow], exclusions: dict[str, str]) -> list[SplitRow]:
    """``rows`` with every excluded photo's split set to ``excluded``, the others as they were;
    ``exclusions`` maps ``<label>/<filename>`` to the reviewer's reason."""

    def key(row: SplitRow) -> str:
        return f"{Path(row.path).parent.name}/{Path(row.path).name}"

    return [
        SplitRow(row.path, row.label, EXCLUDED, row.sha256) if key(row) in exclusions else row
        for row in rows
    ]


@summarised("split")
def main(argv: list[str] | None = None) -> str:
    args = arguments(argv, __doc__, "raw_dir", "catalogue", "out_csv")
    rows, ambiguous = split_images(list_images(args.raw_dir), SplitParams.load())
    for path in ambiguous:
        print(f"split: left out {path}: the same bytes carry another label", file=sys.stderr)
    excluded = exclusions(read_catalogue(args.catalogue))
    rows = apply_exclusions(rows, excluded)
    for name, reason in sorted(excluded.items()):
        print(f"split: excluded {name}: {reason}")
    write_split(rows, args.out_csv)
    counts = ", ".join(f"{sum(r.split == s for r in rows)} {s}" for s in (*SPLITS, EXCLUDED))
    return f"{len(rows)} images ({counts}) -> {args.out_csv}"


if __name__ == "__main__":
    main()
