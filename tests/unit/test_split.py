"""Split stage on small generated images."""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import yaml

from pipeline.catalogue import exclusions, read_catalogue
from pipeline.hashing import file_sha256, sha256_of
from pipeline.params import SplitParams
from pipeline.shards import photo_bytes, write_shards
from pipeline.splits import SplitRow, read_split, split_digest, write_split
from stages import split
from tests.support.images import make_image


def ratios(val: float, test: float, seed: int) -> SplitParams:
    return SplitParams(seed=seed, val_ratio=val, test_ratio=test)


def images(label, count, duplicates=0, first_seed=0) -> list[tuple[str, bytes]]:
    """``count`` distinct images plus ``duplicates`` byte-identical copies of the first ones,
    each as ``(<label>/<filename>, bytes)``."""
    distinct = [(f"{label}/{i:03d}.jpg", make_image(seed=first_seed + i)) for i in range(count)]
    copies = [
        (f"{label}/copy{i:03d}.jpg", make_image(seed=first_seed + i)) for i in range(duplicates)
    ]
    return distinct + copies


# 50 dandelion files (40 + 10 copies) and 30 grass, in shards of 16 (pipeline/shards.py).
def write_raw(raw_dir: Path) -> Path:
    photos = images("dandelion", 40, duplicates=10) + images("grass", 30, first_seed=1000)
    write_shards(photos, raw_dir, shard_photos=16)
    return raw_dir


@pytest.fixture
def raw_dir(tmp_path):
    return write_raw(tmp_path / "raw")


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
        assert row.sha256 == sha256_of(photo_bytes(row.path, raw_dir))
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
    photos = images("dandelion", 10) + images("grass", 10, first_seed=100)
    write_shards([*photos, ("grass/mislabelled.jpg", make_image(seed=0))], tmp_path, 8)
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


# Reviewed photos (data/reviewed.csv and the directory `dandelion review accept` fills).

REVIEWED_HEADER = "label,filename,sha256,source\n"


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """The split stage's inputs in the working directory: 50 dandelion and 30 grass photos
    (raw, in shards), an empty catalogue of exclusions and of reviewed photos, params.yaml's
    split section."""
    write_raw(tmp_path / "raw")
    (tmp_path / "catalogue.csv").write_text("label,filename,sha256\n")
    (tmp_path / "reviewed.csv").write_text(REVIEWED_HEADER)
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"split": {"seed": 42, "val_ratio": 0.2, "test_ratio": 0.2}})
    )
    monkeypatch.chdir(tmp_path)
    return tmp_path


def accept(root: Path, photos: list[tuple[str, bytes]]) -> dict[str, str]:
    """Add photos as `dandelion review accept` does: ``reviewed/<label>/<sha256>.jpg`` and a
    row each in reviewed.csv, sorted by sha256. Returns each new photo's path by sha256."""
    rows = (root / "reviewed.csv").read_text().splitlines()[1:]
    added = {}
    for label, data in photos:
        digest = sha256_of(data)
        (root / "reviewed" / label).mkdir(parents=True, exist_ok=True)
        (root / "reviewed" / label / f"{digest}.jpg").write_bytes(data)
        rows.append(f"{label},{label}/{digest}.jpg,{digest},feedback")
        added[digest] = f"reviewed/{label}/{digest}.jpg"
    rows.sort(key=lambda row: row.split(",")[2])
    (root / "reviewed.csv").write_text(REVIEWED_HEADER + "".join(f"{r}\n" for r in rows))
    return added


def run_split() -> list[SplitRow]:
    split.main(["raw", "catalogue.csv", "reviewed.csv", "reviewed", "split.csv"])
    return read_split(Path("split.csv"))


def new_photos(count: int, first_seed: int) -> list[tuple[str, bytes]]:
    labels = ("dandelion", "grass")
    return [(labels[i % 2], make_image(seed=first_seed + i)) for i in range(count)]


def test_without_reviewed_photos_the_split_is_the_original_one(workspace):
    rows = run_split()
    assert rows == split.split_images(split.list_images(Path("raw")), SplitParams.load())[0]
    assert {row.split for row in rows} == {"train", "val", "test"}


def test_reviewed_photos_never_move_an_original_photo(workspace):
    before = run_split()
    added = accept(workspace, new_photos(40, first_seed=5000))
    after = run_split()
    assert [row for row in after if row.path.startswith("raw/")] == before
    reviewed = [row for row in after if not row.path.startswith("raw/")]
    assert {row.sha256: row.path for row in reviewed} == added
    assert all(row.sha256 == file_sha256(row.path) for row in reviewed)
    counts = Counter(row.split for row in reviewed)
    assert set(counts) == {"train", "val", "production_test"}, counts
    assert split_digest(after) == split_digest(before)  # what promotion compares on


def test_the_test_sets_digest_is_over_its_photos_sorted_sha256(workspace):
    rows = run_split()
    digests = sorted(row.sha256 for row in rows if row.split == "test")
    assert (
        split_digest(rows)
        == hashlib.sha256("".join(d + "\n" for d in digests).encode()).hexdigest()
    )
    moved = [
        SplitRow(r.path, r.label, "train", r.sha256) if r.sha256 == digests[0] else r for r in rows
    ]
    assert split_digest(moved) != split_digest(rows)


def test_accepting_more_photos_moves_none_already_placed(workspace):
    accept(workspace, new_photos(30, first_seed=5000))
    first = {row.sha256: row.split for row in run_split() if row.path.startswith("reviewed/")}
    accept(workspace, new_photos(30, first_seed=6000))
    second = {row.sha256: row.split for row in run_split() if row.path.startswith("reviewed/")}
    assert len(first) == 30 and len(second) == 60
    assert {digest: second[digest] for digest in first} == first


def test_the_reviewed_rule_follows_the_ratios_and_the_seed():
    digests = [sha256_of(str(i).encode()) for i in range(20000)]
    params = ratios(0.15, 0.2, seed=42)
    placed = [split.reviewed_split(digest, params) for digest in digests]
    shares = {name: count / len(digests) for name, count in Counter(placed).items()}
    assert shares["production_test"] == pytest.approx(0.2, abs=0.01)
    assert shares["val"] == pytest.approx(0.15, abs=0.01)
    assert shares["train"] == pytest.approx(0.65, abs=0.01)
    other_seed = [split.reviewed_split(d, ratios(0.15, 0.2, seed=43)) for d in digests[:1000]]
    assert other_seed != placed[:1000]


def test_a_reviewed_copy_of_an_original_photo_is_not_added_again(workspace, capsys):
    before = run_split()
    same_label = make_image(seed=3)  # raw/dandelion/003.jpg
    other_label = make_image(seed=1004)  # raw/grass/004.jpg, labelled dandelion by a reviewer
    fresh = make_image(seed=7000)
    added = accept(
        workspace,
        [("dandelion", same_label), ("dandelion", other_label), ("grass", fresh)],
    )
    capsys.readouterr()
    after = run_split()
    out, err = capsys.readouterr()
    assert [row for row in after if row.path.startswith("raw/")] == before
    assert [row.path for row in after if row.path.startswith("reviewed/")] == [
        added[sha256_of(fresh)]
    ]
    assert f"split: {added[sha256_of(same_label)]} is already an original photo" in out
    assert err == (
        f"split: left out {added[sha256_of(other_label)]}: the same bytes carry another label\n"
    )


def test_reviewed_copies_under_two_labels_are_left_out(workspace, capsys):
    photo = make_image(seed=8000)
    digest = sha256_of(photo)
    accept(workspace, [("dandelion", photo)])
    (workspace / "reviewed" / "grass").mkdir()
    (workspace / "reviewed" / "grass" / f"{digest}.jpg").write_bytes(photo)
    with open(workspace / "reviewed.csv", "a") as handle:
        handle.write(f"grass,grass/{digest}.jpg,{digest},feedback\n")
    rows = run_split()
    assert not [row for row in rows if row.sha256 == digest]
    assert capsys.readouterr().err.count("the same bytes carry another label") == 2


def test_a_missing_or_changed_reviewed_photo_stops_the_stage_with_the_pull(workspace):
    added = accept(workspace, new_photos(3, first_seed=5000))
    missing, changed, _ = sorted(added)
    Path(added[missing]).unlink()
    Path(added[changed]).write_bytes(make_image(seed=9999))
    with pytest.raises(SystemExit) as stopped:
        run_split()
    assert str(stopped.value.code) == (
        "split failed: 2 of 3 reviewed photos are not the ones the reviewed catalogue lists "
        f"({added[missing]} is missing; {added[changed]} has sha256 "
        f"{sha256_of(make_image(seed=9999))}, not {changed}): "
        "run `dvc pull reviewed.dvc` to fetch them"
    )
    assert not Path("split.csv").exists()


def test_reviewed_photos_without_their_directory_stop_the_stage_with_the_pull(workspace):
    accept(workspace, new_photos(2, first_seed=5000))
    shutil.rmtree(workspace / "reviewed")
    with pytest.raises(SystemExit, match=r"2 of 2 .* run `dvc pull reviewed.dvc`"):
        run_split()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("label,filename,sha256\n", "the columns must be label,filename,sha256,source"),
        (REVIEWED_HEADER + "grass,../x.jpg," + "0" * 64 + ",feedback\n", "line 2: invalid row"),
        (REVIEWED_HEADER + "grass,grass/x.jpg,abc,feedback\n", "line 2: invalid row"),
        (REVIEWED_HEADER + "grass,grass/x.jpg\n", "line 2: not 4 fields"),
    ],
)
def test_a_malformed_reviewed_catalogue_is_a_one_line_error(workspace, text, problem):
    (workspace / "reviewed.csv").write_text(text)
    with pytest.raises(SystemExit) as stopped:
        run_split()
    assert str(stopped.value.code).startswith("split failed: reviewed.csv")
    assert problem in str(stopped.value.code)


def test_the_split_file_names_photos_by_their_path_under_the_raw_dir(workspace):
    rows = run_split()
    assert {row.path for row in rows} == {
        f"raw/{name}" for name, _ in images("dandelion", 40, 10) + images("grass", 30, 0, 1000)
    }


def test_a_raw_dir_of_one_file_per_photo_stops_the_stage_in_one_line(workspace):
    shutil.rmtree("raw")
    (workspace / "raw" / "grass").mkdir(parents=True)
    (workspace / "raw" / "grass" / "000.jpg").write_bytes(make_image())
    with pytest.raises(SystemExit) as stopped:
        run_split()
    assert str(stopped.value.code) == (
        "split failed: raw holds photos one file each (grass/...), the layout before shards: "
        "run `dvc pull` (or `dvc repro download`) to get its shards (photos-000000.tar, ...)"
    )
