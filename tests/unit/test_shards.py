"""The raw photos' tar shards (pipeline/shards.py): round trip, identical bytes, errors."""

from __future__ import annotations

import hashlib
import subprocess
import tarfile

import pytest

from pipeline.shards import (
    SHARD_PATTERN,
    MissingPhoto,
    PhotoShards,
    ShardError,
    SplitPhotos,
    photo_bytes,
    write_shards,
)
from tests.support.images import make_image


def photos(count: int, first: int = 0) -> list[tuple[str, bytes]]:
    labels = ("dandelion", "grass")
    return [(f"{labels[i % 2]}/{i:08d}.jpg", make_image(seed=i)) for i in range(first, count)]


def digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_photos_come_back_in_order_and_by_name(tmp_path):
    written = write_shards(iter(photos(7)), tmp_path, shard_photos=3)
    assert [p.name for p in written] == [SHARD_PATTERN.format(i) for i in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in written]
    shards = PhotoShards(tmp_path)
    assert shards.names() == [name for name, _ in photos(7)]
    assert list(shards.items()) == photos(7)
    assert shards.read("grass/00000005.jpg") == make_image(seed=5)
    assert shards.size("grass/00000005.jpg") == len(make_image(seed=5))
    assert len(shards) == 7 and "dandelion/00000000.jpg" in shards


def test_the_headers_are_fixed_and_tar_extracts_a_photo(tmp_path):
    write_shards(photos(2), tmp_path / "raw", shard_photos=5)
    with tarfile.open(tmp_path / "raw" / SHARD_PATTERN.format(0)) as archive:
        headers = {
            (m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname, m.type) for m in archive.getmembers()
        }
    assert headers == {(0, 0o644, 0, 0, "", "", tarfile.REGTYPE)}
    shard = tmp_path / "raw" / SHARD_PATTERN.format(0)
    subprocess.run(["tar", "-xf", shard, "grass/00000001.jpg"], cwd=tmp_path, check=True)
    assert (tmp_path / "grass" / "00000001.jpg").read_bytes() == make_image(seed=1)


def test_the_same_photos_give_the_same_bytes(tmp_path):
    write_shards(photos(9), tmp_path / "one", shard_photos=4)
    write_shards(photos(9), tmp_path / "two", shard_photos=4)
    assert digests(tmp_path / "one") == digests(tmp_path / "two")
    assert len(digests(tmp_path / "one")) == 3


def test_appending_photos_changes_only_the_last_shard(tmp_path):
    write_shards(photos(10), tmp_path / "before", shard_photos=4)
    write_shards(photos(14), tmp_path / "after", shard_photos=4)
    before, after = digests(tmp_path / "before"), digests(tmp_path / "after")
    first, middle, last, new = (SHARD_PATTERN.format(i) for i in range(4))
    assert (before[first], before[middle]) == (after[first], after[middle])
    assert before[last] != after[last] and set(after) - set(before) == {new}


def test_a_rerun_with_fewer_photos_leaves_no_stale_shard(tmp_path):
    write_shards(photos(9), tmp_path, shard_photos=2)
    write_shards(photos(3), tmp_path, shard_photos=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [SHARD_PATTERN.format(i) for i in (0, 1)]
    assert PhotoShards(tmp_path).names() == [name for name, _ in photos(3)]


def test_no_photos_no_shards(tmp_path):
    assert write_shards([], tmp_path / "raw", shard_photos=2) == []
    assert PhotoShards(tmp_path / "raw").names() == []


@pytest.mark.parametrize("shard_photos", [0, -1])
def test_a_shard_holds_at_least_one_photo(tmp_path, shard_photos):
    with pytest.raises(ShardError, match=f"shard_photos must be at least 1, not {shard_photos}"):
        write_shards(photos(2), tmp_path, shard_photos)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["x.jpg", "a/b/c.jpg", "../x.jpg", "/grass/x.jpg", "grass//x"])
def test_a_name_is_label_slash_filename(tmp_path, name):
    with pytest.raises(ShardError, match="not a photo name of the form <label>/<filename>"):
        write_shards([(name, b"data")], tmp_path, 2)
    assert not list(tmp_path.iterdir())  # no partial shard left behind


def test_a_photo_twice_is_refused(tmp_path):
    with pytest.raises(ShardError, match="grass/a.jpg comes twice"):
        write_shards([("grass/a.jpg", b"1"), ("grass/a.jpg", b"2")], tmp_path, 5)


def test_shards_are_not_written_beside_other_files(tmp_path):
    (tmp_path / "grass").mkdir()
    with pytest.raises(ShardError, match=r"holds grass, which is not a photo shard: remove"):
        write_shards(photos(2), tmp_path, 5)


def test_the_layout_before_shards_says_how_to_get_them(tmp_path):
    (tmp_path / "dandelion").mkdir()
    (tmp_path / "dandelion" / "00000000.jpg").write_bytes(make_image())
    with pytest.raises(ShardError) as refused:
        PhotoShards(tmp_path)
    message = str(refused.value)
    assert "holds photos one file each (dandelion/...), the layout before shards" in message
    assert "`dvc pull` (or `dvc repro download`)" in message


def test_a_missing_directory_or_shard_says_how_to_get_it(tmp_path):
    with pytest.raises(ShardError, match=r"raw is missing: run `dvc pull`"):
        PhotoShards(tmp_path / "raw")
    write_shards(photos(6), tmp_path / "raw", shard_photos=2)
    (tmp_path / "raw" / SHARD_PATTERN.format(1)).unlink()
    with pytest.raises(ShardError, match=r"lacks photos-000001.tar \(2 shards\): run `dvc pull`"):
        PhotoShards(tmp_path / "raw")


def test_a_missing_photo_is_named(tmp_path):
    write_shards(photos(3), tmp_path, shard_photos=2)
    with pytest.raises(MissingPhoto, match=r"has no photo grass/nope.jpg \(its shards hold 3\)"):
        PhotoShards(tmp_path).read("grass/nope.jpg")


def cut(path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda shard: cut(shard, 700), id="truncated in a photo"),
        pytest.param(lambda shard: cut(shard, 0), id="empty"),
        # At a header's boundary: tarfile alone would take it for the archive's end.
        pytest.param(
            lambda shard: cut(shard, 512 + -(-len(make_image(seed=0)) // 512) * 512),
            id="truncated after a photo",
        ),
        pytest.param(lambda shard: shard.write_bytes(b"not a tar" * 200), id="not a tar"),
    ],
)
def test_a_damaged_shard_is_an_error(tmp_path, damage):
    write_shards(photos(3), tmp_path, shard_photos=5)
    damage(tmp_path / SHARD_PATTERN.format(0))
    with pytest.raises(ShardError, match=r"photos-000000.tar is damaged.*run `dvc pull`"):
        PhotoShards(tmp_path)


def test_a_corrupt_second_header_is_an_error(tmp_path):
    write_shards(photos(3), tmp_path, shard_photos=5)
    shard = tmp_path / SHARD_PATTERN.format(0)
    data = bytearray(shard.read_bytes())
    second = 512 + -(-len(make_image(seed=0)) // 512) * 512
    data[second + 148 : second + 156] = b"9999999\0"  # its checksum
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="truncated or corrupt after 1 photos"):
        PhotoShards(tmp_path)


def test_split_paths_under_the_raw_dir_come_from_the_shards(tmp_path):
    write_shards(photos(3), tmp_path / "data" / "raw", shard_photos=2)
    (tmp_path / "data" / "reviewed" / "grass").mkdir(parents=True)
    (tmp_path / "data" / "reviewed" / "grass" / "r.jpg").write_bytes(b"reviewed")
    split_photos = SplitPhotos("data/raw", root=tmp_path)
    assert split_photos.read("data/raw/grass/00000001.jpg") == make_image(seed=1)
    assert split_photos.read("data/reviewed/grass/r.jpg") == b"reviewed"
    assert photo_bytes("data/raw/dandelion/00000002.jpg", "data/raw", tmp_path) == make_image(
        seed=2
    )
    with pytest.raises(FileNotFoundError):
        split_photos.read("data/reviewed/grass/gone.jpg")
    with pytest.raises(MissingPhoto):
        split_photos.read("data/raw/grass/gone.jpg")
