"""BentoML's own clients on the typed endpoints (/api/predict, /api/predict_batch), against the
stub served by uvicorn (tests/support/stub_service.py): the same answers, errors, headers and
metrics as the multipart routes (POST /predict, /predict_batch) for the same requests; and
/api/feedback as POST /feedback."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import time
from pathlib import Path
from urllib.parse import urlsplit

import bentoml
import pytest
import requests

from serving.feedback import FeedbackDesk
from serving.settings import (
    MAX_PREDICTIONS_IN_FLIGHT,
    TYPED_PREDICT_BATCH_ROUTE,
    TYPED_PREDICT_ROUTE,
)
from serving.uploads import Pace
from tests.support import stub_service as stubs
from tests.support.service import without_ids

# BentoML's own server code (its typed endpoints) on pydantic 2.11+.
pytestmark = pytest.mark.filterwarnings("ignore:Accessing the 'model_fields' attribute")
GREEN, GRASSY, RED = (20, 230, 20), (120, 60, 40), (230, 20, 20)
ROUTES = {"/predict": TYPED_PREDICT_ROUTE, "/predict_batch": TYPED_PREDICT_BATCH_ROUTE}


@pytest.fixture(scope="module")
def served() -> str:
    with stubs.stub_served() as url:
        yield url


@pytest.fixture
def front(served):
    with stubs.front_restored() as instance:  # the served one
        yield instance


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("photos")
    made = {
        "green.png": stubs.photo(GREEN),
        "grassy.jpg": stubs.photo(GRASSY, fmt="JPEG"),
        "red.png": stubs.photo(RED),
        "empty.png": b"",
        "notes.jpg": b"<html>not a photo</html>",
        "small.png": stubs.photo(size=(8, 40)),
        "corrupt.jpg": stubs.photo(fmt="JPEG", size=(400, 300))[:700],
        "large.png": b"\x89PNG" + b"\0" * 200_000,
    }
    for name, content in made.items():
        (folder / name).write_bytes(content)
    return {name: folder / name for name in made}


def multipart(url: str, route: str, field: str, paths: list[Path]) -> requests.Response:
    """The same multipart request `curl -F field=@path ...` sends, to ``route``."""
    files = [(field, (path.name, path.read_bytes())) for path in paths]
    return requests.post(f"{url}{route}", files=files, timeout=30)


def client_answer(call) -> tuple[int, dict]:
    """(200, JSON) of a client call, or the status and JSON body of the error it raised."""
    try:
        return 200, call()
    except bentoml.exceptions.BentoMLException as error:
        return error.error_code.value, json.loads(str(error))


def test_the_sync_client_answers_as_the_multipart_routes(served, photos):
    names = ["green.png", "grassy.jpg", "red.png"]
    with bentoml.SyncHTTPClient(served) as client:
        for name in names:
            answer = client.predict(image=photos[name])
            expected = multipart(served, "/predict", "image", [photos[name]]).json()
            assert without_ids(answer) == without_ids(expected)
        batch = client.predict_batch(images=[photos[name] for name in names])
    expected = multipart(served, "/predict_batch", "images", [photos[n] for n in names]).json()
    assert without_ids(batch) == without_ids(expected)
    assert [p["filename"] for p in batch["predictions"]] == names
    assert [p["label"] for p in batch["predictions"]] == ["dandelion", "grass", "grass"]
    assert {p["model_version"] for p in batch["predictions"]} == {stubs.CARD.version}


def test_the_async_client_answers_as_the_multipart_routes(served, photos):
    async def ask() -> tuple:
        async with bentoml.AsyncHTTPClient(served) as client:
            one = await client.predict(image=photos["green.png"])
            both = await client.predict_batch(images=[photos["red.png"], photos["green.png"]])
            return one, both

    one, both = asyncio.run(ask())
    expected = multipart(served, "/predict", "image", [photos["green.png"]]).json()
    assert without_ids(one) == without_ids(expected)
    pair = [photos["red.png"], photos["green.png"]]
    expected = multipart(served, "/predict_batch", "images", pair).json()
    assert without_ids(both) == without_ids(expected)


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("empty.png", 400),
        ("large.png", 413),
        ("notes.jpg", 415),
        ("small.png", 422),
        ("corrupt.jpg", 422),
    ],
)
def test_bad_photos_get_the_multipart_route_s_status_and_error(served, photos, name, status):
    expected = multipart(served, "/predict", "image", [photos[name]])
    assert expected.status_code == status
    with bentoml.SyncHTTPClient(served) as client:
        assert client_answer(lambda: client.predict(image=photos[name])) == (
            status,
            expected.json(),
        )
        in_batch = client_answer(
            lambda: client.predict_batch(images=[photos["green.png"], photos[name]])
        )
    batch = multipart(served, "/predict_batch", "images", [photos["green.png"], photos[name]])
    assert in_batch == (status, batch.json())
    assert batch.json()["error"].startswith(f"file 2 ({name}): ")


def same_answers(served, field: str, paths: list[Path], route: str = "/predict") -> dict:
    """The answer of ``route`` and of its typed twin to the same multipart request: equal
    status, body and the headers that matter; the JSON body."""
    answers = [multipart(served, path, field, paths) for path in (route, ROUTES[route])]
    kept = ("content-type", "retry-after", "connection")
    for answer in answers:
        assert answer.headers["content-type"] == "application/json"
    first, second = ({k: a.headers.get(k) for k in kept} for a in answers)
    assert (answers[0].status_code, answers[0].json(), first) == (
        answers[1].status_code,
        answers[1].json(),
        second,
    )
    return {"status": answers[0].status_code, **answers[0].json(), **first}


def test_too_many_files_text_and_a_wrong_field_are_refused_alike(served, photos):
    two = same_answers(served, "image", [photos["green.png"], photos["red.png"]])
    assert two["status"] == 400 and "at most 1 per request" in two["error"]
    four = same_answers(served, "images", [photos["green.png"]] * 4, route="/predict_batch")
    assert four["status"] == 400 and "at most 3 per request" in four["error"]
    wrong = same_answers(served, "photo", [photos["green.png"]])
    assert wrong["status"] == 422 and "no file in the multipart field 'image'" in wrong["error"]
    # A URL where the file should be: refused as text, never fetched by BentoML.
    for route in ROUTES.items():
        fetched = [
            requests.post(
                f"{served}{path}", files={"image": (None, "http://127.0.0.1:9/x")}, timeout=30
            )
            for path in route
        ]
        assert [a.status_code for a in fetched] == [422, 422]
        assert fetched[0].json() == fetched[1].json()


def test_at_capacity_shutting_down_and_model_unavailable_answer_alike(served, photos, front):
    green = [photos["green.png"]]
    front.admission.in_flight = MAX_PREDICTIONS_IN_FLIGHT
    busy = same_answers(served, "image", green)
    assert busy["status"] == 503 and busy["retry-after"] == "1"
    front.admission.in_flight = 0

    front.admission.draining = True
    closing = same_answers(served, "images", green, route="/predict_batch")
    assert closing["status"] == 503 and closing["retry-after"] == "1"
    assert closing["error"] == "the service is shutting down: retry shortly"
    front.admission.draining = False

    def unavailable(images):
        from serving.errors import Rejection

        raise Rejection("model_unavailable", "the model is unavailable, retry shortly (test)")

    front.model = type(stubs.STUB_MODEL)(stubs.STUB_MODEL.tag, stubs.CARD, unavailable)
    gone = same_answers(served, "image", green)
    assert gone["status"] == 503 and gone["retry-after"] == "1"


def rejected(reason: str, status: int) -> float:
    """classifier_rejected_uploads_total{reason, status} in this process (the served stub's)."""
    from prometheus_client import REGISTRY

    labels = {"reason": reason, "status": str(status)}
    return REGISTRY.get_sample_value("classifier_rejected_uploads_total", labels) or 0.0


def test_both_routes_count_their_rejections_alike(served, photos):
    counted = [("not_an_image", 415), ("too_many_files", 400)]
    before = [rejected(*key) for key in counted]
    for route in ("/predict", TYPED_PREDICT_ROUTE):  # each counted once, on either route
        multipart(served, route, "image", [photos["notes.jpg"]])
        multipart(served, route, "image", [photos["green.png"]] * 2)
    assert [rejected(*key) - count for key, count in zip(counted, before, strict=True)] == [2, 2]


def test_an_oversized_declared_body_is_refused_before_it_is_sent(served):
    """Only the headers go out; the 413 comes back at once, no body read."""
    parts = urlsplit(served)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as connection:
        connection.sendall(
            f"POST {TYPED_PREDICT_ROUTE} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {10**9}\r\n\r\n".encode()
        )
        started, answer = time.monotonic(), b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            answer += connection.recv(65536)
    assert time.monotonic() - started < 5
    status_line, _, _ = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 413 Request Entity Too Large", answer
    assert (
        answer.split(b"\r\n\r\n", 1)[1]
        == json.dumps(
            {"error": "the request exceeds the upload limit (200000 bytes per image)"},
            separators=(",", ":"),
        ).encode()
    )


@pytest.fixture
def feedback_store(front, tmp_path):
    """The served front's feedback kept under ``tmp_path`` (not the default, in the home): a
    desk of its own, stopped on leaving; the store's directory."""
    desk = FeedbackDesk(
        front.model.card, front.single, front.scores, environ={"FEEDBACK_DIR": str(tmp_path)}
    )
    front.feedback = desk
    desk.start()
    yield tmp_path / "store"
    desk.stop(0)


def test_the_client_gives_feedback_as_the_multipart_route_does(served, photos, feedback_store):
    green = photos["green.png"]
    sha256 = hashlib.sha256(green.read_bytes()).hexdigest()
    with bentoml.SyncHTTPClient(served) as client:
        answer = client.predict(image=green)
        receipt = client.send_feedback(
            image=green,
            label="grass",
            answer_id=answer["answer_id"],
            model_version=answer["model_version"],
        )
        refusals = {
            "rose": client_answer(lambda: client.send_feedback(image=green, label="rose")),
            None: client_answer(lambda: client.send_feedback(image=green)),
        }
    assert receipt == {"photo_sha256": sha256, "label": "grass", "answer_id": answer["answer_id"]}
    for label, (status, body) in refusals.items():
        data = {"label": label} if label else {}
        expected = requests.post(
            f"{served}/feedback", files={"image": (green.name, green.read_bytes())}, data=data
        )
        assert (status, body) == (expected.status_code, expected.json()) and status == 422
    record = feedback_store / "records" / sha256 / "grass.json"
    deadline = time.monotonic() + 20
    while not record.exists():
        assert time.monotonic() < deadline, "not stored"
        time.sleep(0.05)
    stored = json.loads(record.read_text())
    assert stored["answer_id"] == answer["answer_id"] and stored["filename"] == "green.png"
    assert stored["model_version"] == stubs.CARD.version
    # The served model's answer for the photo, as the client got it from predict.
    assert not answer["neither"]
    assert (stored["served_label"], stored["served_confidence"]) == (
        answer["label"],
        answer["confidence"],
    )


# Last: a new stub front (stub_client) leaves no current instance for the served one's tests.
@pytest.mark.parametrize("route", list(ROUTES.values()))
def test_a_stalled_upload_on_a_typed_route_gets_408_too(route):
    field = "image" if route == TYPED_PREDICT_ROUTE else "images"
    start = f'--b\r\nContent-Disposition: form-data; name="{field}"; filename="a.png"\r\n\r\n'
    headers = {"content-type": "multipart/form-data; boundary=b", "content-length": "2000"}
    with stubs.stub_client() as client, stubs.front_restored() as front:
        front.pace = Pace(stall_seconds=0.3)
        started = time.monotonic()
        status, answer_headers, body = stubs.raw_request(
            client, route, headers, [(0, start.encode())]
        )
    assert status == 408, body
    assert answer_headers["connection"] == "close" and b"arrived too slowly" in body
    assert time.monotonic() - started < 3
