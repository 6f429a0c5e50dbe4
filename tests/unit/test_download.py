"""Download stage against a real HTTP server on 127.0.0.1 that misbehaves on purpose."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time

import pytest

from pipeline.catalogue import BASE_URL_VARIABLE, CatalogueEntry, read_catalogue
from pipeline.params import DownloadParams
from pipeline.shards import SHARD_PATTERN, PhotoShards
from stages import download
from stages.download import DownloadError
from tests.support.http import serve_http
from tests.support.images import make_image

GOOD = make_image()
TIMEOUT = 0.5  # seconds; the hanging route sleeps past it


class FaultyHandler(http.server.BaseHTTPRequestHandler):
    """Routes ``/<label>/<filename>``; the filename picks the behaviour."""

    hits: dict[str, int] = {}
    lock = threading.Lock()

    def log_message(self, format, *args):  # noqa: A002
        pass

    def send(self, status: int, body: bytes, content_type: str = "image/jpeg") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802 - http.server's naming
        name = self.path.rsplit("/", 1)[-1]
        with self.lock:
            self.hits[name] = self.hits.get(name, 0) + 1
            hit = self.hits[name]
        if name.startswith("good"):
            self.send(200, GOOD)
        elif name == "flaky.jpg":  # 503 on the first request, then fine
            self.send(503, b"busy", "text/plain") if hit == 1 else self.send(200, GOOD)
        elif name == "down.jpg":  # always 503
            self.send(503, b"busy", "text/plain")
        elif name == "hang.jpg":  # never answers within the client's timeout
            time.sleep(TIMEOUT * 3)
            self.send(200, GOOD)
        elif name == "truncated.jpg":
            self.send(200, GOOD[: len(GOOD) // 2])
        elif name == "page.jpg":
            self.send(200, b"<!doctype html><html><body>Not found</body></html>", "text/html")
        elif name == "empty.jpg":
            self.send(200, b"")
        else:
            self.send(404, b"no such file", "text/plain")


@pytest.fixture
def faulty_server():
    FaultyHandler.hits = {}
    with serve_http(FaultyHandler) as url:
        yield url


def settings(base_url: str, **overrides) -> DownloadParams:
    values = dict(
        base_url=base_url,
        min_per_class=1,
        workers=4,
        timeout_seconds=TIMEOUT,
        retries=2,
        backoff_seconds=0.05,
        shard_photos=5000,
    )
    return DownloadParams(**{**values, **overrides})


def entry(filename: str, label: str = "dandelion", sha256: str = "") -> CatalogueEntry:
    return CatalogueEntry(label, filename, sha256)


def test_good_files_are_saved_and_counted(faulty_server, tmp_path):
    entries = [entry("good1.jpg"), entry("good2.jpg", "grass")]
    report = download.download_dataset(entries, settings(faulty_server), tmp_path)
    assert report["classes"] == {
        "dandelion": {"ok": 1, "failed": []},
        "grass": {"ok": 1, "failed": []},
    }
    assert list(PhotoShards(tmp_path).items()) == [
        ("dandelion/good1.jpg", GOOD),
        ("grass/good2.jpg", GOOD),
    ]


def test_503_then_200_is_retried(faulty_server, tmp_path):
    report = download.download_dataset([entry("flaky.jpg")], settings(faulty_server), tmp_path)
    assert report["classes"]["dandelion"]["ok"] == 1
    assert FaultyHandler.hits["flaky.jpg"] == 2
    assert PhotoShards(tmp_path).read("dandelion/flaky.jpg") == GOOD


@pytest.mark.parametrize(
    ("filename", "reason", "attempts"),
    [
        ("down.jpg", "HTTP 503 (gave up after 3 attempts)", 3),
        ("hang.jpg", "timed out after 0.5s (gave up after 3 attempts)", 3),
        ("truncated.jpg", "not a decodable image", 1),
        ("page.jpg", "not a decodable image", 1),
        ("empty.jpg", "empty response", 1),
        ("missing.jpg", "HTTP 404", 1),
    ],
)
def test_faults_are_reported_and_nothing_is_kept(
    faulty_server, tmp_path, filename, reason, attempts
):
    entries = [entry(filename), entry("good.jpg")]
    report = download.download_dataset(entries, settings(faulty_server), tmp_path)
    result = report["classes"]["dandelion"]
    assert result["ok"] == 1
    assert len(result["failed"]) == 1
    assert result["failed"][0]["file"] == filename
    assert result["failed"][0]["reason"].startswith(reason)
    assert FaultyHandler.hits[filename] == attempts
    # Only the good file is kept: no reject, no partial file.
    assert PhotoShards(tmp_path).names() == ["dandelion/good.jpg"]
    assert [p.name for p in tmp_path.iterdir()] == [SHARD_PATTERN.format(0)]


def test_hash_mismatch_is_rejected(faulty_server, tmp_path):
    pinned = entry("good.jpg", sha256=hashlib.sha256(b"other bytes").hexdigest())
    report = download.download_dataset([pinned], settings(faulty_server), tmp_path)
    assert report["classes"]["dandelion"]["failed"] == [
        {"file": "good.jpg", "reason": "sha256 differs from the catalogue"}
    ]
    assert not list(tmp_path.iterdir())


def test_unreachable_server_fails_fast_with_the_cause(tmp_path):
    with serve_http(FaultyHandler) as url:
        pass  # the server is gone: its port now refuses connections
    entries = [entry(f"good{i}.jpg") for i in range(50)]
    started = time.monotonic()
    with pytest.raises(download.ServerUnreachable, match=rf"cannot reach {url}: .*refused"):
        download.download_dataset(entries, settings(url), tmp_path)
    # Only the probe's 3 attempts (backoff 0.05 + 0.1 s), not 50 files' worth.
    assert time.monotonic() - started < 5
    assert not list(tmp_path.rglob("*"))


def test_too_few_images_is_an_error():
    report = {"classes": {"dandelion": {"ok": 5, "failed": []}, "grass": {"ok": 2, "failed": []}}}
    with pytest.raises(DownloadError, match=r"too few usable images \(grass: 2; .*=3\)"):
        download.check_enough_images(report, min_per_class=3)
    download.check_enough_images(report, min_per_class=2)


def test_catalogue_rejects_unsafe_or_incomplete_rows(tmp_path):
    catalogue = tmp_path / "catalogue.csv"
    catalogue.write_text("label,filename,sha256\ngrass,../../etc/passwd,\n")
    with pytest.raises(ValueError, match="invalid row"):
        read_catalogue(catalogue)
    catalogue.write_text("label,filename\ngrass,a.jpg\n")
    with pytest.raises(ValueError, match="missing column"):
        read_catalogue(catalogue)


def test_main_writes_report_and_fails_in_one_line(faulty_server, tmp_path, monkeypatch):
    (tmp_path / "catalogue.csv").write_text(
        "label,filename,sha256\ndandelion,good.jpg,\ngrass,page.jpg,\n"
    )
    (tmp_path / "params.yaml").write_text(
        json.dumps(
            {
                "download": {
                    "base_url": faulty_server,
                    "min_per_class": 1,
                    "workers": 2,
                    "timeout_seconds": TIMEOUT,
                    "retries": 0,
                    "backoff_seconds": 0,
                    "shard_photos": 5000,
                }
            }
        )
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        download.main(["catalogue.csv", "raw", "report.json"])
    message = str(exit_info.value.code)
    assert message == (
        "download failed: too few usable images (grass: 0; download.min_per_class=1); "
        "see report.json"
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["classes"]["dandelion"]["ok"] == 1
    assert report["classes"]["grass"]["failed"][0]["reason"].startswith("not a decodable image")


def test_a_mirror_comes_from_the_environment_and_offline_failures_name_it(
    faulty_server, tmp_path, monkeypatch
):
    """DOWNLOAD_BASE_URL replaces download.base_url without editing params.yaml; a server
    that cannot be reached fails in one line that names that variable."""
    with serve_http(FaultyHandler) as gone:
        pass  # its port now refuses connections: the "internet" of this test
    (tmp_path / "catalogue.csv").write_text("label,filename,sha256\ndandelion,good.jpg,\n")
    params = {"base_url": gone, "min_per_class": 1, "workers": 1, "timeout_seconds": TIMEOUT}
    params.update(retries=0, backoff_seconds=0, shard_photos=5000)
    (tmp_path / "params.yaml").write_text(json.dumps({"download": params}))
    monkeypatch.chdir(tmp_path)

    with pytest.raises(SystemExit) as exit_info:
        download.main(["catalogue.csv", "raw", "report.json"])
    message = str(exit_info.value.code)
    assert message.startswith(f"download failed: cannot reach {gone}: ")
    assert "DOWNLOAD_BASE_URL=http://127.0.0.1:8000/data dvc repro" in message
    assert "\n" not in message and not (tmp_path / "report.json").exists()

    monkeypatch.setenv(BASE_URL_VARIABLE, faulty_server)
    download.main(["catalogue.csv", "raw", "report.json"])
    assert PhotoShards(tmp_path / "raw").read("dandelion/good.jpg") == GOOD
    assert json.loads((tmp_path / "params.yaml").read_text())["download"] == params


def test_photos_are_sharded_in_catalogue_order_whatever_finishes_first(faulty_server, tmp_path):
    """The slow photo (a 503, then a retry) finishes after those behind it, yet keeps its
    place; a reject leaves no gap: the shards hold the kept photos, shard_photos each."""
    names = ["good3.jpg", "flaky.jpg", "page.jpg", "good1.jpg", "good2.jpg", "good0.jpg"]
    entries = [entry(name, "grass" if i % 2 else "dandelion") for i, name in enumerate(names)]
    download.download_dataset(entries, settings(faulty_server, shard_photos=2), tmp_path)
    kept = [e.relative_path for e in entries if e.filename != "page.jpg"]
    assert PhotoShards(tmp_path).names() == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == [SHARD_PATTERN.format(i) for i in range(3)]


def test_in_order_keeps_the_order_and_runs_only_so_far_ahead():
    started, release = [], threading.Event()

    def slow_first(item: int) -> int:
        started.append(item)
        if item == 0:
            release.wait(5)
        return item * 10

    with download.ThreadPoolExecutor(max_workers=4) as pool:
        results = download.in_order(pool, slow_first, range(20), ahead=3)
        first = threading.Thread(target=lambda: started.append(("first", next(results))))
        first.start()
        time.sleep(0.3)
        assert sorted(item for item in started if isinstance(item, int)) == [0, 1, 2]
        release.set()
        first.join(5)
        assert [v for v in started if isinstance(v, tuple)] == [("first", 0)]
        assert list(results) == [i * 10 for i in range(1, 20)]
