"""Upload reading and decoding, without a model: a Starlette app on read_form, the same rules
checked on a streamed body (PartWatch, the typed routes' way), and decode_upload."""

from __future__ import annotations

import asyncio
import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from serving.decoding import UploadLimits, decode_upload
from serving.errors import REJECTIONS, Rejection
from serving.settings import ACCEPTED_FORMATS, EXTRA_FORM_FIELDS
from serving.uploads import Pace, Upload, paced, read_form
from tests.support.http import multipart_body

LIMITS = UploadLimits(max_upload_bytes=1_000_000, min_side=8, max_pixels=10_000_000)
UPLOAD = Upload("images", 3, LIMITS)
# Pauses of at most 0.3 s and at least 100 kB/s after that, so the pace tests take a second.
QUICK = Pace(stall_seconds=0.3, min_bytes_per_second=100_000)


def jpeg(colour=(200, 180, 40), size=(64, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG")
    return buffer.getvalue()


def noisy_jpeg() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG")
    return buffer.getvalue()


async def files_endpoint(request: Request) -> JSONResponse:
    try:
        form = await read_form(request, UPLOAD, Pace())
    except Rejection as error:
        return JSONResponse({"reason": error.reason, "error": error.message}, error.status)
    try:
        uploads = form.getlist("images")
        return JSONResponse({"files": [len(await upload.read()) for upload in uploads]})
    finally:
        await form.close()


@pytest.fixture(scope="module")
def client():
    return TestClient(Starlette(routes=[Route("/", files_endpoint, methods=["POST"])]))


def multipart(count: int) -> tuple[bytes, str]:
    return multipart_body("images", [jpeg(size=(64 + i, 48)) for i in range(count)])


def test_a_whole_body_gives_every_file(client):
    body, content_type = multipart(3)
    answer = client.post("/", content=body, headers={"content-type": content_type})
    assert answer.status_code == 200
    assert len(answer.json()["files"]) == 3


@pytest.mark.parametrize("keep", [0.2, 0.5, 0.8, 0.99])
def test_a_body_cut_anywhere_is_refused_not_half_read(client, keep):
    body, content_type = multipart(3)
    cut = body[: int(len(body) * keep)]
    answer = client.post("/", content=cut, headers={"content-type": content_type})
    assert answer.status_code == 400, answer.json()
    assert answer.json()["reason"] == "truncated_multipart"
    assert "truncated" in answer.json()["error"]


def test_too_many_files_and_no_boundary_are_clear_400s(client):
    body, content_type = multipart(4)
    answer = client.post("/", content=body, headers={"content-type": content_type})
    assert answer.status_code == 400
    assert answer.json() == {
        "reason": "too_many_files",
        "error": "too many files: at most 3 per request in the field 'images'",
    }
    answer = client.post("/", content=body, headers={"content-type": "multipart/form-data"})
    assert answer.json() == {
        "reason": "malformed_multipart",
        "error": "the multipart content type names no boundary",
    }


def arriving(pieces: list[tuple[float, bytes]], content_type: str = "") -> Request:
    """A request whose body arrives as ``pieces``: (seconds to wait, bytes)."""
    remaining = list(pieces)

    async def receive() -> dict:
        delay, chunk = remaining.pop(0)
        await asyncio.sleep(delay)
        return {"type": "http.request", "body": chunk, "more_body": bool(remaining)}

    headers = [(b"content-type", content_type.encode())]
    return Request({"type": "http", "method": "POST", "headers": headers}, receive)


def read_paced(pieces: list[tuple[float, bytes]]) -> tuple[bytes | Rejection, float]:
    """What ``paced`` makes of the body (its bytes, or the error), and how long it took."""

    async def read() -> bytes:
        return b"".join([chunk async for chunk in paced(arriving(pieces).stream(), QUICK)])

    started = time.monotonic()
    try:
        outcome = asyncio.run(read())
    except Rejection as error:
        outcome = error
    return outcome, time.monotonic() - started


def test_a_body_in_short_pauses_is_read_whole():
    pieces = [(0.1, bytes([i]) * 30_000) for i in range(6)]  # 300 kB/s, pauses of 0.1 s
    body, _ = read_paced(pieces)
    assert body == b"".join(chunk for _, chunk in pieces)


def test_a_stalled_body_is_cut_off_with_408():
    error, seconds = read_paced([(0, b"x" * 1000), (30, b"never read")])
    assert isinstance(error, Rejection) and error.reason == "slow_upload"
    assert error.status == 408 and error.headers == {"Connection": "close"}
    assert "1000 bytes in" in error.message
    assert seconds < 1  # at the pause limit, not when the rest would have come


def test_a_trickling_body_is_cut_off_once_it_falls_behind_the_minimum_rate():
    # 1 kB every 0.2 s: never a long pause, but 5 kB/s against the 100 kB/s asked for.
    error, seconds = read_paced([(0.2, b"y" * 1000)] * 50)
    assert isinstance(error, Rejection) and error.reason == "slow_upload"
    assert 0.3 <= seconds < 1.5  # after the 0.3 s grace, long before the 10 s it would take


def test_503s_say_when_to_retry():
    error = Rejection("overloaded", "busy")
    assert error.status == 503 and error.headers == {"Retry-After": "1"}
    assert Rejection("missing_file", "x").headers == {}


def test_every_rejection_has_a_4xx_or_503_status():
    """But a feedback the spool's disk cannot take: the service's failure, 500."""
    assert all(
        400 <= status < 500 or status == 503 or reason == "feedback_not_stored"
        for reason, status in REJECTIONS.items()
    )


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty_file"),
        (b"x" * 1_000_001, "file_too_large"),
        (b"<html>not an image</html>", "not_an_image"),
        (jpeg(size=(4, 4)), "image_too_small"),
        (noisy_jpeg()[:1500], "corrupt_image"),  # the header reads, the data ends early
    ],
)
def test_bad_files_are_rejected_with_their_reason(data, reason):
    with pytest.raises(Rejection) as raised:
        decode_upload(data, 32, LIMITS)
    assert raised.value.reason == reason and raised.value.status == REJECTIONS[reason]


def test_a_good_file_becomes_model_input():
    array = decode_upload(jpeg(colour=(10, 200, 30)), 32, LIMITS)
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8
    assert abs(int(array[..., 1].mean()) - 200) < 10  # still green


def test_an_epilogue_after_the_closing_boundary_is_no_truncation(client):
    body, content_type = multipart(2)
    padded = body + b"\r\nan epilogue, which multipart allows and ignores" * 10
    answer = client.post("/", content=padded, headers={"content-type": content_type})
    assert answer.status_code == 200 and len(answer.json()["files"]) == 2


def test_too_many_text_fields_are_a_clear_400(client):
    fields = [(f"note{i}", (None, "x")) for i in range(3 + EXTRA_FORM_FIELDS + 1)]
    body, content_type = requests_multipart(fields)
    answer = client.post("/", content=body, headers={"content-type": content_type})
    assert answer.status_code == 400 and answer.json()["reason"] == "malformed_multipart"
    assert "Too many fields" in answer.json()["error"]


def requests_multipart(fields: list) -> tuple[bytes, str]:
    import requests

    prepared = requests.Request("POST", "http://127.0.0.1/", files=fields).prepare()
    return prepared.body, prepared.headers["Content-Type"]


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header says width x height (a decompression bomb's calling card)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    small = buffer.getvalue()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return small[:8] + ihdr + small[8 + 25 :]


@pytest.mark.parametrize(
    ("side", "words"),
    [
        (4000, "the image is 4000x4000: more than 10000000 pixels"),  # over serve.max_pixels
        (20000, "the image has more than 10000000 pixels"),  # Pillow's own bomb guard
    ],
)
def test_images_claiming_too_many_pixels_are_refused_before_decoding(side, words):
    started = time.monotonic()
    with pytest.raises(Rejection) as raised:
        decode_upload(png_claiming_size(side, side), 32, LIMITS)
    assert raised.value.reason == "too_many_pixels" and raised.value.status == 413
    assert raised.value.message == words
    assert time.monotonic() - started < 0.5  # from the header: nothing was decompressed


def picture(fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ACCEPTED_FORMATS)
def test_every_accepted_format_is_decoded(fmt):
    array = decode_upload(picture(fmt), 32, LIMITS)
    assert array.shape == (32, 32, 3)
    assert abs(int(array[..., 1].mean()) - 200) < 12 and int(array[..., 0].mean()) < 40


def test_a_phones_multi_picture_jpeg_is_a_jpeg():
    second = Image.new("RGB", (40, 30), (200, 10, 30))
    array = decode_upload(picture("MPO", save_all=True, append_images=[second]), 32, LIMITS)
    assert abs(int(array[..., 1].mean()) - 200) < 12  # the first picture


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "PCX"])
def test_a_picture_in_a_format_not_accepted_is_refused_naming_those_that_are(fmt):
    with pytest.raises(Rejection) as raised:
        decode_upload(picture(fmt), 32, LIMITS)
    assert raised.value.reason == "not_an_image" and raised.value.status == 415
    assert raised.value.message == "the upload is not a JPEG, PNG, GIF, WEBP, BMP or TIFF image"


def watched_and_read(body: bytes, content_type: str) -> tuple[tuple, tuple]:
    """What each route makes of ``body``: the FastAPI routes' ``Upload.read``, and PartWatch
    fed it in 1 kB pieces as BentoML would receive it; each ("ok", filenames) or (reason,
    message)."""

    async def read() -> tuple:
        async with UPLOAD.read(arriving([(0, body)], content_type), Pace()) as files:
            return "ok", [file.filename for file in files]

    def watch() -> tuple:
        watcher = UPLOAD.watch(Headers({"content-type": content_type}))
        for start in range(0, len(body), 1000):
            watcher.feed(body[start : start + 1000])
        watcher.finish()
        return "ok", watcher.filenames

    outcomes = []
    for outcome in (lambda: asyncio.run(read()), watch):
        try:
            outcomes.append(outcome())
        except Rejection as rejection:
            outcomes.append((rejection.reason, rejection.message))
    return outcomes[0], outcomes[1]


PHOTO = jpeg()
BODIES = {
    "three files": [("images", (f"{i}.jpg", PHOTO)) for i in range(3)],
    "four files": [("images", (f"{i}.jpg", PHOTO)) for i in range(4)],
    "a file in another field too": [("other", ("x.jpg", PHOTO))]
    + [("images", (f"{i}.jpg", PHOTO)) for i in range(3)],
    "a text field beside the files": [("note", (None, "hi")), ("images", ("a.jpg", PHOTO))],
    "text in the field": [("images", ("a.jpg", PHOTO)), ("images", (None, "http://x/y.jpg"))],
    "the wrong field": [("photo", ("a.jpg", PHOTO)), ("photo", ("b.jpg", PHOTO))],
}


@pytest.mark.parametrize("kind", BODIES)
@pytest.mark.parametrize("keep", [1.0, 0.3, 0.9])
def test_a_streamed_body_breaks_the_same_rules_as_a_read_one(kind, keep):
    """The typed routes (PartWatch on the stream) and the FastAPI routes (read_form, then
    the field's files) refuse the same bodies with the same reason and message."""
    body, content_type = requests_multipart(BODIES[kind])
    cut = body[: int(len(body) * keep)]
    read, watched = watched_and_read(cut, content_type)
    assert read == watched
    if keep == 1.0 and kind in ("three files", "a text field beside the files"):
        assert read[0] == "ok"
    elif keep < 1.0 and read[0] != "too_many_files":
        assert read[0] in ("truncated_multipart", "not_a_file"), read


def test_an_epilogue_is_no_truncation_for_the_streamed_body_either():
    body, content_type = multipart(2)
    read, watched = watched_and_read(body + b"\r\nan epilogue" * 10, content_type)
    assert read == watched == ("ok", ["0.jpg", "1.jpg"])
