"""The catalogue (``data/catalogue.csv``): what the dataset is, one photo a row.

Columns: ``label``, ``filename``, ``sha256`` (empty: not pinned), and optionally ``excluded``,
the reason a person gave for leaving the photo out of every split (e.g. after the label-noise
report of the crossval stage). Where the photos are fetched from is not in it: any mirror
serving the same bytes is the same dataset (``data_url``).
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from pipeline.hashing import file_sha256
from pipeline.params import DownloadParams
from pipeline.stage import StageError

REQUIRED_COLUMNS = ("label", "filename", "sha256")
# Fetch from here instead of download.base_url, without editing params.yaml: a mirror of the
# same bytes (the sha256 column pins them), for machines without internet. Not a dependency of
# the download stage, like base_url itself, so dvc.lock does not change.
BASE_URL_VARIABLE = "DOWNLOAD_BASE_URL"


def data_url(params: DownloadParams) -> str:
    """Where the photos are fetched from: ``download.base_url``, unless BASE_URL_VARIABLE is
    set (the download stage, and the pull request report's note on where the data came from)."""
    return os.environ.get(BASE_URL_VARIABLE) or params.base_url


@dataclass(frozen=True)
class CatalogueEntry:
    label: str
    filename: str
    sha256: str  # empty: not pinned
    excluded: str = ""  # a reviewer's reason to leave the photo out; empty: included

    @property
    def relative_path(self) -> str:
        """``<label>/<filename>``: where the photo is, under the data's base URL or raw_dir."""
        return f"{self.label}/{self.filename}"


def read_catalogue(path: Path) -> list[CatalogueEntry]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = set(REQUIRED_COLUMNS) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
        entries = [
            CatalogueEntry(
                row["label"].strip(),
                row["filename"].strip(),
                row["sha256"].strip(),
                (row.get("excluded") or "").strip(),
            )
            for row in reader
        ]
    for entry in entries:
        if not entry.label or not entry.filename or "/" in entry.filename or ".." in entry.filename:
            raise ValueError(f"{path}: invalid row {entry}")
    return entries


def exclusions(entries: list[CatalogueEntry]) -> dict[str, str]:
    """``<label>/<filename>`` -> the reviewer's reason, for every excluded photo."""
    return {entry.relative_path: entry.excluded for entry in entries if entry.excluded}


# The reviewed photos' catalogue (``data/reviewed.csv``), which `dandelion review accept` keeps:
# one row per photo accepted from feedback, sorted by sha256. ``filename`` is relative to the
# reviewed photos' directory (``<label>/<sha256>.<ext>``); ``source`` says where it came from.
REVIEWED_COLUMNS = ("label", "filename", "sha256", "source")


@dataclass(frozen=True)
class ReviewedEntry:
    label: str
    filename: str
    sha256: str
    source: str


def read_reviewed(path: Path) -> list[ReviewedEntry]:
    """The reviewed photos' rows; a wrong header, a row without label, a filename that leaves
    the directory or a sha256 that is not 64 hex digits is a ValueError naming the line."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        if tuple(reader.fieldnames or ()) != REVIEWED_COLUMNS:
            raise ValueError(
                f"{path}: the columns must be {','.join(REVIEWED_COLUMNS)}, "
                f"not {','.join(reader.fieldnames or ())}"
            )
        entries = []
        for row in reader:
            if None in row or None in row.values():  # too many or too few fields
                raise ValueError(
                    f"{path}, line {reader.line_num}: not {len(REVIEWED_COLUMNS)} fields"
                )
            entries.append((reader.line_num, ReviewedEntry(**row)))
    for line, entry in entries:
        parts = PurePosixPath(entry.filename).parts
        if (
            not entry.label
            or not parts
            or entry.filename.startswith("/")
            or ".." in parts
            or not re.fullmatch(r"[0-9a-f]{64}", entry.sha256)
        ):
            raise ValueError(f"{path}, line {line}: invalid row {entry}")
    return [entry for _, entry in entries]


def reviewed_photos(
    entries: list[ReviewedEntry], reviewed_dir: Path
) -> list[tuple[Path, str, str]]:
    """``(path, label, sha256)`` of every reviewed photo, each checked against its catalogue
    row's sha256; a StageError lists those missing or different and says how to fetch them."""
    problems = []
    for entry in entries:
        path = reviewed_dir / entry.filename
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif (actual := file_sha256(path)) != entry.sha256:
            problems.append(f"{path} has sha256 {actual}, not {entry.sha256}")
    if problems:
        shown = "; ".join(problems[:5]) + (
            f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        )
        raise StageError(
            f"{len(problems)} of {len(entries)} reviewed photos are not the ones the reviewed "
            f"catalogue lists ({shown}): run `dvc pull {reviewed_dir}.dvc` to fetch them"
        )
    return [(reviewed_dir / e.filename, e.label, e.sha256) for e in entries]
