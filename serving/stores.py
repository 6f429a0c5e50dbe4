"""Where feedback is kept for review: an S3-compatible bucket, or a local directory.

Which one is deployment configuration, read from the environment when the service starts
(``feedback_config``; the variables' names are serving/settings.py's). A store only ever puts
whole objects under keys of its own prefix; the spool (serving/spool.py) calls it from the
flusher's thread, never from a request. ``keys`` and ``get`` are for the review of feedback
(``dandelion review``, pipeline/review.py), which reads the same configuration.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from serving.settings import (
    DEFAULT_FEEDBACK_DIR,
    FEEDBACK_DIR_ENV,
    FEEDBACK_S3_ENDPOINT_ENV,
    FEEDBACK_STORE_ENV,
    STORE_TIMEOUT_SECONDS,
)

# The store's layout (docs/serving.md, *Feedback*): a feedback's photo and record, keyed by the
# photo's sha256 and the label given, and the review's decision on that record.
PHOTOS, RECORDS, DECISIONS = "photos/", "records/", "reviewed/"


def photo_key(sha256: str) -> str:
    return f"{PHOTOS}{sha256}"


def record_key(sha256: str, label: str) -> str:
    return f"{RECORDS}{sha256}/{label}.json"


def decision_key(sha256: str, label: str) -> str:
    return f"{DECISIONS}{sha256}/{label}.json"


def write_whole(path: Path, data: bytes) -> None:
    """Write ``path`` unless it holds ``data`` already; a reader never sees half of it."""
    if path.is_file() and path.read_bytes() == data:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


class LocalStore:
    """Objects as files under ``root``, each written whole (a reader never sees half of one)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def put(self, key: str, data: bytes) -> None:
        write_whole(self.root / key, data)

    def keys(self, under: str) -> list[str]:
        """The keys that start with ``under`` (a folder, say ``records/``), sorted; a store
        that does not exist is an error (FileNotFoundError), not an empty one."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"no feedback store at {self.root}")
        return sorted(
            path.relative_to(self.root).as_posix()
            for path in (self.root / under).rglob("*")
            if path.is_file() and not path.name.startswith(".")  # a put under way
        )

    def get(self, key: str) -> bytes:
        return (self.root / key).read_bytes()

    def __str__(self) -> str:
        return str(self.root)


class S3Store:
    """Objects in ``bucket`` under ``prefix``, on AWS S3 or the S3-compatible ``endpoint_url``.
    Credentials come from boto3's standard chain (AWS_ACCESS_KEY_ID, ...)."""

    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix
        connect, read = STORE_TIMEOUT_SECONDS
        # One attempt per call: the flusher is the retry loop, and keeps the feedback spooled.
        config = Config(connect_timeout=connect, read_timeout=read, retries={"max_attempts": 1})
        # A session of its own: boto3's default one keeps the credentials it first found.
        session = boto3.session.Session()
        region = session.region_name or "us-east-1"  # MinIO accepts any
        self.client = session.client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=config
        )

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=f"{self.prefix}{key}", Body=data)

    def keys(self, under: str) -> list[str]:
        """The keys that start with ``under`` (a folder, say ``records/``), sorted."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}{under}"
        )
        return sorted(
            item["Key"].removeprefix(self.prefix)
            for page in pages
            for item in page.get("Contents", [])
        )

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=f"{self.prefix}{key}")["Body"].read()

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def s3_location(url: str, variable: str) -> tuple[str, str]:
    """The bucket and key prefix ("" or ending in /) of ``s3://bucket/prefix``; ValueError
    naming ``variable`` (where the URL was given) if it is not one."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not url.startswith("s3://") or not bucket:
        raise ValueError(f"{variable}={url!r} is not s3://bucket/prefix: it names no bucket")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


@dataclass(frozen=True)
class FeedbackConfig:
    """Where the spool is, and the store's URL: s3://bucket/prefix or a directory."""

    spool_dir: Path
    store_url: str
    endpoint_url: str | None = None

    def store(self) -> LocalStore | S3Store:
        if not self.store_url.startswith("s3://"):
            return LocalStore(Path(self.store_url).expanduser())
        return S3Store(*s3_location(self.store_url, FEEDBACK_STORE_ENV), self.endpoint_url)


def feedback_config(environ: Mapping[str, str]) -> FeedbackConfig:
    """The deployment's feedback configuration, from ``environ`` (os.environ at start-up)."""
    root = Path(environ.get(FEEDBACK_DIR_ENV) or DEFAULT_FEEDBACK_DIR).expanduser()
    return FeedbackConfig(
        spool_dir=root / "spool",
        store_url=environ.get(FEEDBACK_STORE_ENV) or str(root / "store"),
        endpoint_url=environ.get(FEEDBACK_S3_ENDPOINT_ENV) or None,
    )
