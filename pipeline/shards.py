"""The raw photos on disk: tar shards that DVC moves as a few large files.

DVC is slow with many small files (treeverse/dvc#7607: hours for 600k), so the download stage
packs the photos, in catalogue order, ``download.shard_photos`` to a shard, into plain POSIX
tar files ``photos-000000.tar``, ``photos-000001.tar``, ... (WebDataset's layout). Each member
is named ``<label>/<filename>``, the photo's path on the mirror, so one photo comes out with
``tar -xf data/raw/photos-000000.tar dandelion/00000000.jpg``.

The split file keeps naming a photo ``data/raw/<label>/<filename>``: that path is logical, and
``SplitPhotos`` reads it from the shards (reviewed photos, plain files, from disk). So the
split file and everything built from it do not depend on how the photos are stored.

Every header is fixed (mtime 0, owner 0, no user or group name, mode 0644, one format), so the
same photos give the same bytes on any machine, and photos appended to the catalogue change
only the last shard (and add new ones): DVC moves nothing else again.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.stage import StageError

SHARD_PATTERN = "photos-{:06d}.tar"
_SHARD_NAME = re.compile(r"photos-\d{6}\.tar")
_PARTIAL_SUFFIX = ".part"  # a shard being written; renamed once complete
# PAX writes the same bytes as ustar for short ASCII names, and still stores a long or
# non-ASCII filename exactly (in an extended header, itself with fixed fields).
TAR_FORMAT = tarfile.PAX_FORMAT
TAR_ENCODING = "utf-8"  # not the machine's locale: the bytes must not depend on it
FETCH_HINT = "run `dvc pull` (or `dvc repro download`)"


class ShardError(StageError):
    """The raw photos are not shards this module wrote, or lack a photo asked for."""


class MissingPhoto(ShardError):
    """The shards hold no photo of that name."""


def check_name(name: str) -> None:
    """A member name is ``<label>/<filename>``: two parts, no ``..``, not absolute (so that
    ``tar -xf`` puts it where the split file says)."""
    parts = PurePosixPath(name).parts
    if len(parts) != 2 or name.startswith("/") or ".." in parts or name != "/".join(parts):
        raise ShardError(f"{name!r} is not a photo name of the form <label>/<filename>")


def _header(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _clear_for_writing(out_dir: Path) -> list[Path]:
    """The shards (and partial ones) already in ``out_dir``; a ShardError if it holds
    anything else, which writing shards beside would leave in the output."""
    found = []
    for path in sorted(out_dir.iterdir()):
        name = path.name.removesuffix(_PARTIAL_SUFFIX)
        if not (path.is_file() and _SHARD_NAME.fullmatch(name)):
            raise ShardError(
                f"{out_dir} holds {path.name}, which is not a photo shard: remove {out_dir} "
                "first (it holds the download stage's shards only)"
            )
        found.append(path)
    return found


def write_shards(
    photos: Iterable[tuple[str, bytes]], out_dir: Path, shard_photos: int
) -> list[Path]:
    """Write ``(name, bytes)`` pairs, in their order, as tar shards of ``shard_photos`` photos
    each into ``out_dir``; return the shards. Each shard is written under a temporary name
    and renamed once complete; shards of an earlier run beyond the new last one are removed.
    ``photos`` is consumed as it goes: only one photo is held at a time."""
    if shard_photos < 1:
        raise ShardError(f"download.shard_photos must be at least 1, not {shard_photos}")
    out_dir.mkdir(parents=True, exist_ok=True)
    earlier = _clear_for_writing(out_dir)
    written: list[Path] = []
    seen: set[str] = set()
    archive: tarfile.TarFile | None = None
    partial = out_dir
    count = 0

    def finish() -> None:
        nonlocal archive
        assert archive is not None
        archive.close()
        archive = None
        shard = partial.with_name(partial.name.removesuffix(_PARTIAL_SUFFIX))
        os.replace(partial, shard)
        written.append(shard)

    try:
        for name, data in photos:
            check_name(name)
            if name in seen:
                raise ShardError(f"{name} comes twice: a shard holds each photo once")
            seen.add(name)
            if archive is not None and count == shard_photos:
                finish()
            if archive is None:
                partial = out_dir / (SHARD_PATTERN.format(len(written)) + _PARTIAL_SUFFIX)
                archive = tarfile.open(partial, "w", format=TAR_FORMAT, encoding=TAR_ENCODING)
                count = 0
            archive.addfile(_header(name, len(data)), io.BytesIO(data))
            count += 1
        if archive is not None:
            finish()
    except BaseException:
        if archive is not None:
            archive.close()
            partial.unlink(missing_ok=True)
        raise
    for path in earlier:
        if path not in written:
            path.unlink(missing_ok=True)
    return written


def shard_files(raw_dir: Path) -> list[Path]:
    """The shards in ``raw_dir``, in order; a ShardError if it is missing, holds photos one
    file each (the layout before shards), or lacks a shard between the first and the last."""
    if not raw_dir.is_dir():
        raise ShardError(f"{raw_dir} is missing: {FETCH_HINT}")
    entries = sorted(raw_dir.iterdir())
    shards = [path for path in entries if _SHARD_NAME.fullmatch(path.name) and path.is_file()]
    others = [path for path in entries if path not in shards]
    if any(path.is_dir() for path in others):
        folder = next(path for path in others if path.is_dir())
        raise ShardError(
            f"{raw_dir} holds photos one file each ({folder.name}/...), the layout before "
            f"shards: {FETCH_HINT} to get its shards ({SHARD_PATTERN.format(0)}, ...)"
        )
    if others:
        raise ShardError(f"{raw_dir} holds {others[0].name}, which is not a shard: {FETCH_HINT}")
    expected = [SHARD_PATTERN.format(i) for i in range(len(shards))]
    missing = sorted(set(expected) - {path.name for path in shards})
    if missing:
        raise ShardError(f"{raw_dir} lacks {missing[0]} ({len(shards)} shards): {FETCH_HINT}")
    return shards


@dataclass(frozen=True)
class _Member:
    shard: Path
    offset: int  # of the photo's bytes in the shard
    size: int


def _members(shard: Path) -> list[tuple[str, _Member]]:
    """Every photo in ``shard``, checked: a regular file with a photo name, the archive
    ending where the last member does (tarfile stops quietly at a damaged header, as if the
    archive ended there, so a truncated or corrupt shard would otherwise lose photos)."""
    problem = f"{shard} is damaged"
    try:
        with tarfile.open(shard, "r:", encoding=TAR_ENCODING) as archive:
            infos = archive.getmembers()
    except (tarfile.TarError, OSError) as error:
        raise ShardError(f"{problem} ({error}): {FETCH_HINT}") from None
    members = []
    for info in infos:
        if not info.isreg():
            raise ShardError(f"{problem}: {info.name} is not a regular file: {FETCH_HINT}")
        check_name(info.name)
        members.append((info.name, _Member(shard, info.offset_data, info.size)))
    end = 0
    if infos:
        blocks = -(-infos[-1].size // tarfile.BLOCKSIZE)
        end = infos[-1].offset_data + blocks * tarfile.BLOCKSIZE
    with open(shard, "rb") as handle:
        handle.seek(end)
        if handle.read(2 * tarfile.BLOCKSIZE) != bytes(2 * tarfile.BLOCKSIZE):
            raise ShardError(
                f"{problem}: it is truncated or corrupt after {len(infos)} photos: {FETCH_HINT}"
            )
    return members


class PhotoShards:
    """The photos of a raw directory's shards, by name (``<label>/<filename>``).

    Opening reads every shard's headers (not the photos), so a damaged shard, a missing one
    or a directory in the layout before shards is an error at once."""

    def __init__(self, raw_dir: Path | str) -> None:
        self.raw_dir = Path(raw_dir)
        self._index: dict[str, _Member] = {}
        for shard in shard_files(self.raw_dir):
            for name, member in _members(shard):
                if name in self._index:
                    raise ShardError(f"{name} is in {self._index[name].shard} and in {shard}")
                self._index[name] = member

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def names(self) -> list[str]:
        """The photos' names, in shard order (the catalogue's)."""
        return list(self._index)

    def size(self, name: str) -> int:
        return self._member(name).size

    def _member(self, name: str) -> _Member:
        try:
            return self._index[name]
        except KeyError:
            raise MissingPhoto(
                f"{self.raw_dir} has no photo {name} (its shards hold {len(self)}): {FETCH_HINT}"
            ) from None

    @staticmethod
    def _read(handle, name: str, member: _Member) -> bytes:
        handle.seek(member.offset)
        data = handle.read(member.size)
        if len(data) != member.size:
            raise ShardError(f"{member.shard} is truncated in {name}: {FETCH_HINT}")
        return data

    def read(self, name: str) -> bytes:
        member = self._member(name)
        with open(member.shard, "rb") as handle:
            return self._read(handle, name, member)

    def items(self) -> Iterator[tuple[str, bytes]]:
        """``(name, bytes)`` of every photo in shard order, one photo in memory at a time."""
        handle, opened = None, None
        try:
            for name, member in self._index.items():
                if member.shard != opened:
                    if handle is not None:
                        handle.close()
                    handle, opened = open(member.shard, "rb"), member.shard
                yield name, self._read(handle, name, member)
        finally:
            if handle is not None:
                handle.close()


class SplitPhotos:
    """Photos by the path the split file gives them: one under ``raw_dir`` from its shards
    (opened on first use), any other (a reviewed photo) from disk.

    ``raw_dir`` is the raw directory as the split file's paths spell it (``data/raw``);
    ``root`` is where those paths are relative to (the workspace; default: here)."""

    def __init__(self, raw_dir: Path | str, root: Path | str = ".") -> None:
        self.raw_dir, self.root = Path(raw_dir), Path(root)
        self._shards: PhotoShards | None = None

    def shard_name(self, path: str) -> str | None:
        """``<label>/<filename>`` of a path under ``raw_dir``; None for any other path."""
        photo = Path(path)
        return (
            photo.relative_to(self.raw_dir).as_posix()
            if photo.is_relative_to(self.raw_dir)
            else None
        )

    @property
    def shards(self) -> PhotoShards:
        if self._shards is None:
            self._shards = PhotoShards(self.root / self.raw_dir)
        return self._shards

    def read(self, path: str) -> bytes:
        """The photo's bytes; MissingPhoto or FileNotFoundError if there is none."""
        name = self.shard_name(path)
        if name is None:
            return (self.root / path).read_bytes()
        return self.shards.read(name)


def photo_bytes(path: str, raw_dir: Path | str, root: Path | str = ".") -> bytes:
    """One photo's bytes by its split-file path (see SplitPhotos, which reads many without
    opening the shards again for each)."""
    return SplitPhotos(raw_dir, root).read(path)
