"""The HTTP front (serving/service.py) in this process, on a stub model
(tests/support/stub_service.py): status codes, JSON errors, batch filenames, the 408 and 503
paths and /model-info, and in headless Chromium the page's retries of a busy service and its
feedback buttons (the
OpenAPI document and /docs: tests/service/test_api_docs.py; the page on the real model:
tests/end_to_end/test_page.py)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import time

import pytest

from serving.contract import MODEL_NAME
from serving.engines import BATCHING, SERVICES
from serving.model import ServedModel
from serving.settings import MAX_PREDICTIONS_IN_FLIGHT, SERVICE_NAME, SPOOL_MAX_ENTRIES
from serving.uploads import Pace
from tests.support.browser import headless_chromium, sent_requests
from tests.support.needs import require_tools
from tests.support.service import without_ids
from tests.support.stub_service import (
    CARD,
    STUB_MODEL,
    front_restored,
    photo,
    raw_request,
    stub_client,
    stub_served,
)

GREEN, GRASSY, RED = (20, 230, 20), (120, 60, 40), (230, 20, 20)


@pytest.fixture
def front(client):
    with front_restored() as instance:
        yield instance


def test_each_engine_s_service_is_a_front_named_alike_and_refuses_the_other_engine():
    import serving.service

    for engine, name in SERVICES.items():
        module, _, attribute = name.partition(":")
        assert module == "serving.service"
        service = getattr(serving.service, attribute)
        assert service.name == SERVICE_NAME and service.inner.batching == BATCHING[engine]
        other = next(e for e in SERVICES if BATCHING[e] != BATCHING[engine])
        card = dataclasses.replace(CARD, engine=other, serve={**CARD.serve, "engine": other})
        with pytest.raises(RuntimeError, match=f"engine is {other}: serve {SERVICES[other]} "):
            service.inner(ServedModel(STUB_MODEL.tag, card, STUB_MODEL.score))


def predict(client, *files, field="image", route="/predict"):
    return client.post(route, files=[(field, file) for file in files])


def test_one_photo_gets_the_verdict_of_the_model_s_rule(client):
    green = predict(client, ("green.png", photo(GREEN)))
    assert green.status_code == 200, green.text
    body = green.json()
    assert set(body) == {
        *("label", "confidence", "probabilities", "neither", "novelty", "model_version"),
        "answer_id",
    }
    # The stub scores mean green: 230/255 for dandelion, above the card's threshold of 0.5.
    assert body["label"] == "dandelion" and not body["neither"]
    assert body["probabilities"]["dandelion"] == pytest.approx(230 / 255, abs=0.01)
    assert body["model_version"] == CARD.version

    grassy = predict(client, ("grassy.png", photo(GRASSY))).json()
    assert grassy["label"] == "grass"
    assert grassy["confidence"] == pytest.approx(1 - 60 / 255, abs=0.01)
    assert not grassy["neither"]  # novelty = 2 * mean red = 0.94

    red = predict(client, ("red.png", photo(RED))).json()
    assert red["neither"] and red["novelty"] == pytest.approx(2 * 230 / 255, abs=0.01)


def test_a_batch_answers_each_file_by_name_in_the_order_sent(client):
    files = [("b.png", photo(GRASSY)), ("a.jpg", photo(GREEN, fmt="JPEG")), ("c.png", photo(RED))]
    answer = predict(client, *files, field="images", route="/predict_batch")
    assert answer.status_code == 200, answer.text
    predictions = answer.json()["predictions"]
    assert [p["filename"] for p in predictions] == ["b.png", "a.jpg", "c.png"]
    assert [p["label"] for p in predictions] == ["grass", "dandelion", "grass"]
    assert [p["neither"] for p in predictions] == [False, False, True]
    single = predict(client, ("a.jpg", photo(GREEN, fmt="JPEG"))).json()
    assert without_ids(predictions[1]) == {"filename": "a.jpg", **without_ids(single)}


def test_a_bad_file_in_a_batch_is_named_and_nothing_is_answered(client):
    files = [("good.png", photo(GREEN)), ("broken.jpg", b"not a photo")]
    answer = predict(client, *files, field="images", route="/predict_batch")
    assert answer.status_code == 415
    assert answer.json() == {
        "error": "file 2 (broken.jpg): the upload is not a JPEG, PNG, GIF, WEBP, BMP or TIFF image"
    }


def test_too_many_files_get_a_400_naming_the_limit_and_the_field(client):
    two = predict(client, ("a.png", photo()), ("b.png", photo()))
    assert two.status_code == 400
    assert two.json() == {
        "error": "too many files: at most 1 per request in the field 'image' "
        "(send several photos to /predict_batch)"
    }
    four = predict(
        client, *[(f"{i}.png", photo()) for i in range(4)], field="images", route="/predict_batch"
    )
    assert four.status_code == 400
    assert four.json() == {"error": "too many files: at most 3 per request in the field 'images'"}


BAD_REQUESTS = {
    "empty file": ({"files": {"image": ("e.png", b"")}}, 400, "the upload is empty"),
    "not an image": ({"files": {"image": ("x.jpg", b"<html>")}}, 415, "not a JPEG, PNG"),
    "too small": ({"files": {"image": ("s.png", photo(size=(8, 40)))}}, 422, "at least 16 px"),
    "corrupt": ({"files": {"image": ("c.jpg", photo(fmt="JPEG", size=(400, 300))[:700])}}, 422,
                "corrupt or truncated"),
    "file too large": ({"files": {"image": ("l.png", b"\x89PNG" + b"\0" * 200_000)}}, 413,
                       "exceeds 200000 bytes"),
    "wrong field": ({"files": {"photo": ("a.png", photo())}}, 422,
                    "no file in the multipart field 'image' (fields sent: ['photo'])"),
    "text field": ({"files": {"image": (None, "text")}}, 422, "must hold a file, not text"),
    "json body": ({"json": {"image": "x"}}, 415, "send multipart/form-data"),
    "no boundary": ({"content": b"x", "headers": {"content-type": "multipart/form-data"}}, 400,
                    "names no boundary"),
    "bad length": ({"content": b"x", "headers": {"content-type": "multipart/form-data; boundary=b",
                                                   "content-length": "x1"}}, 400,
                   "Content-Length is not a number"),
    "over the request limit": ({"content": b"x", "headers": {
        "content-type": "multipart/form-data; boundary=b", "content-length": "999999999"}}, 413,
        "exceeds the upload limit"),
}  # fmt: skip


@pytest.mark.parametrize("kind", BAD_REQUESTS)
def test_bad_requests_get_their_status_and_a_json_error(client, kind):
    request, status, words = BAD_REQUESTS[kind]
    answer = client.post("/predict", **request)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert words in answer.json()["error"]
    # ... and /openapi.json lists that status among /predict's answers.
    documented = client.get("/openapi.json").json()["paths"]["/predict"]["post"]["responses"]
    assert str(status) in documented


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "/no-such-page", 404, None),  # BentoML's router
        ("GET", "/static_content/no-such-file.js", 404, None),  # BentoML's static files
        ("GET", "/predict", 405, "POST"),  # the service's own routes
        ("PUT", "/livez", 405, "GET"),  # BentoML's routes
        ("DELETE", "/docs.json", 405, "GET"),
    ],
)
def test_unknown_paths_and_wrong_methods_get_json_errors(client, method, path, status, allow):
    answer = client.request(method, path)
    assert answer.status_code == status
    assert answer.headers["content-type"] == "application/json"
    assert answer.json() == {
        "error": f"{'Not Found' if status == 404 else 'Method Not Allowed'}: {method} {path}"
    }
    assert int(answer.headers["content-length"]) == len(answer.content)
    if allow:
        assert allow in answer.headers["allow"]


def test_other_answers_pass_the_error_middleware_untouched(client):
    assert client.get("/livez").status_code == 200
    assert client.get("/").headers["content-type"].startswith("text/html")
    css = client.get("/static_content/swagger-ui.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert len(css.content) == int(css.headers["content-length"]) > 10_000


def test_at_capacity_and_while_draining_predictions_get_503_with_retry_after(client, front):
    front.admission.in_flight = MAX_PREDICTIONS_IN_FLIGHT
    busy = predict(client, ("a.png", photo()))
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert "at capacity (64 predictions in progress)" in busy.json()["error"]
    front.admission.in_flight = 0
    assert predict(client, ("a.png", photo())).status_code == 200

    front.admission.draining = True
    refused = predict(client, ("a.png", photo()))
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json() == {"error": "the service is shutting down: retry shortly"}
    assert client.get("/readyz").status_code == 503
    front.admission.draining = False
    assert client.get("/readyz").status_code == 200


def test_a_stalled_upload_gets_408_and_the_connection_closed(client, front):
    front.pace = Pace(stall_seconds=0.3)
    start = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
    headers = {"content-type": "multipart/form-data; boundary=b", "content-length": "2000"}
    started = time.monotonic()
    status, answer_headers, body = raw_request(client, "/predict", headers, [(0, start)])
    assert status == 408, body
    assert answer_headers["connection"] == "close"
    assert b"arrived too slowly" in body
    assert time.monotonic() - started < 3  # at the pause limit, not the traffic timeout


@pytest.mark.parametrize(
    ("revision", "shown", "dirty"),
    [(None, "unknown", None), ("4a86145", "4a86145", False), ("4a86145-dirty", "4a86145", True)],
)
def test_model_info_is_the_card_typed_and_the_revision_deployed(
    stub, monkeypatch, revision, shown, dirty
):
    if revision is None:
        monkeypatch.delenv("GIT_REVISION", raising=False)
    else:
        monkeypatch.setenv("GIT_REVISION", revision)
    with stub_client() as client:
        info = client.get("/model-info").json()
    assert info["git_revision"] == shown and info["git_dirty"] is dirty
    card = CARD.to_metadata()
    serve = card.pop("serve")  # upload limits: in /openapi.json; the batch size here too
    assert info == {"model": f"{MODEL_NAME}:{CARD.version}", **card,
                    "git_revision": shown, "git_dirty": dirty,
                    "max_batch_files": serve["max_batch_files"]}  # fmt: skip
    # As params.yaml types them, not strings.
    assert info["train_params"]["seed"] == 42 and isinstance(info["train_params"]["seed"], int)
    assert isinstance(info["train_params"]["learning_rate"], float)
    assert info["train_params"]["features"]["novelty_layers"] == ["block_6_expand_relu"]


# The page's verdict cards and status line, read in one go (it redraws its lists whole).
PAGE_STATE_SCRIPT = """
return {
  status: document.getElementById("status").textContent,
  cards: [...document.querySelectorAll("#verdicts li.card")].map((item) => ({
    verdict: item.querySelector(".verdict")?.textContent ?? null,
    failed: item.querySelector(".failed")?.textContent ?? null,
    answerId: item.dataset.answerId ?? null,
    buttons: Object.fromEntries([...item.querySelectorAll(".feedback button")].map(
      (button) => [button.getAttribute("aria-label"), !button.disabled])),
    note: item.querySelector(".feedback-note")?.textContent ?? null,
  })),
};
"""


def test_the_page_retries_a_busy_service_after_retry_after_and_gives_up_after_three(stub, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium = require_tools("chromium", "chromedriver")
    green = tmp_path / "green.png"
    green.write_bytes(photo(GREEN))
    with (
        stub_served() as url,
        contextlib.closing(headless_chromium(*chromium, tmp_path / "profile")) as browser,
    ):
        front = stub.instance()  # the served app's
        wait = WebDriverWait(browser, 30, poll_frequency=0.1)

        def state() -> dict:
            return browser.execute_script(PAGE_STATE_SCRIPT)

        def predict_posts() -> int:
            return sum(
                1
                for params in sent_requests(browser)
                if params["request"]["method"] == "POST"
                and params["request"]["url"] == f"{url}/predict"
            )

        browser.get(f"{url}/")
        wait.until(lambda _: "Loading" not in browser.find_element(By.ID, "model-card").text)
        sent_requests(browser)  # drop the page load's own requests

        # Busy at first: the page says it will try again, and does once the service has room.
        front.admission.in_flight = MAX_PREDICTIONS_IN_FLIGHT
        browser.find_element(By.ID, "file").send_keys(str(green))
        wait.until(lambda _: "busy: trying again in 1 s" in state()["status"])
        front.admission.in_flight = 0
        wait.until(lambda _: [card["verdict"] for card in state()["cards"]] == ["dandelion"])
        assert predict_posts() == 2  # the 503, then the answer

        # Busy throughout: three retries a second apart, then the service's own reason.
        front.admission.in_flight = MAX_PREDICTIONS_IN_FLIGHT
        browser.find_element(By.ID, "file").send_keys(str(green))
        failed = wait.until(lambda _: state()["cards"][0]["failed"])
        front.admission.in_flight = 0
        assert failed.startswith("The service is busy or restarting: the service is at capacity")
        assert failed.endswith("Try again in a moment.")
        assert predict_posts() == 4


def test_the_page_sends_a_verdict_s_correction_with_its_photo_and_says_what_became_of_it(
    stub, tmp_path, monkeypatch
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium = require_tools("chromium", "chromedriver")
    monkeypatch.setenv("FEEDBACK_DIR", str(tmp_path / "feedback"))  # read at the front's start
    monkeypatch.delenv("FEEDBACK_STORE", raising=False)
    green = tmp_path / "green.png"
    green.write_bytes(photo(GREEN))
    sha256 = hashlib.sha256(green.read_bytes()).hexdigest()
    record = tmp_path / "feedback" / "store" / "records" / sha256 / "grass.json"
    with (
        stub_served() as url,
        contextlib.closing(headless_chromium(*chromium, tmp_path / "profile")) as browser,
    ):
        front = stub.instance()
        wait = WebDriverWait(browser, 30, poll_frequency=0.1)

        def card() -> dict:
            return browser.execute_script(PAGE_STATE_SCRIPT)["cards"][0]

        def click(meaning: str) -> None:
            browser.find_element(By.CSS_SELECTOR, f'.feedback [aria-label="{meaning}"]').click()

        def feedback_posts() -> int:
            return sum(
                1
                for params in sent_requests(browser)
                if params["request"]["url"] == f"{url}/feedback"
            )

        try:
            browser.get(f"{url}/")
            wait.until(lambda _: "Loading" not in browser.find_element(By.ID, "model-card").text)
            browser.find_element(By.ID, "file").send_keys(str(green))
            wait.until(lambda _: card()["verdict"] == "dandelion")
            shown = card()["answerId"]
            # The other class and neither, beside "right".
            assert card()["buttons"] == dict.fromkeys(
                ["right", "wrong, it is grass", "wrong, it is neither"], True
            )
            sent_requests(browser)

            # A full spool: the service's reason, one request (no retries), buttons still on.
            front.feedback.spool.max_entries = 0
            click("wrong, it is grass")
            note = wait.until(lambda _: card()["note"] if "busy" in (card()["note"] or "") else 0)
            assert "the feedback spool is full" in note and note.endswith("Try again in a moment.")
            assert all(card()["buttons"].values()) and feedback_posts() == 1
            assert not record.exists()

            # Room again: stored, thanked, and the buttons off.
            front.feedback.spool.max_entries = SPOOL_MAX_ENTRIES
            click("wrong, it is grass")
            wait.until(lambda _: card()["note"] == "Thanks, stored: grass.")
            assert not any(card()["buttons"].values())
            wait.until(lambda _: record.exists())
        finally:
            front.feedback.stop(0)
    stored = json.loads(record.read_text())
    assert stored["photo_sha256"] == sha256 and stored["label"] == "grass"
    assert stored["answer_id"] == shown and stored["filename"] == "green.png"
    assert stored["model_version"] == CARD.version
