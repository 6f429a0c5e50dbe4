"""Download stage: fetch every photo of the catalogue, keep only the ones that decode, as tar
shards (pipeline/shards.py).

The catalogue (``label,filename,sha256``) says *what* the dataset is; ``download.base_url``
only says *where* to fetch it from, so a mirror serving the same bytes is interchangeable
with the original (the sha256 column catches one that does not).
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import requests
from PIL import Image

from pipeline.catalogue import BASE_URL_VARIABLE, CatalogueEntry, data_url, read_catalogue
from pipeline.hashing import sha256_of
from pipeline.logs import Progress
from pipeline.params import DownloadParams
from pipeline.shards import shard_files, write_shards
from pipeline.stage import StageError, arguments, summarised

T = TypeVar("T")
R = TypeVar("R")

# Photos fetched ahead of the one the shard writer waits for, per worker: wide enough that one
# slow answer (a loaded server's stall) does not idle every worker while the writer waits for
# it, as a window of a few per worker did (docs/benchmarks.md, *Scaling*). The photos waiting
# are held in memory, so the window is bounded, not the whole catalogue.
AHEAD_PER_WORKER = 64

OFFLINE_HINT = (
    f"without internet, serve a copy of the dataset and point {BASE_URL_VARIABLE} at it: "
    f"{BASE_URL_VARIABLE}=http://127.0.0.1:8000/data dvc repro "
    "(README: Running offline or from a local mirror)"
)


class DownloadError(StageError):
    """A file that could not be fetched or is not a usable image."""


class ServerUnreachable(DownloadError):
    """Every attempt failed to connect at all (bad host name, refused, no network)."""


def validate_image(content: bytes) -> None:
    """Raise DownloadError unless ``content`` is a complete, decodable image."""
    if not content:
        raise DownloadError("empty response")
    try:
        with Image.open(io.BytesIO(content)) as image:
            image.load()  # full decode: catches truncated files that open() accepts
    except Exception as exc:  # Pillow raises several types for bad data
        raise DownloadError(f"not a decodable image ({exc.__class__.__name__}: {exc})") from exc


_thread_state = threading.local()


def _session() -> requests.Session:
    # requests.Session is not documented as thread-safe: one per worker thread.
    if not hasattr(_thread_state, "session"):
        _thread_state.session = requests.Session()
    return _thread_state.session


def fetch(url: str, settings: DownloadParams) -> bytes:
    """GET ``url`` with bounded retries and exponential backoff.

    Retries connection errors, timeouts (including a body that stalls mid-transfer, which
    urllib3's own Retry cannot see because requests reads the body after it) and 5xx.
    Other HTTP errors are final.
    """
    last_error, connected = "", False
    for attempt in range(settings.retries + 1):
        if attempt:
            time.sleep(settings.backoff_seconds * 2 ** (attempt - 1))
        try:
            response = _session().get(url, timeout=settings.timeout_seconds)
            content = response.content
        except requests.Timeout:
            last_error, connected = f"timed out after {settings.timeout_seconds:g}s", True
            continue
        except requests.ConnectionError as exc:
            last_error = f"connection error: {_root_cause(exc)}"
            continue
        connected = True
        if response.status_code >= 500:
            last_error = f"HTTP {response.status_code}"
            continue
        if response.status_code != 200:
            raise DownloadError(f"HTTP {response.status_code}")
        return content
    error = ServerUnreachable if not connected else DownloadError
    raise error(f"{last_error} (gave up after {settings.retries + 1} attempts)")


def _root_cause(exc: requests.ConnectionError) -> str:
    """The readable end of urllib3's wrapped errors, e.g. "[Errno 111] Connection refused"."""
    cause = exc.args[0] if exc.args else exc
    cause = getattr(cause, "reason", cause)  # MaxRetryError wraps the real failure
    return str(cause).split("): ", 1)[-1]  # drop the "HTTPConnection(host=..., port=...)" prefix


def download_one(entry: CatalogueEntry, settings: DownloadParams) -> bytes:
    """The photo's bytes, fetched, checked to decode and to match the catalogue's sha256."""
    content = fetch(f"{settings.base_url.rstrip('/')}/{entry.relative_path}", settings)
    validate_image(content)
    if entry.sha256 and sha256_of(content) != entry.sha256:
        raise DownloadError("sha256 differs from the catalogue")
    return content


def in_order(
    pool: ThreadPoolExecutor, function: Callable[[T], R], items: Iterable[T], ahead: int
) -> Iterator[R]:
    """``function`` of each item, run in ``pool``, yielded in the items' order, with at most
    ``ahead`` submitted before their turn: one slow request cannot make the photos fetched
    after it pile up in memory (``pool.map`` submits them all at once)."""
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(pool.submit(function, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def download_dataset(
    entries: list[CatalogueEntry],
    settings: DownloadParams,
    out_dir: Path,
    progress: Progress | None = None,
) -> dict:
    """Download ``entries`` into tar shards in ``out_dir`` (pipeline/shards.py), in catalogue
    order, ``settings.shard_photos`` to a shard; return the report.

    Only validated images are ever written, so a reject leaves nothing behind. ``progress``
    counts the files as they finish.
    """

    def attempt(entry: CatalogueEntry) -> tuple[bytes, None] | tuple[None, str]:
        try:
            return download_one(entry, settings), None
        except DownloadError as exc:
            return None, str(exc)

    if not entries:
        raise DownloadError("the catalogue lists no images")
    # Probe with the first file alone: if the server cannot be reached at all, stop now
    # instead of retrying every file (minutes when offline).
    try:
        first = download_one(entries[0], settings), None
    except ServerUnreachable as exc:
        raise ServerUnreachable(f"cannot reach {settings.base_url}: {exc}") from exc
    except DownloadError as exc:
        first = None, str(exc)
    reasons: list[str | None] = []

    def photos(results: Iterable[tuple[bytes, None] | tuple[None, str]]):
        failed = 0
        for entry, (content, reason) in zip(entries, results, strict=True):
            reasons.append(reason)
            failed += reason is not None
            if progress is not None and len(reasons) > 1:
                progress.update(len(reasons), f"{failed} failed")
            if content is not None:
                yield entry.relative_path, content

    with ThreadPoolExecutor(max_workers=settings.workers) as pool:
        rest = in_order(pool, attempt, entries[1:], ahead=AHEAD_PER_WORKER * settings.workers)
        write_shards(photos(itertools.chain([first], rest)), out_dir, settings.shard_photos)

    classes: dict[str, dict] = defaultdict(lambda: {"ok": 0, "failed": []})
    for entry, reason in zip(entries, reasons, strict=True):
        if reason is None:
            classes[entry.label]["ok"] += 1
        else:
            classes[entry.label]["failed"].append({"file": entry.filename, "reason": reason})
    # Where the files came from stays out of the report: any mirror gives the same bytes,
    # and the report is a tracked output (dvc.lock must not depend on the mirror).
    return {"classes": dict(sorted(classes.items()))}


def check_enough_images(report: dict, min_per_class: int) -> None:
    short = {
        label: result["ok"]
        for label, result in report["classes"].items()
        if result["ok"] < min_per_class
    }
    if short:
        counts = ", ".join(f"{label}: {ok}" for label, ok in short.items())
        raise DownloadError(
            f"too few usable images ({counts}; download.min_per_class={min_per_class})"
        )


@summarised("download")
def main(argv: list[str] | None = None) -> str:
    args = arguments(argv, __doc__, "catalogue", "out_dir", "report")
    params = DownloadParams.load()
    settings = dataclasses.replace(params, base_url=data_url(params))
    print(f"download: from {settings.base_url}")
    try:
        entries = read_catalogue(args.catalogue)
        progress = Progress("download", len(entries), "files")
        report = download_dataset(entries, settings, args.out_dir, progress)
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=2) + "\n")
        for label, result in report["classes"].items():
            print(f"download: {label}: {result['ok']} ok, {len(result['failed'])} failed")
        check_enough_images(report, settings.min_per_class)
    except ServerUnreachable as exc:
        raise ServerUnreachable(f"{exc}; {OFFLINE_HINT}") from None
    except DownloadError as exc:
        see = f"; see {args.report}" if args.report.exists() else ""
        raise DownloadError(f"{exc}{see}") from None
    ok = sum(result["ok"] for result in report["classes"].values())
    shards = len(shard_files(args.out_dir))
    return f"{ok:,} of {len(entries):,} images -> {args.out_dir} ({shards:,} tar shard(s))"


if __name__ == "__main__":
    main()
