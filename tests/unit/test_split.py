"""Split stage on small generated images."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

import pytest

from pipeline.catalogue import exclusions, read_catalogue
from pipeline.hashing import file_sha256
from pipeline.params import SplitParams
from pipeline.splits import read_split, write_split
from stages import split
from tests.support.images import make_image


def ratios(val: float, test: float, seed: int) -> SplitParams:
    return SplitParams(seed=seed, val_ratio=val, test_ratio=test)


def write_images(root, label, count, duplicates=0, first_seed=0):
    """``count`` distinct images plus ``duplicates`` byte-identical copies of the first ones."""
    folder = root / label
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"{i:03d}.jpg").write_bytes(make_image(seed=first_seed + i))
    for i in range(duplicates):
        (folder / f"copy{i:03d}.jpg").write_bytes(make_image(seed=first_seed + i))


@pytest.fixture
def raw_dir(tmp_path):
    write_images(tmp_path, "dandelion", 40, duplicates=10)
    write_images(tmp_path, "grass", 30, first_seed=1000)
    return tmp_path


def test_split_is_stratified(raw_dir):
    rows, ambiguous = split.split_images(split.list_images(raw_dir), ratios(0.2, 0.2, seed=1))
    assert ambiguous == []
    counts = Counter((row.label, row.split) for row in rows)
    # 50 dandelion files (40 + 10 copies) and 30 grass: 20% each to val and test.
    assert counts[("grass", "test")] == 6 and counts[("grass", "val")] == 6
    assert counts[("grass", "train")] == 18
    # Duplicate pairs move together, so a split may overshoot its target by one file.
    assert 10 <= counts[("dandelion", "test")] <= 11
    assert 10 <= counts[("dandelion", "val")] <= 11
    assert len(rows) == 80


def test_identical_bytes_never_straddle_splits(raw_dir):
    rows, _ = split.split_images(split.list_images(raw_dir), ratios(0.3, 0.3, seed=7))
    splits_by_hash = defaultdict(set)
    for row in rows:
        splits_by_hash[row.sha256].add(row.split)
        assert row.sha256 == file_sha256(Path(row.path))
    assert all(len(splits) == 1 for splits in splits_by_hash.values())
    assert sum(1 for row in rows if row.path.split("/")[-1].startswith("copy")) == 10


def test_same_seed_same_split_other_seed_other_split(raw_dir):
    images = split.list_images(raw_dir)
    first, _ = split.split_images(images, ratios(0.2, 0.2, seed=3))
    again, _ = split.split_images(images, ratios(0.2, 0.2, seed=3))
    other, _ = split.split_images(images, ratios(0.2, 0.2, seed=4))
    assert first == again
    assert first != other


def test_same_bytes_under_two_labels_are_left_out(tmp_path):
    write_images(tmp_path, "dandelion", 10)
    write_images(tmp_path, "grass", 10, first_seed=100)
    (tmp_path / "grass" / "mislabelled.jpg").write_bytes(make_image(seed=0))
    rows, ambiguous = split.split_images(split.list_images(tmp_path), ratios(0.2, 0.2, seed=0))
    assert sorted("/".join(Path(p).parts[-2:]) for p in ambiguous) == [
        "dandelion/000.jpg",
        "grass/mislabelled.jpg",
    ]
    assert len(rows) == 19


@pytest.mark.parametrize(("val", "test"), [(0.5, 0.5), (-0.1, 0.2), (0.2, 1.0)])
def test_impossible_ratios_are_rejected(raw_dir, val, test):
    with pytest.raises(ValueError, match="split ratios"):
        split.split_images(split.list_images(raw_dir), ratios(val, test, seed=0))


def test_split_csv_round_trip(raw_dir, tmp_path):
    rows, _ = split.split_images(split.list_images(raw_dir), ratios(0.2, 0.2, seed=1))
    write_split(rows, tmp_path / "out" / "split.csv")
    assert read_split(tmp_path / "out" / "split.csv") == rows


def test_a_reviewed_exclusion_moves_no_other_photo(raw_dir, tmp_path):
    rows, _ = split.split_images(split.list_images(raw_dir), ratios(0.2, 0.2, seed=7))
    catalogue = tmp_path / "catalogue.csv"
    catalogue.write_text(
        "label,filename,sha256,excluded\n"
        'grass,003.jpg,,"an illustration, not a photo"\n'
        "grass,004.jpg,,\n"
        "dandelion,010.jpg,,labelled dandelion; shows grass\n"
    )
    excluded = exclusions(read_catalogue(catalogue))
    assert excluded == {
        "grass/003.jpg": "an illustration, not a photo",
        "dandelion/010.jpg": "labelled dandelion; shows grass",
    }
    kept = split.apply_exclusions(rows, excluded)
    changed = [(a.path, b.split) for a, b in zip(rows, kept, strict=True) if a != b]
    assert sorted(changed) == [
        (str(raw_dir / "dandelion" / "010.jpg"), "excluded"),
        (str(raw_dir / "grass" / "003.jpg"), "excluded"),
    ]


def test_a_catalogue_without_the_column_excludes_nothing(tmp_path):
    catalogue = tmp_path / "catalogue.csv"
    catalogue.write_text("label,filename,sha256\ngrass,003.jpg,\n")
    assert exclusions(read_catalogue(catalogue)) == {}
