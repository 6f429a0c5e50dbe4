"""Split stage: stratified train / val / test split that keeps byte-identical files together.

Files are grouped by the SHA-256 of their content, and whole groups are assigned to a split,
so the same picture can never be trained on and tested on. Groups whose copies carry
different labels are ambiguous and left out (listed on stderr).

Photos a person reviewed and excluded (the catalogue's ``excluded`` column holds the reason,
e.g. after the label-noise report of the crossval stage) are assigned first and then marked
``excluded``, so that excluding one photo never moves any other between splits.

Photos accepted from feedback (the reviewed catalogue, ``data/reviewed.csv``) never change
the original photos' split: those are split as above, by themselves, so the original ``test``
split stays the one every earlier model was measured on. Each reviewed photo is then placed
by its own SHA-256 and ``split.seed`` alone (``reviewed_split``): ``test_ratio`` of them into
``production_test``, ``val_ratio`` into ``val``, the rest into ``train``; accepting more
photos never moves one already placed. A reviewed photo with an original photo's bytes is not
added again: the original stands (a different label is reported, as ambiguous files are). The
catalogue's sha256 column pins each reviewed photo's bytes; one missing or different stops the
stage with the ``dvc pull`` that fetches them.
"""

from __future__ import annotations

import random
import sys
from collections import defaultdict
from pathlib import Path

from pipeline.catalogue import exclusions, read_catalogue, read_reviewed, reviewed_photos
from pipeline.hashing import sha256_of
from pipeline.params import SplitParams
from pipeline.shards import PhotoShards
from pipeline.splits import EXCLUDED, PRODUCTION_TEST, SPLITS, SplitRow, write_split
from pipeline.stage import StageError, arguments, summarised


def list_images(raw_dir: Path) -> list[tuple[Path, str, str]]:
    """``(path, label, sha256)`` of every photo in ``raw_dir``'s shards, sorted by path; the
    path is the photo's under ``raw_dir`` (``raw_dir/<label>/<filename>``), as the split file
    names it (pipeline/shards.py)."""
    images = [
        (raw_dir / name, name.split("/")[0], sha256_of(data))
        for name, data in PhotoShards(raw_dir).items()
    ]
    return sorted(images, key=lambda image: image[0].as_posix())


def split_images(
    images: list[tuple[Path, str, str]], params: SplitParams
) -> tuple[list[SplitRow], list[str]]:
    """Assign every image to a split; return the rows and the ambiguous files left out."""
    val_ratio, test_ratio = params.val_ratio, params.test_ratio
    groups: dict[str, list[tuple[Path, str]]] = defaultdict(list)
    for path, label, digest in images:
        groups[digest].append((path, label))

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


def reviewed_split(sha256: str, params: SplitParams) -> str:
    """A reviewed photo's split, from its own SHA-256 and ``split.seed`` only: a uniform draw
    in [0, 1) taken from the hash of both, cut at ``test_ratio`` and ``test_ratio + val_ratio``.
    """
    draw = int(sha256_of(f"{params.seed}:{sha256}".encode())[:16], 16) / 16**16
    if draw < params.test_ratio:
        return PRODUCTION_TEST
    if draw < params.test_ratio + params.val_ratio:
        return "val"
    return "train"


def original_labels(images: list[tuple[Path, str, str]]) -> dict[str, set[str]]:
    """Every original photo's SHA-256 and the labels its copies carry, ambiguous ones too."""
    labels: dict[str, set[str]] = defaultdict(set)
    for _, label, digest in images:
        labels[digest].add(label)
    return labels


def add_reviewed(
    rows: list[SplitRow],
    originals: dict[str, set[str]],
    reviewed: list[tuple[Path, str, str]],
    params: SplitParams,
) -> tuple[list[SplitRow], list[str], list[str]]:
    """``rows`` plus the reviewed photos, each in its ``reviewed_split``; also the reviewed
    files left out as ambiguous (their bytes carry another label, among the original photos
    or the reviewed ones) and those left out as copies of an original photo with its label."""
    groups: dict[str, list[tuple[Path, str]]] = defaultdict(list)
    for path, label, digest in reviewed:
        groups[digest].append((path, label))
    added, ambiguous, copies = [], [], []
    for digest, members in sorted(groups.items()):
        labels = {label for _, label in members} | originals.get(digest, set())
        paths = [path.as_posix() for path, _ in members]
        if len(labels) > 1:
            ambiguous.extend(paths)
        elif digest in originals:
            copies.extend(paths)
        else:
            split, (label,) = reviewed_split(digest, params), labels
            added.extend(SplitRow(path, label, split, digest) for path in paths)
    return sorted(rows + added, key=lambda row: row.path), sorted(ambiguous), sorted(copies)


@summarised("split")
def main(argv: list[str] | None = None) -> str:
    args = arguments(
        argv, __doc__, "raw_dir", "catalogue", "reviewed_catalogue", "reviewed_dir", "out_csv"
    )
    params = SplitParams.load()
    try:
        entries = read_reviewed(args.reviewed_catalogue)
    except ValueError as error:
        raise StageError(str(error)) from None
    reviewed = reviewed_photos(entries, args.reviewed_dir)
    images = list_images(args.raw_dir)
    rows, ambiguous = split_images(images, params)
    excluded = exclusions(read_catalogue(args.catalogue))
    rows = apply_exclusions(rows, excluded)
    rows, reviewed_ambiguous, copies = add_reviewed(rows, original_labels(images), reviewed, params)
    for path in sorted(ambiguous + reviewed_ambiguous):
        print(f"split: left out {path}: the same bytes carry another label", file=sys.stderr)
    for name, reason in sorted(excluded.items()):
        print(f"split: excluded {name}: {reason}")
    for path in copies:
        print(f"split: {path} is already an original photo (the same bytes): not added again")
    write_split(rows, args.out_csv)
    counts = ", ".join(f"{sum(r.split == s for r in rows)} {s}" for s in (*SPLITS, EXCLUDED))
    return f"{len(rows)} images ({counts}) -> {args.out_csv}"


if __name__ == "__main__":
    main()
