"""Preprocess stage: decode each split's images to fixed-size RGB arrays, one .npz per split.

The photos the split file names ``<raw_dir>/<label>/<filename>`` are read from the raw
directory's shards, reviewed photos from their files (pipeline/shards.py).

Every split gets its file, an empty one too (``production_test`` before any reviewed photo
is accepted), so that the stages reading it can declare it.

How a picture becomes model input is defined once, by ``serving.contract.load_image``, which
the prediction service uses too, so training and serving can never drift apart.
"""

from __future__ import annotations

import io

import numpy as np

from pipeline.hashing import sha256_of
from pipeline.params import ParamsError, PreprocessParams, classes
from pipeline.shards import MissingPhoto, SplitPhotos
from pipeline.splits import SPLITS, SplitRow, read_split
from pipeline.stage import StageError, arguments, summarised
from serving.contract import load_image


def preprocess_split(
    photos: SplitPhotos, paths: list[str], labels: list[str], classes: list[str], image_size: int
) -> dict[str, np.ndarray]:
    """The split's photos (read by their split-file ``paths``) as arrays, with their labels."""
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise ParamsError(f"labels {unknown} are not in params 'classes' {classes}")
    images = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        images[i] = load_image(io.BytesIO(photos.read(path)), image_size)
    return {
        "images": images,
        "labels": np.array([classes.index(label) for label in labels], dtype=np.int64),
        "paths": np.array(paths, dtype=str),  # str even when empty (production_test may be)
    }


def check_photos(photos: SplitPhotos, rows: list[SplitRow]) -> None:
    """Each photo is the one the split file names (its sha256): the reviewed photos are read
    from a directory no stage declares (dvc.yaml), so their bytes are checked here as well as
    in ``split``, which may not have run in this checkout."""
    problems = []
    for row in rows:
        try:
            if sha256_of(photos.read(row.path)) != row.sha256:
                problems.append(f"{row.path} is not the photo of sha256 {row.sha256}")
        except (FileNotFoundError, MissingPhoto):
            problems.append(f"{row.path} is missing")
    if problems:
        raise StageError(
            f"{len(problems)} photos are not those of the split file ({'; '.join(problems[:3])}"
            f"{'; ...' if len(problems) > 3 else ''}): reviewed photos come with `dvc pull` "
            "(docs/pipeline.md, *Reviewed photos*); then run `dvc repro`"
        )


@summarised("preprocess")
def main(argv: list[str] | None = None) -> str:
    args = arguments(argv, __doc__, "split_csv", "raw_dir", "out_dir")
    image_size = PreprocessParams.load().image_size
    names = classes()
    rows = read_split(args.split_csv)
    photos = SplitPhotos(args.raw_dir)
    check_photos(photos, [row for row in rows if row.split in SPLITS])
    args.out_dir.mkdir(parents=True, exist_ok=True)
    counts, total = [], 0
    for split in SPLITS:
        chosen = [row for row in rows if row.split == split]
        arrays = preprocess_split(
            photos, [row.path for row in chosen], [row.label for row in chosen], names, image_size
        )
        # Uncompressed: training loads it in a fraction of a second.
        np.savez(args.out_dir / f"{split}.npz", **arrays)
        counts.append(f"{len(chosen)} {split}")
        total += len(chosen)
    return f"{total} images ({', '.join(counts)}) at {image_size} px -> {args.out_dir}"


if __name__ == "__main__":
    main()
