"""hey, the load benchmark's load generator where it is installed, run for real against a
loopback server that checks each upload as a multipart form parser reads it: the body and its
Content-Type are what /predict expects, and what hey's summary says is what the server did."""

from __future__ import annotations

import http.server
from email.parser import BytesParser
from email.policy import HTTP

from tests.support.http import free_port, serve_http
from tests.support.load import hey_photo
from tests.support.needs import require_tools

PHOTO = bytes(range(256)) * 40 + b"\r\n--not-a-boundary\r\n"  # binary, with CRLFs inside


class PhotoForm(http.server.BaseHTTPRequestHandler):
    """200 for a form holding exactly one file, field ``image``, of ``expected`` bytes; 400
    otherwise. Each status answered is appended to ``answered``."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the service

    def __init__(self, *args, expected: bytes, answered: list[int], **kwargs) -> None:
        self.expected, self.answered = expected, answered
        super().__init__(*args, **kwargs)

    def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
        body = self.rfile.read(int(self.headers["Content-Length"]))
        head = f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode()
        form = BytesParser(policy=HTTP).parsebytes(head + body)
        parts = [
            (part.get_param("name", header="content-disposition"), part.get_payload(decode=True))
            for part in (form.iter_parts() if form.is_multipart() else [])
        ]
        status = 200 if parts == [("image", self.expected)] else 400
        self.answered.append(status)
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format, *args):  # noqa: A002 - keep test output readable
        pass


def test_hey_sends_the_photo_as_a_form_and_its_summary_is_read_right() -> None:
    require_tools("hey")
    answered: list[int] = []
    with serve_http(PhotoForm, expected=PHOTO, answered=answered) as url:
        run = hey_photo(f"{url}/predict", PHOTO, concurrency=4, seconds=1)
    assert set(answered) == {200}
    assert run.statuses == {200: len(answered)} and run.errors == {} and run.failures == 0
    assert len(answered) / 1.5 < run.throughput < len(answered) / 0.9  # about 1 s of it
    assert 0 < run.percentiles_ms[50] <= run.percentiles_ms[99] < 1000
    assert run.client_cpu_seconds > 0


def test_hey_failures_are_counted_answered_or_not() -> None:
    require_tools("hey")
    answered: list[int] = []
    with serve_http(PhotoForm, expected=PHOTO + b"x", answered=answered) as url:
        rejected = hey_photo(f"{url}/predict", PHOTO, concurrency=2, seconds=0.5)
    assert set(answered) == {400}
    assert rejected.statuses == {400: len(answered)} and rejected.failures == len(answered)
    assert rejected.throughput == 0
    refused = hey_photo(f"http://127.0.0.1:{free_port()}/predict", PHOTO, 2, seconds=0.3)
    assert refused.statuses == {} and refused.failures == refused.requests > 0
    assert all("refused" in message for message in refused.errors)
