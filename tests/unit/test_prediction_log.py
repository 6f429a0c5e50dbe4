"""The prediction log (serving/prediction_log.py): its configuration, files, bounds, drops
and S3 sink, on real directories and moto's S3 server on loopback."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from serving.prediction_log import Bounds, LogSource, PredictionLog, read_records
from tests.support.images import make_image
from tests.support.s3 import StoreSwitch, fresh_moto_account, moto_s3_server


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(f"classifier_prediction_log_{name}", labels) or 0.0


class Counts:
    """The log's counters now, and how much each moved since (they are per process)."""

    NAMES = {
        "written": ("records_total", {"outcome": "written"}),
        "buffer_full": ("dropped_total", {"reason": "buffer_full"}),
        "unwritable": ("dropped_total", {"reason": "unwritable"}),
        "evicted": ("dropped_total", {"reason": "evicted"}),
        "stopped": ("dropped_total", {"reason": "stopped"}),
        "photos_kept": ("photos_total", {"outcome": "kept"}),
        "photos_dropped": ("photos_total", {"outcome": "dropped"}),
        "uploaded": ("uploaded_files_total", {}),
        "upload_failures": ("upload_failures_total", {}),
    }

    def __init__(self) -> None:
        self.before = self.now()

    def now(self) -> dict[str, float]:
        return {key: metric(name, **labels) for key, (name, labels) in self.NAMES.items()}

    def moved(self) -> dict[str, float]:
        now = self.now()
        return {key: now[key] - self.before[key] for key in now if now[key] != self.before[key]}


def answer(number: int, photo: bytes = b"") -> dict:
    """A record as the service writes one (docs/serving.md, *Prediction log*)."""
    return {
        "time": f"2026-12-06T11:52:{number % 60:02d}.000000+00:00",
        "answer_id": f"answer-{number}",
        "photo_sha256": hashlib.sha256(photo or str(number).encode()).hexdigest(),
        "model_version": "0123456789abcdef",
        "role": "champion",
        "shadow": False,
        "label": "dandelion",
        "score": 0.75 + number / 1e6,
        "novelty": 0.5,
        "neither": False,
        "confidence": 0.75,
        "latency_seconds": 0.01,
        "endpoint": "predict",
    }


def files(directory: Path, pattern: str = "records/[!.]*") -> list[str]:
    return sorted(path.name for path in directory.glob(pattern))


# --- configuration ----------------------------------------------------------------------------


def test_defaults_are_files_in_the_home_directory_without_photos(tmp_path):
    log = PredictionLog.from_environ({"HOME": str(tmp_path)})
    assert log.sinks == ("files",)
    assert not log.keep_photos
    assert log.directory == Path("~/dandelion-predictions").expanduser()
    both = PredictionLog.from_environ(
        {
            "PREDICTION_LOG": "files, s3",
            "PREDICTION_LOG_STORE": "s3://bucket/some/prefix/",
            "PREDICTION_LOG_DIR": str(tmp_path / "log"),
            "PREDICTION_LOG_KEEP_PHOTOS": "1",
        }
    )
    assert both.sinks == ("files", "s3") and both.keep_photos
    assert not (tmp_path / "log").exists()  # from_environ reads configuration only


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"PREDICTION_LOG": "file"}, "PREDICTION_LOG='file': expected 'off' or sinks"),
        ({"PREDICTION_LOG": "files,files"}, "expected 'off' or sinks"),
        ({"PREDICTION_LOG": "files,off"}, "expected 'off' or sinks"),
        ({"PREDICTION_LOG": "s3"}, "PREDICTION_LOG=s3 needs PREDICTION_LOG_STORE"),
        (
            {"PREDICTION_LOG": "files,s3", "PREDICTION_LOG_STORE": "/var/log"},
            "PREDICTION_LOG_STORE='/var/log' is not s3://bucket/prefix",
        ),
        ({"PREDICTION_LOG": "s3", "PREDICTION_LOG_STORE": "s3:///x"}, "names no bucket"),
        ({"PREDICTION_LOG_KEEP_PHOTOS": "yes"}, "PREDICTION_LOG_KEEP_PHOTOS='yes': expected"),
    ],
)
def test_bad_configuration_is_refused_at_start_up(environ, message):
    with pytest.raises(ValueError, match=message):
        PredictionLog.from_environ(environ)


def test_off_logs_nothing(tmp_path):
    log = PredictionLog.from_environ({"PREDICTION_LOG": "off", "PREDICTION_LOG_DIR": str(tmp_path)})
    log.start()
    counts = Counts()
    log.record(answer(1), b"photo")
    log.stop(1)
    assert list(tmp_path.iterdir()) == [] and counts.moved() == {}


# --- files ------------------------------------------------------------------------------------


def test_records_are_written_in_order_and_files_rotate_at_their_size(tmp_path):
    bounds = Bounds(file_bytes=4000)
    log = PredictionLog(("files",), tmp_path, bounds=bounds)
    log.start()
    counts = Counts()
    records = [answer(number) for number in range(100)]
    for record in records:
        log.record(record)
    log.stop(10)

    assert list(read_records(tmp_path)) == records
    closed = files(tmp_path)
    assert len(closed) == 100 * len(json.dumps(records[0]) + "\n") // 4000 + 1
    assert all(name.endswith(".jsonl") for name in closed)  # stop closed the last one
    # Each file is closed once past the bound: by one line at most.
    assert all((tmp_path / "records" / name).stat().st_size < 4000 + 500 for name in closed)
    assert counts.moved() == {"written": 100}


def test_a_quiet_file_is_closed_at_its_age(tmp_path):
    log = PredictionLog(("files",), tmp_path, bounds=Bounds(file_seconds=0.3))
    log.start()
    log.record(answer(1))
    time.sleep(0.1)
    assert [name.endswith(".jsonl.open") for name in files(tmp_path)] == [True]
    assert list(read_records(tmp_path)) == [answer(1)]  # readable while open
    time.sleep(0.6)
    assert [name.endswith(".jsonl") for name in files(tmp_path)] == [True]
    log.stop(1)


def test_the_directory_stays_within_its_bounds_and_evicted_records_are_counted(tmp_path):
    bounds = Bounds(file_bytes=2000, max_bytes=10_000, max_files=100)
    log = PredictionLog(("files",), tmp_path, bounds=bounds)
    log.start()
    counts = Counts()
    for number in range(300):
        log.record(answer(number))
    log.stop(10)

    on_disk = sum(path.stat().st_size for path in (tmp_path / "records").iterdir())
    assert on_disk <= 10_000
    kept = list(read_records(tmp_path))
    assert kept == [answer(number) for number in range(300 - len(kept), 300)]  # the newest
    assert counts.moved() == {"written": 300, "evicted": 300 - len(kept)}
    assert metric("disk_bytes") == on_disk

    log = PredictionLog(("files",), tmp_path, bounds=Bounds(file_bytes=2000, max_files=2))
    log.start()  # a smaller bound at the next start: kept from the start on
    log.stop(1)
    assert len(files(tmp_path)) == 2


def test_a_full_buffer_drops_records_at_once_and_counts_them(tmp_path):
    """With the writer held (the directory's lock taken, as a stalled disk would hold it),
    record() still returns at once: past the buffer's bound records are dropped, counted."""
    log = PredictionLog(("files",), tmp_path, bounds=Bounds(buffer_records=50))
    log.start()
    counts = Counts()
    slowest = 0.0
    with log.disk_lock:
        for number in range(500):
            started = time.perf_counter()
            log.record(answer(number))
            slowest = max(slowest, time.perf_counter() - started)
        dropped = counts.moved()["buffer_full"]
    # Waiting for the held writer would take until the lock is released; 0.5 s leaves room
    # for a loaded machine's scheduling (0.05 s failed at load 8) and still catches a wait.
    assert slowest < 0.5
    # The buffer's 50, and the record the writer took before it blocked.
    assert dropped in (449, 450)
    log.stop(10)
    written = list(read_records(tmp_path))
    assert written == [answer(number) for number in range(len(written))]
    assert counts.moved() == {"written": 500 - dropped, "buffer_full": dropped}


def test_the_buffer_is_bounded_in_bytes_too_and_keeps_records_before_photos(tmp_path):
    """Past the byte bound a record is buffered without its photo (a record is small)."""
    log = PredictionLog(("files",), tmp_path, keep_photos=True, bounds=Bounds(buffer_bytes=300_000))
    log.start()
    counts = Counts()
    photos = [make_image(size=(200, 200), seed=seed, fmt="PNG") for seed in range(10)]
    assert all(100_000 < len(photo) < 150_000 for photo in photos)
    with log.disk_lock:
        for number, photo in enumerate(photos):
            log.record(answer(number, photo), photo)
    log.stop(10)
    moved = counts.moved()
    # Two photos in the buffer, and the one the writer took before it blocked.
    assert moved["photos_kept"] in (2, 3)
    assert moved == {
        "written": 10,
        "photos_kept": moved["photos_kept"],
        "photos_dropped": 10 - moved["photos_kept"],
    }
    assert len(files(tmp_path, "photos/*")) == moved["photos_kept"]


def test_photos_are_kept_once_by_sha256_only_when_asked(tmp_path):
    photo, other = make_image(seed=1), make_image(seed=2)
    log = PredictionLog(("files",), tmp_path / "kept", keep_photos=True)
    log.start()
    counts = Counts()
    log.record(answer(1, photo), photo)
    log.record({**answer(2, photo), "role": "challenger", "shadow": True}, photo)
    log.record(answer(3, other), photo)  # not this record's photo
    log.stop(5)
    sha256 = hashlib.sha256(photo).hexdigest()
    assert files(tmp_path / "kept", "photos/*") == [sha256]
    assert (tmp_path / "kept" / "photos" / sha256).read_bytes() == photo
    assert LogSource.open(tmp_path / "kept").photo(sha256) == photo
    assert counts.moved() == {"written": 3, "photos_kept": 2, "photos_dropped": 1}

    log = PredictionLog(("files",), tmp_path / "private")  # the default
    log.start()
    log.record(answer(1, photo), photo)
    log.stop(5)
    assert files(tmp_path / "private", "photos/*") == []
    assert LogSource.open(tmp_path / "private").photo(sha256) is None


def test_records_that_cannot_be_written_or_come_after_stop_are_counted(tmp_path):
    log = PredictionLog(("files",), tmp_path)
    log.start()
    counts = Counts()
    log.record({"score": float("nan")})
    log.record({"photo": b"bytes"})
    log.record(answer(1))
    log.stop(5)
    log.record(answer(2))
    assert list(read_records(tmp_path)) == [answer(1)]
    assert counts.moved() == {"written": 1, "unwritable": 2, "stopped": 1}


def test_a_file_left_open_by_a_stopped_process_is_closed_whole_at_the_next_start(tmp_path):
    first = PredictionLog(("files",), tmp_path)
    first.start()
    first.record(answer(1))
    first.record(answer(2))
    time.sleep(0.2)
    (left,) = (tmp_path / "records").glob("*.open")
    # As if the process had been killed in the middle of a line, and its pid were gone.
    name = left.name.replace(f"-{os.getpid()}-", "-999999999-")
    left.rename(left.with_name(name))
    with open(left.with_name(name), "ab") as handle:
        handle.write(b'{"answer_id": "cut')
    second = PredictionLog(("files",), tmp_path)
    second.start()
    second.stop(1)
    assert files(tmp_path) == [name.removesuffix(".open")]
    assert list(read_records(tmp_path)) == [answer(1), answer(2)]


def test_reading_a_damaged_log_names_the_line(tmp_path):
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "a.jsonl").write_text('{"answer_id": "1"}\nnot json\n')
    with pytest.raises(ValueError, match=r"a.jsonl, line 2: not JSON"):
        list(read_records(tmp_path))
    with pytest.raises(FileNotFoundError, match="no prediction log in"):
        list(read_records(tmp_path / "nowhere"))


# --- the S3 sink ------------------------------------------------------------------------------


@pytest.fixture
def store(monkeypatch):
    """A bucket on moto's server behind a switch (on), and the credentials in the
    environment, as a deployment gives them."""
    with moto_s3_server() as url:
        endpoint = fresh_moto_account(url, "prediction-logs")
        switch = StoreSwitch(url)
        switch.on()
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", endpoint.access_key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", endpoint.secret_access_key)
        monkeypatch.setenv("PREDICTION_LOG_S3_ENDPOINT_URL", switch.url)
        try:
            yield switch, endpoint
        finally:
            switch.off()


def s3_log(tmp_path, switch, sinks: str, **bounds) -> PredictionLog:
    return PredictionLog(
        tuple(sinks.split(",")),
        tmp_path,
        "s3://prediction-logs/service/a",
        switch.url,
        keep_photos=True,
        bounds=Bounds(**bounds),
    )


def test_the_s3_sink_uploads_closed_files_and_photos_and_keeps_nothing_local(tmp_path, store):
    switch, endpoint = store
    log = s3_log(tmp_path, switch, "s3", file_bytes=3000)
    log.start()
    counts = Counts()
    photos = [make_image(seed=seed) for seed in range(3)]
    records = [answer(number, photos[number % 3]) for number in range(30)]
    for number, record in enumerate(records):
        log.record(record, photos[number % 3])
    log.stop(20)

    objects = endpoint.objects()
    names = sorted(key.removeprefix("service/a/records/") for key in objects if "/records/" in key)
    assert len(names) == counts.moved()["uploaded"] - 3 > 1
    for photo in photos:
        assert objects[f"service/a/photos/{hashlib.sha256(photo).hexdigest()}"] == photo
    assert list(read_records("s3://prediction-logs/service/a")) == records
    assert LogSource.open("s3://prediction-logs/service/a").photo("0" * 64) is None
    assert files(tmp_path) == files(tmp_path, "photos/*") == []  # each left once uploaded
    assert "upload_failures" not in counts.moved()


@pytest.mark.parametrize("sinks", ["s3", "files,s3"])
def test_while_the_store_is_down_files_wait_on_disk_and_go_up_once_it_is_back(
    tmp_path, store, sinks
):
    switch, endpoint = store
    log = s3_log(tmp_path, switch, sinks, file_bytes=3000, retry_seconds=0.3)
    log.start()
    counts = Counts()
    for number in range(10):
        log.record(answer(number))
    switch.off()  # mid-run: the store stops
    for number in range(10, 40):
        log.record(answer(number))
    deadline = time.monotonic() + 10
    while counts.moved().get("upload_failures", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert counts.moved()["upload_failures"] >= 2  # tried again, and counted each time
    waiting = [name for name in files(tmp_path) if name.endswith(".jsonl")]
    if sinks == "files,s3":
        waiting = [
            name for name in waiting if not (tmp_path / f"records/.{name}.uploaded").exists()
        ]
    assert len(waiting) >= 2  # closed, and not in the store

    switch.on()  # back, on the same port
    uploaded = counts.moved().get("uploaded", 0)
    deadline = time.monotonic() + 10
    while counts.moved().get("uploaded", 0) < uploaded + len(waiting):
        assert time.monotonic() < deadline, "the files waiting were not uploaded"
        time.sleep(0.1)  # before the stop's pass
    log.stop(20)
    assert list(read_records("s3://prediction-logs/service/a")) == [
        answer(number) for number in range(40)
    ]
    if sinks == "s3":
        assert files(tmp_path) == []
    else:  # kept, and marked stored
        assert list(read_records(tmp_path)) == [answer(number) for number in range(40)]
        assert files(tmp_path, "records/.*.uploaded") == [f".{n}.uploaded" for n in files(tmp_path)]
    assert "evicted" not in counts.moved() and "buffer_full" not in counts.moved()
