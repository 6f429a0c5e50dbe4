"""The prediction log: one JSON record per model answer, in rotating files, in S3, or both.

Which sinks, where, and whether photos are kept is the deployment's choice, read from the
environment when the service starts (``PredictionLog.from_environ``; the variables' names and
the bounds are serving/settings.py's, docs/serving.md *Prediction log* explains them).

Logging never slows or fails an answer: ``record`` only puts the record (and its photo, when
photos are kept) on a bounded in-memory buffer; past its bounds the record is dropped and
counted on /metrics (classifier_prediction_log_dropped_total). A writer thread appends each
record as one line to the current file of the log's directory, and closes the file past a
size or an age; an uploader thread puts each closed file, whole, into the store (S3 sink).

The directory's layout is the store's, so both read the same way (``read_records``):

    records/<start>-<host>-<pid>-<n>.jsonl       closed files, one record per line
    records/<start>-<host>-<pid>-<n>.jsonl.open  the file being written (one per process)
    photos/<sha256>                              kept photos, each written once

A file's name starts with the UTC time it was opened, so names sort by time; the host and
process id keep several processes and restarts apart. The directory is bounded (files and
bytes): past a bound the oldest closed files go, records and photos alike, and records that
no store had are counted dropped ("evicted"). With the S3 sink alone a file leaves the
directory once uploaded; with both, an empty ``.<name>.uploaded`` beside it says it was. While
the store is down files wait on disk, within the bounds, and each failure is counted.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import queue
import re
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from serving.settings import (
    DEFAULT_PREDICTION_LOG,
    DEFAULT_PREDICTION_LOG_DIR,
    PREDICTION_LOG_BUFFER_BYTES,
    PREDICTION_LOG_BUFFER_RECORDS,
    PREDICTION_LOG_DIR_ENV,
    PREDICTION_LOG_ENV,
    PREDICTION_LOG_FILE_BYTES,
    PREDICTION_LOG_FILE_SECONDS,
    PREDICTION_LOG_KEEP_PHOTOS_ENV,
    PREDICTION_LOG_KEEP_PHOTOS_VALUES,
    PREDICTION_LOG_MAX_BYTES,
    PREDICTION_LOG_MAX_FILES,
    PREDICTION_LOG_OFF,
    PREDICTION_LOG_RECORD_BYTES,
    PREDICTION_LOG_S3_ENDPOINT_ENV,
    PREDICTION_LOG_SINKS,
    PREDICTION_LOG_STORE_ENV,
    PREDICTION_LOG_UPLOAD_RETRY_SECONDS,
)
from serving.stores import (
    PHOTOS,
    RECORDS,
    LocalStore,
    S3Store,
    photo_key,
    s3_location,
    write_whole,
)

logger = logging.getLogger("bentoml.service.dandelion")

RECORDS_SUFFIX = ".jsonl"
OPEN_SUFFIX = ".open"  # after RECORDS_SUFFIX: the file a process is writing
UPLOADED_SUFFIX = ".uploaded"  # .<name>.uploaded: <name> is in the store (both sinks)
SHA256 = re.compile(r"[0-9a-f]{64}")
STOP = object()  # the writer's last item


@dataclass(frozen=True)
class Bounds:
    """How much the log holds in memory and on disk (serving/settings.py explains each)."""

    buffer_records: int = PREDICTION_LOG_BUFFER_RECORDS
    buffer_bytes: int = PREDICTION_LOG_BUFFER_BYTES
    record_bytes: int = PREDICTION_LOG_RECORD_BYTES
    file_bytes: int = PREDICTION_LOG_FILE_BYTES
    file_seconds: float = PREDICTION_LOG_FILE_SECONDS
    max_files: int = PREDICTION_LOG_MAX_FILES
    max_bytes: int = PREDICTION_LOG_MAX_BYTES
    retry_seconds: float = PREDICTION_LOG_UPLOAD_RETRY_SECONDS

    def __post_init__(self) -> None:
        if self.file_bytes > self.max_bytes:
            raise ValueError("a prediction log file may not be larger than the log's disk bound")


def file_host() -> str:
    """This machine's name as a file name may hold it (a pod's name, in Kubernetes)."""
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def whole_lines(data: bytes) -> bytes:
    """``data`` up to its last newline: a line a writer was cut off in is not a record."""
    return data[: data.rfind(b"\n") + 1]


class PredictionLog:
    """The log of a service's answers; thread-safe. ``sinks`` is empty when the log is off."""

    def __init__(
        self,
        sinks: tuple[str, ...],
        directory: Path,
        store_url: str | None = None,
        endpoint_url: str | None = None,
        keep_photos: bool = False,
        bounds: Bounds = Bounds(),
    ) -> None:
        unknown = [sink for sink in sinks if sink not in PREDICTION_LOG_SINKS]
        if unknown:
            raise ValueError(f"unknown prediction log sinks {unknown}: {PREDICTION_LOG_SINKS}")
        if "s3" in sinks:
            if not store_url:
                raise ValueError(
                    f"{PREDICTION_LOG_ENV}={','.join(sinks)} needs {PREDICTION_LOG_STORE_ENV}="
                    "s3://bucket/prefix"
                )
            s3_location(store_url, PREDICTION_LOG_STORE_ENV)
        self.sinks, self.directory, self.keep_photos = sinks, directory, keep_photos
        self.store_url, self.endpoint_url, self.bounds = store_url, endpoint_url, bounds
        self.records_dir, self.photos_dir = directory / RECORDS, directory / PHOTOS
        self.buffer: queue.Queue = queue.Queue(bounds.buffer_records)
        self.buffer_lock = threading.Lock()
        self.buffered_bytes = 0
        self.stopped = False  # record() drops from stop() on
        self.abandoned = False  # the writer drops what is left: stop()'s time ran out
        # The directory's files change under this lock (written, closed, uploaded, evicted);
        # the store is called outside it.
        self.disk_lock = threading.Lock()
        self.disk_files = self.disk_bytes = 0  # as last scanned, plus what was written since
        self.handle = None  # the open file
        self.open_path: Path | None = None
        self.opened_at = 0.0
        self.file_size = 0
        self.files_opened = 0
        self.host, self.pid = file_host(), os.getpid()
        self.store = None
        self.writer: threading.Thread | None = None
        self.uploader: threading.Thread | None = None
        self.upload_wanted = threading.Event()
        self.uploads_stopping = threading.Event()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> PredictionLog:
        """The deployment's log, from ``environ``; ValueError naming a bad variable. No I/O."""
        value = (environ.get(PREDICTION_LOG_ENV) or DEFAULT_PREDICTION_LOG).strip()
        sinks = tuple(sink.strip() for sink in value.split(","))
        if value == PREDICTION_LOG_OFF:
            sinks = ()
        elif len(set(sinks)) != len(sinks) or not set(sinks) <= set(PREDICTION_LOG_SINKS):
            raise ValueError(
                f"{PREDICTION_LOG_ENV}={value!r}: expected {PREDICTION_LOG_OFF!r} or sinks "
                f"from {list(PREDICTION_LOG_SINKS)} separated by commas (files,s3)"
            )
        keep = (environ.get(PREDICTION_LOG_KEEP_PHOTOS_ENV) or "0").strip()
        if keep not in PREDICTION_LOG_KEEP_PHOTOS_VALUES:
            raise ValueError(
                f"{PREDICTION_LOG_KEEP_PHOTOS_ENV}={keep!r}: expected one of "
                f"{list(PREDICTION_LOG_KEEP_PHOTOS_VALUES)} (1 keeps the answered photos)"
            )
        return cls(
            sinks,
            Path(environ.get(PREDICTION_LOG_DIR_ENV) or DEFAULT_PREDICTION_LOG_DIR).expanduser(),
            store_url=environ.get(PREDICTION_LOG_STORE_ENV) or None,
            endpoint_url=environ.get(PREDICTION_LOG_S3_ENDPOINT_ENV) or None,
            keep_photos=PREDICTION_LOG_KEEP_PHOTOS_VALUES[keep],
        )

    def __str__(self) -> str:
        if not self.sinks:
            return "off"
        where = [str(self.directory)] + ([self.store_url] if "s3" in self.sinks else [])
        photos = "with" if self.keep_photos else "without"
        return f"{' and '.join(where)} ({','.join(self.sinks)}, {photos} photos)"

    # --- the service's calls ----------------------------------------------------------------

    def start(self) -> None:
        """Make the directory, close what a stopped process of this host left open, and start
        the writer (and the uploader, for the S3 sink: it uploads what earlier runs left)."""
        from serving.metrics import prediction_log_metrics

        prediction_log_metrics().describe()
        if not self.sinks:
            return
        self.records_dir.mkdir(parents=True, exist_ok=True)
        self.photos_dir.mkdir(parents=True, exist_ok=True)
        self.close_stale_files()
        with self.disk_lock:
            self.make_room(0)
        self.writer = threading.Thread(target=self.write_loop, name="prediction-log", daemon=True)
        self.writer.start()
        if "s3" in self.sinks:
            location = s3_location(self.store_url, PREDICTION_LOG_STORE_ENV)
            self.store = S3Store(*location, self.endpoint_url)
            self.uploader = threading.Thread(
                target=self.upload_loop, name="prediction-log-uploader", daemon=True
            )
            self.uploader.start()
        logger.info("prediction log: %s", self)

    def record(self, record: dict, photo: bytes | None = None) -> None:
        """Log ``record`` (and ``photo``, its photo_sha256's bytes, if photos are kept), or
        drop it counted if the buffer is full. Returns at once; never raises."""
        try:
            if not self.sinks:
                return
            if self.stopped:
                self.count_dropped("stopped")
                return
            if not self.keep_photos:
                photo = None
            with self.buffer_lock:
                size = self.bounds.record_bytes + (len(photo) if photo else 0)
                if photo and self.buffered_bytes + size > self.bounds.buffer_bytes:
                    # The record without its photo rather than neither.
                    photo, size = None, self.bounds.record_bytes
                    self.count_photo("dropped")
                if self.buffered_bytes + size <= self.bounds.buffer_bytes:
                    try:
                        self.buffer.put_nowait((record, photo, size))
                        self.buffered_bytes += size
                        return
                    except queue.Full:
                        pass
            self.count_dropped("buffer_full")
        except Exception:  # logging must not fail an answer
            logger.exception("prediction log: a record was not logged")

    def stop(self, within: float) -> None:
        """Write what the buffer holds, close the file and upload what is closed, for at most
        ``within`` seconds; records still buffered then are counted dropped ("stopped"), files
        not uploaded stay on disk for the next start."""
        if not self.sinks or self.stopped:
            return
        self.stopped = True
        deadline = time.monotonic() + within
        if self.writer is not None:
            try:
                self.buffer.put(STOP, timeout=max(0.0, deadline - time.monotonic()))
            except queue.Full:
                pass
            self.writer.join(max(0.0, deadline - time.monotonic()))
            if self.writer.is_alive():
                self.abandoned = True
                logger.warning("prediction log: records still buffered at stop are dropped")
            else:  # what record() buffered while the writer was stopping
                while True:
                    try:
                        self.buffer.get_nowait()
                    except queue.Empty:
                        break
                    self.count_dropped("stopped")
        if self.uploader is not None:
            self.uploads_stopping.set()
            self.upload_wanted.set()
            self.uploader.join(max(0.0, deadline - time.monotonic()))
            left = len(self.pending_uploads())
            if left:
                logger.warning("prediction log: %d files stay in %s for the store", left, self)

    # --- the writer ---------------------------------------------------------------------------

    def count_dropped(self, reason: str, records: int = 1) -> None:
        from serving.metrics import prediction_log_metrics

        prediction_log_metrics().dropped.labels(reason).inc(records)

    def count_photo(self, outcome: str) -> None:
        from serving.metrics import prediction_log_metrics

        prediction_log_metrics().photos.labels(outcome).inc()

    def write_loop(self) -> None:
        from serving.metrics import prediction_log_metrics

        metrics = prediction_log_metrics()
        while True:
            try:
                item = self.buffer.get(timeout=self.until_rotation())
            except queue.Empty:  # the open file is old enough to close
                self.close_file()
                continue
            if item is STOP:
                self.close_file()
                return
            record, photo, size = item
            with self.buffer_lock:
                self.buffered_bytes -= size
            if self.abandoned:
                self.count_dropped("stopped")
                continue
            if photo is not None:
                self.count_photo("kept" if self.keep_photo(record, photo) else "dropped")
            if self.write_record(record):
                metrics.records.labels("written").inc()
            if self.handle is not None and (
                self.file_size >= self.bounds.file_bytes or self.until_rotation() == 0
            ):
                self.close_file()
            elif self.handle is not None and self.buffer.empty():
                self.handle.flush()  # readers see every record written, when idle
            metrics.on_disk(self.disk_files, self.disk_bytes)

    def until_rotation(self) -> float | None:
        if self.handle is None:
            return None
        return max(0.0, self.opened_at + self.bounds.file_seconds - time.monotonic())

    def write_record(self, record: dict) -> bool:
        try:
            line = json.dumps(record, allow_nan=False).encode() + b"\n"
        except (TypeError, ValueError) as error:
            logger.error("prediction log: a record is not JSON (%r): dropped", error)
            self.count_dropped("unwritable")
            return False
        try:
            with self.disk_lock:
                if self.disk_bytes + len(line) > self.bounds.max_bytes:
                    self.make_room(len(line))
                if self.handle is None:
                    self.open_file()
                self.handle.write(line)
                self.file_size += len(line)
                self.disk_bytes += len(line)
            return True
        except OSError as error:  # the disk is full, gone read-only...
            logger.error("prediction log: writing a record failed (%r): dropped", error)
            self.count_dropped("unwritable")
            self.close_file()  # the next record tries a new file
            return False

    def keep_photo(self, record: dict, photo: bytes) -> bool:
        """Write the photo as photos/<sha256> once (a photo already kept stays, its time
        renewed so that it is evicted last); False if it cannot be kept."""
        sha256 = record.get("photo_sha256")
        if not (isinstance(sha256, str) and SHA256.fullmatch(sha256)):
            logger.error("prediction log: a record's photo_sha256 is %r: photo dropped", sha256)
            return False
        if hashlib.sha256(photo).hexdigest() != sha256:
            logger.error("prediction log: the photo given is not %s: dropped", sha256)
            return False
        path = self.photos_dir / sha256
        try:
            with self.disk_lock:
                if path.is_file():
                    os.utime(path)
                    return True
                if self.disk_bytes + len(photo) > self.bounds.max_bytes and not self.make_room(
                    len(photo)
                ):
                    return False
                write_whole(path, photo)
                self.disk_files += 1
                self.disk_bytes += len(photo)
            return True
        except OSError as error:
            logger.error("prediction log: keeping photo %s failed (%r)", sha256, error)
            return False

    def open_file(self) -> None:
        """A new current file (called with disk_lock held)."""
        self.files_opened += 1
        opened = datetime.datetime.now(datetime.UTC)
        name = f"{opened:%Y%m%dT%H%M%S%fZ}-{self.host}-{self.pid}-{self.files_opened}"
        self.open_path = self.records_dir / f"{name}{RECORDS_SUFFIX}{OPEN_SUFFIX}"
        self.handle = open(self.open_path, "ab")
        self.opened_at, self.file_size = time.monotonic(), 0
        self.disk_files += 1

    def close_file(self) -> None:
        """Close the current file under its final name, keep the bounds, wake the uploader."""
        if self.handle is None:
            return
        with self.disk_lock:
            try:
                self.handle.close()
                os.replace(self.open_path, self.open_path.with_suffix(""))
            except OSError as error:
                logger.error("prediction log: closing %s failed (%r)", self.open_path, error)
            self.handle = self.open_path = None
            self.close_stale_files()  # what another host left (see there)
            self.make_room(0)
        self.upload_wanted.set()

    def close_stale_files(self) -> None:
        """Close the files processes left open when they stopped: this host's whose pid no
        longer runs (or is this process's own, from an earlier start), and another host's
        untouched for twice the files' age bound. A writer that runs closes its file within
        that bound, busy or idle; a container recreated on the same volume gets another host
        name, and its predecessor's last file would otherwise stay open, never uploaded."""
        for path in sorted(self.open_files()):
            try:
                host, pid, _ = path.name.split("-", 1)[1].rsplit("-", 2)
                pid = int(pid)
            except ValueError:  # not a name this log gives: not ours to close
                continue
            if host != self.host:
                try:
                    untouched = time.time() - path.stat().st_mtime
                except FileNotFoundError:  # closed by its writer meanwhile
                    continue
                if untouched <= 2 * self.bounds.file_seconds:
                    continue
            elif pid != self.pid and process_alive(pid):
                continue
            try:
                data = path.read_bytes()
                if not whole_lines(data):
                    path.unlink()
                    continue
                if len(whole_lines(data)) != len(data):
                    with open(path, "r+b") as handle:
                        handle.truncate(len(whole_lines(data)))
                os.replace(path, path.with_suffix(""))
            except OSError as error:  # another process closed it first, or the disk fails
                logger.warning("prediction log: closing stale %s failed (%r)", path, error)

    # --- the disk's bounds --------------------------------------------------------------------

    def closed_files(self) -> list[Path]:
        """The closed record files, oldest first."""
        return sorted(
            path
            for path in self.records_dir.glob(f"*{RECORDS_SUFFIX}")
            if not path.name.startswith(".")
        )

    def open_files(self) -> list[Path]:
        """The files being written, by this process and others."""
        return list(self.records_dir.glob(f"[!.]*{RECORDS_SUFFIX}{OPEN_SUFFIX}"))

    def photo_files(self) -> list[Path]:
        return [path for path in self.photos_dir.glob("*") if SHA256.fullmatch(path.name)]

    def uploaded(self, path: Path) -> bool:
        return path.with_name(f".{path.name}{UPLOADED_SUFFIX}").exists()

    def make_room(self, needed: int) -> bool:
        """Delete the oldest closed files (records and photos) until at most max_files record
        files are closed and ``needed`` more bytes fit (called with disk_lock held). Recounts
        the directory; False if ``needed`` does not fit even so."""
        stats = []
        total = 0
        open_files = self.open_files()
        for path in [*open_files, *self.closed_files(), *self.photo_files()]:
            try:
                stat = path.stat()
            except FileNotFoundError:  # another process's, closed or evicted meanwhile
                continue
            total += stat.st_size
            if not path.name.endswith(OPEN_SUFFIX):
                stats.append((stat.st_mtime, path.name.endswith(RECORDS_SUFFIX), path, stat))
        files, closed = len(stats), sum(is_record for _, is_record, _, _ in stats)
        for _, is_record, path, stat in sorted(stats, key=lambda item: item[0]):
            if total + needed <= self.bounds.max_bytes and closed <= self.bounds.max_files:
                break
            if is_record:
                self.evict_records(path)
                closed -= 1
            else:
                path.unlink(missing_ok=True)
                path.with_name(f".{path.name}{UPLOADED_SUFFIX}").unlink(missing_ok=True)
            total -= stat.st_size
            files -= 1
        self.disk_files, self.disk_bytes = files + len(open_files), total
        return total + needed <= self.bounds.max_bytes

    def evict_records(self, path: Path) -> None:
        """Delete a closed record file; its records are dropped unless a store has them."""
        stored = "s3" in self.sinks and self.uploaded(path)
        try:
            records = 0 if stored else path.read_bytes().count(b"\n")
            path.unlink()
        except FileNotFoundError:  # uploaded and removed, or evicted, by another process
            return
        path.with_name(f".{path.name}{UPLOADED_SUFFIX}").unlink(missing_ok=True)
        if records:
            logger.warning("prediction log: %s deleted to keep its bounds", path.name)
            self.count_dropped("evicted", records)

    # --- the uploader (S3 sink) ---------------------------------------------------------------

    def pending_uploads(self) -> list[tuple[str, Path]]:
        """The store keys and paths of the files to upload: photos first (a stored record's
        photo is stored), then the closed record files, oldest first."""
        paths = [*sorted(self.photo_files()), *self.closed_files()]
        if "files" in self.sinks:
            paths = [path for path in paths if not self.uploaded(path)]
        return [
            (photo_key(path.name) if path.parent == self.photos_dir else RECORDS + path.name, path)
            for path in paths
        ]

    def upload_loop(self) -> None:
        while not self.uploads_stopping.is_set():
            self.upload_wanted.clear()
            uploaded = self.upload()
            self.upload_wanted.wait(None if uploaded else self.bounds.retry_seconds)
        self.upload()  # what the writer closed at stop

    def upload(self) -> bool:
        """Put every pending file into the store; False at the first it fails to take."""
        from serving.metrics import prediction_log_metrics

        metrics = prediction_log_metrics()
        for key, path in self.pending_uploads():
            try:
                data = path.read_bytes()
            except FileNotFoundError:  # evicted, or uploaded by another process
                continue
            try:
                self.store.put(key, data)
            except Exception as error:  # the store is down, refuses, times out
                logger.warning("prediction log: uploading %s failed: %r", key, error)
                metrics.upload_failures.inc()
                return False
            metrics.uploaded.inc()
            with self.disk_lock:
                if "files" in self.sinks:
                    if path.exists():
                        path.with_name(f".{path.name}{UPLOADED_SUFFIX}").touch()
                else:
                    path.unlink(missing_ok=True)
                    self.disk_files -= 1
                    self.disk_bytes -= len(data)
        return True


# --- reading a log ------------------------------------------------------------------------------


class LogSource:
    """A prediction log to read: its directory, or the store the S3 sink puts it in."""

    def __init__(self, store: LocalStore | S3Store) -> None:
        self.store = store

    @classmethod
    def open(cls, source: str | Path, environ: Mapping[str, str] = os.environ) -> LogSource:
        """``source``: a log's directory, or s3://bucket/prefix (the endpoint from
        PREDICTION_LOG_S3_ENDPOINT_URL in ``environ``)."""
        if str(source).startswith("s3://"):
            endpoint = environ.get(PREDICTION_LOG_S3_ENDPOINT_ENV) or None
            return cls(S3Store(*s3_location(str(source), "LOG"), endpoint))
        directory = Path(source).expanduser()
        if not (directory / RECORDS).is_dir():
            raise FileNotFoundError(f"no prediction log in {directory} (no {RECORDS} in it)")
        return cls(LocalStore(directory))

    def record_files(self) -> list[str]:
        """The keys of the log's files, in the order they were opened (their names' time)."""
        keys = [
            key
            for key in self.store.keys(RECORDS)
            if key.endswith(RECORDS_SUFFIX) or key.endswith(RECORDS_SUFFIX + OPEN_SUFFIX)
        ]
        return sorted(keys, key=lambda key: key.removesuffix(OPEN_SUFFIX))

    def records(self) -> Iterator[dict]:
        for key in self.record_files():
            try:
                data = self.store.get(key)
            except FileNotFoundError:  # closed (renamed) since listed: read it closed
                key = key.removesuffix(OPEN_SUFFIX)
                data = self.store.get(key)
            # A file being written may end in the middle of a line.
            for number, line in enumerate(whole_lines(data).splitlines(), start=1):
                try:
                    record = json.loads(line)
                except ValueError:
                    raise ValueError(f"{self.store}/{key}, line {number}: not JSON") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{self.store}/{key}, line {number}: not a record")
                yield record

    def photo(self, sha256: str) -> bytes | None:
        """The kept photo of this sha256, or None if the log has none."""
        if not SHA256.fullmatch(sha256 or ""):
            return None
        try:
            return self.store.get(photo_key(sha256))
        except FileNotFoundError:
            return None
        except Exception as error:  # S3: NoSuchKey
            if getattr(error, "response", {}).get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    def __str__(self) -> str:
        return str(self.store)


def read_records(source: str | Path, environ: Mapping[str, str] = os.environ) -> Iterator[dict]:
    """Every record of the log at ``source`` (a directory or s3://bucket/prefix), file by
    file in the order they were opened, each file's in the order written. A line that is not
    a record is a ValueError naming it; a file being written is read up to its last line."""
    return LogSource.open(source, environ).records()
