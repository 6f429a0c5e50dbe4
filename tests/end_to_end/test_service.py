"""The BentoML service, served for real (`bentoml serve` on 127.0.0.1), on real photos."""

from __future__ import annotations

import csv
import io
import itertools
import json
import struct
import subprocess
import sys
import time
import uuid
import zlib
from pathlib import Path

import bentoml
import numpy as np
import pytest
import requests
from PIL import Image

from pipeline.bento import bento_version_of
from pipeline.export import export_model
from pipeline.hashing import file_sha256
from serving.contract import MODEL_FILE, MODEL_NAME, NOVELTY, PROBABILITY, DecisionRule
from serving.engines import load_engine
from stages.evaluate import unlike_pictures
from tests.support.dvc import dvc, set_param, stages_run
from tests.support.http import free_port, multipart_body
from tests.support.paths import EVALUATE_METRICS, PIPELINE_PATHS
from tests.support.processes import python_module, stop_process_group
from tests.support.service import (
    EXAMPLE_ANSWER_PAGES,
    ROUNDING,
    answer_shape,
    evaluated_predictions,
    example_answer,
    served_answers,
    serving,
    split_photos,
    without_ids,
)

pytestmark = pytest.mark.slow
TIMEOUT = 60


def post_image(service, content: bytes, filename="photo.jpg", field="image", route="predict"):
    return requests.post(
        f"{service.url}/{route}", files={field: (filename, content)}, timeout=TIMEOUT
    )


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def a_photo(service) -> Image.Image:
    _, path = split_photos(service.workspace)[0]
    return Image.open(path).convert("RGB")


def assert_serves_what_evaluate_decided(service) -> list[dict]:
    """Every test photo gets, over HTTP, the label evaluate predicted for it; the answers."""
    predictions = evaluated_predictions(service.workspace)
    assert len(predictions) == 60
    answers = served_answers(service.url, [p.photo for p in predictions])
    for prediction, body in zip(predictions, answers, strict=True):
        assert set(body) == {
            *("label", "confidence", "probabilities", "neither", "novelty", "model_version"),
            "answer_id",
        }
        assert uuid.UUID(body["answer_id"]).version == 4
        assert body["label"] == prediction.predicted, (prediction, body)
        # The same export, the same engine: the score evaluate wrote (to 6 decimals), as the
        # service rounds it.
        assert body["probabilities"]["dandelion"] == pytest.approx(
            prediction.score, abs=ROUNDING + 1e-6
        )
        assert body["novelty"] == pytest.approx(prediction.novelty, abs=1e-4)
    pairs = list(zip(predictions, answers, strict=True))
    accuracy = np.mean([body["label"] == p.label for p, body in pairs])
    assert accuracy == pytest.approx(service.metrics["accuracy"])
    neither = np.mean([body["neither"] for _, body in pairs])
    assert neither == pytest.approx(service.metrics["neither_share"])
    assert neither <= 0.05  # false alarms on real photos of the two classes
    return answers


@pytest.mark.parametrize("page", EXAMPLE_ANSWER_PAGES)
def test_the_docs_example_answer_is_written_as_the_bento_answers(service, page):
    """Keys (recursively), value types and how each number is written, against the answer to
    a test photo as sent (tests/service/test_answers.py: the same on the stub)."""
    _, path = split_photos(service.workspace)[0]
    response = post_image(service, Path(path).read_bytes())
    assert response.status_code == 200, response.text
    assert answer_shape(example_answer(page)) == answer_shape(response.text)


def test_pictures_of_neither_class_are_flagged_as_evaluate_reported(service):
    """Noise, flat colours and text (evaluate's generated set), sent as lossless PNGs."""
    pictures = unlike_pictures(224)
    answers = []
    for pixels in pictures:
        response = post_image(service, encoded(Image.fromarray(pixels), "PNG"), "unlike.png")
        assert response.status_code == 200, response.text
        answers.append(response.json())
    evaluated = json.loads((service.workspace / EVALUATE_METRICS).read_text())["unlike"]
    flagged = [answer["neither"] for answer in answers]
    assert np.mean(flagged) == pytest.approx(evaluated["neither_share"])
    assert np.mean(flagged) >= 0.75  # most are caught
    assert all(flagged[:8])  # every picture of random noise


def test_every_test_photo_gets_the_label_evaluate_predicted(service):
    assert_serves_what_evaluate_decided(service)


def test_a_new_threshold_reaches_the_served_decisions(pipeline_copy, reproduced, tmp_path):
    """Change evaluate.threshold so that a label flips, rebuild, serve the new bento."""
    before = evaluated_predictions(pipeline_copy)
    # Just above the lowest dandelion score(s), midway to the next score so that float
    # noise from batching cannot decide: the photos below it flip to grass.
    above = sorted(p.score for p in before if p.predicted == "dandelion")[:6]
    low, high = max(itertools.pairwise(above), key=lambda pair: pair[1] - pair[0])
    threshold = round((low + high) / 2, 6)
    set_param(pipeline_copy, "evaluate.threshold", threshold)
    rebuilt = dvc(pipeline_copy, "repro", env=reproduced.env)
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert stages_run(rebuilt.stdout) == ["evaluate", "package", "plots"]

    after = evaluated_predictions(pipeline_copy)
    flipped = [a.photo for b, a in zip(before, after, strict=True) if b.predicted != a.predicted]
    assert flipped, threshold

    # A bento that is not (yet) champion is served by its tag after importing the archive.
    env = dict(reproduced.env, BENTOML_HOME=str(tmp_path / "bentoml_home"))
    archive = pipeline_copy / PIPELINE_PATHS["bento_archive"]
    imported = python_module("bentoml", pipeline_copy, "import", str(archive), env=env)
    assert imported.returncode == 0, imported.stderr
    with serving(bento_version_of(archive), pipeline_copy, env, tmp_path) as service:
        answers = assert_serves_what_evaluate_decided(service)
        info = requests.get(f"{service.url}/model-info", timeout=TIMEOUT).json()
    assert info["threshold"] == threshold
    assert {a["model_version"] for a in answers} == {info["version"]}


def curl(url: str, *forms: str) -> dict:
    """The JSON answer of the real `curl -sS -F form... url` (bounded: 60 s)."""
    command = ["curl", "-sS", "--fail-with-body", "--max-time", "60"]
    command += [part for form in forms for part in ("-F", form)]
    done = subprocess.run([*command, url], capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


@pytest.mark.filterwarnings("ignore:Accessing the 'model_fields' attribute")
def test_bentoml_s_client_answers_every_test_photo_as_curl_does(service):
    """The typed endpoints, through BentoML's own client, against the multipart routes."""
    photos = [prediction.photo for prediction in evaluated_predictions(service.workspace)]
    with bentoml.SyncHTTPClient(service.url, timeout=TIMEOUT) as client:
        # Equal but for the answer_ids, new for every answer.
        for photo in photos:
            expected = without_ids(curl(f"{service.url}/predict", f"image=@{photo}"))
            assert without_ids(client.predict(image=Path(photo))) == expected, photo
        for first, second in [photos[:2], photos[29:31], photos[-2:]]:
            expected = curl(f"{service.url}/predict_batch", f"images=@{first}", f"images=@{second}")
            answered = client.predict_batch(images=[Path(first), Path(second)])
            assert without_ids(answered) == without_ids(expected)


def sixteen_bit_png(photo: Image.Image) -> bytes:
    gray = np.asarray(photo.convert("L"), dtype=np.uint16) * 257
    sixteen = Image.fromarray(gray)  # uint16 -> a 16-bit grayscale image
    assert sixteen.mode.startswith("I;16")
    return encoded(sixteen, "PNG")


def animated_gif(photo: Image.Image) -> bytes:
    frames = [photo.convert("P"), Image.new("RGB", photo.size, (255, 0, 0)).convert("P")]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def exif_rotated_jpeg(photo: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encoded(photo.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif)


UNUSUAL = {
    "png-with-alpha": lambda p: encoded(p.convert("RGBA"), "PNG"),
    "grayscale-jpeg": lambda p: encoded(p.convert("L"), "JPEG"),
    "cmyk-jpeg": lambda p: encoded(p.convert("CMYK"), "JPEG"),
    "16-bit-png": sixteen_bit_png,
    "palette-gif": lambda p: encoded(p.convert("P"), "GIF"),
    "animated-gif": animated_gif,
    "exif-rotated-jpeg": exif_rotated_jpeg,
}


# Those that keep the photo's colours (grayscale ones drop the cue that tells the classes apart).
KEEP_COLOURS = {"png-with-alpha", "cmyk-jpeg", "palette-gif", "animated-gif", "exif-rotated-jpeg"}


@pytest.mark.parametrize("kind", UNUSUAL)
def test_unusual_but_valid_images_are_classified(service, kind):
    # The test photo evaluate scored furthest from the threshold: re-encoding cannot flip it.
    photo = max(evaluated_predictions(service.workspace), key=lambda p: abs(p.score - 0.5))
    picture = Image.open(photo.photo).convert("RGB")
    response = post_image(service, UNUSUAL[kind](picture), filename=f"{kind}.img")
    assert response.status_code == 200, response.text
    if kind in KEEP_COLOURS:  # decoded as the same picture: evaluate's label for it
        assert response.json()["label"] == photo.predicted, (photo, response.json())


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header says width x height (a decompression bomb's calling card)."""
    small = encoded(Image.new("L", (1, 1)), "PNG")
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return small[:8] + ihdr + small[8 + 25 :]


BAD_UPLOADS = {
    "empty": (lambda p: b"", 400, "empty"),
    "not-an-image": (lambda p: b"\x00\x01 definitely not a picture" * 50, 415, "not a JPEG, PNG"),
    "html-page": (lambda p: b"<!doctype html><html><body>hi</body></html>", 415, "not a JPEG, PNG"),
    "truncated-jpeg": (lambda p: encoded(p, "JPEG")[:3000], 422, "corrupt or truncated"),
    "one-pixel": (lambda p: encoded(Image.new("RGB", (1, 1)), "PNG"), 422, "at least 32 px"),
    "decompression-bomb": (lambda p: png_claiming_size(20000, 20000), 413, "pixels"),
    "too-large-upload": (lambda p: b"\xff" * 10_000_001, 413, "exceeds"),
}


@pytest.mark.parametrize("kind", BAD_UPLOADS)
def test_bad_uploads_get_a_clear_4xx(service, kind):
    make, status, words = BAD_UPLOADS[kind]
    response = post_image(service, make(a_photo(service)))
    assert response.status_code == status, response.text
    assert words in response.json()["error"]


def test_wrong_field_and_wrong_encoding_get_a_clear_4xx(service):
    photo = encoded(a_photo(service), "JPEG")
    wrong_field = post_image(service, photo, field="file")
    assert wrong_field.status_code == 422
    assert "no file in the multipart field 'image'" in wrong_field.json()["error"]
    assert "file" in wrong_field.json()["error"]

    as_json = requests.post(f"{service.url}/predict", json={"image": "x"}, timeout=TIMEOUT)
    assert as_json.status_code == 415
    assert "multipart/form-data" in as_json.json()["error"]

    text_field = requests.post(
        f"{service.url}/predict", files={"image": (None, "text")}, timeout=TIMEOUT
    )
    assert text_field.status_code == 422


def test_a_wrong_method_and_an_unknown_path_get_json_errors_too(service):
    wrong_method = requests.get(f"{service.url}/predict", timeout=TIMEOUT)
    assert wrong_method.status_code == 405
    assert wrong_method.json() == {"error": "Method Not Allowed: GET /predict"}
    assert "POST" in wrong_method.headers["Allow"]
    # BentoML's own router answers this one, before the service's routes are asked; the
    # service's middleware (JsonErrors) makes it JSON.
    unknown = requests.get(f"{service.url}/no-such-page", timeout=TIMEOUT)
    assert unknown.status_code == 404
    assert unknown.json() == {"error": "Not Found: GET /no-such-page"}


def test_batch_endpoint_classifies_several_images_and_names_a_bad_one(service):
    photos = [open(path, "rb").read() for _, path in split_photos(service.workspace)[:3]]
    files = [("images", (f"{i}.jpg", content)) for i, content in enumerate(photos)]
    response = requests.post(f"{service.url}/predict_batch", files=files, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["filename"] for p in predictions] == ["0.jpg", "1.jpg", "2.jpg"]
    singles = [post_image(service, content).json() for content in photos]
    assert [p["label"] for p in predictions] == [s["label"] for s in singles]
    for batched, single in zip(predictions, singles, strict=True):
        # Scores within float noise of each other; rounded, at most one last decimal apart.
        assert batched["confidence"] == pytest.approx(single["confidence"], abs=2 * ROUNDING)

    files.append(("images", ("broken.jpg", b"nope")))
    broken = requests.post(f"{service.url}/predict_batch", files=files, timeout=TIMEOUT)
    assert broken.status_code == 415
    assert broken.json()["error"].startswith("file 4 (broken.jpg):")


@pytest.mark.parametrize("route", ["predict_batch", "predict"])
def test_a_truncated_upload_is_refused_whole_not_half_answered(service, route):
    """A body cut mid-file (Content-Length matching the cut): 400, never fewer answers."""
    photos = [open(path, "rb").read() for _, path in split_photos(service.workspace)[:3]]
    field, count = ("images", 3) if route == "predict_batch" else ("image", 1)
    whole, content_type = multipart_body(field, photos[:count])
    for keep in (0.3, 0.6, 0.95):
        cut = whole[: int(len(whole) * keep)]
        headers = {"Content-Type": content_type}
        answer = requests.post(f"{service.url}/{route}", data=cut, headers=headers, timeout=TIMEOUT)
        assert answer.status_code == 400, (keep, answer.text)
        assert "truncated" in answer.json()["error"]


def test_model_info_health_and_metrics(service):
    info = requests.get(f"{service.url}/model-info", timeout=TIMEOUT).json()
    assert info["classes"] == ["grass", "dandelion"]
    assert info["test_metrics"] == service.metrics
    assert info["threshold"] == 0.5 and info["image_size"] == 224
    assert info["train_params"]["seed"] == 42  # the params' own types, not strings
    assert info["model_sha256"] == file_sha256(
        service.workspace / PIPELINE_PATHS["model_dir"] / MODEL_FILE
    )
    assert info["model"] == f"{MODEL_NAME}:{info['version']}"
    for probe in ("livez", "readyz"):
        assert requests.get(f"{service.url}/{probe}", timeout=TIMEOUT).status_code == 200
    metrics = requests.get(f"{service.url}/metrics", timeout=TIMEOUT)
    assert metrics.status_code == 200 and "bentoml_" in metrics.text


def test_server_survives_everything_above(service):
    """Runs after the bad-input tests (file order): still ready, still predicting."""
    assert requests.get(f"{service.url}/readyz", timeout=TIMEOUT).status_code == 200
    response = post_image(service, encoded(a_photo(service), "JPEG"))
    assert response.status_code == 200


def test_the_served_engine_agrees_with_keras_on_every_test_photo(reproduced, tmp_path):
    """Parity: the f32 OpenVINO export against Keras. (The INT8 export, which the bento may
    serve, is held to the f32 one in tests/end_to_end/test_quantization.py.)"""
    workspace = reproduced.workspace
    keras_export, served_dir = tmp_path / "keras", tmp_path / "openvino"
    export_model(workspace / PIPELINE_PATHS["model_dir"] / MODEL_FILE, keras_export, "keras")
    export_model(workspace / PIPELINE_PATHS["model_dir"] / MODEL_FILE, served_dir, "openvino")
    images = np.load(workspace / PIPELINE_PATHS["arrays_dir"] / "test.npz")["images"]
    assert len(images) == 60
    served, reference = load_engine(served_dir)(images), load_engine(keras_export)(images)
    rule = DecisionRule(("grass", "dandelion"), 0.5)
    largest = float(np.abs(served[:, PROBABILITY] - reference[:, PROBABILITY]).max())
    novelty = served[:, NOVELTY], reference[:, NOVELTY]
    print(f"parity over {len(images)} test photos: max |P(dandelion) difference| = {largest:.2e}")
    assert largest <= 1e-3
    assert (
        rule.predict(served[:, PROBABILITY]).tolist()
        == rule.predict(reference[:, PROBABILITY]).tolist()
    )
    np.testing.assert_allclose(*novelty, rtol=1e-3)
    assert rule.neither(novelty[0]).tolist() == rule.neither(novelty[1]).tolist()


def test_readyz_answers_within_seconds_from_the_start(reproduced, tmp_path):
    """Polled from the moment `bentoml serve` starts: 503 until ready, then 200, never a hang."""
    port = free_port()
    command = [sys.executable, "-m", "bentoml", "serve", f"{MODEL_NAME}:latest"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    log = tmp_path / "serve.log"
    answers: list[tuple[float, int, float]] = []  # (since start, status, seconds taken)
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command,
            env=reproduced.env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    started = time.monotonic()
    try:
        while time.monotonic() - started < 120 and not (answers and answers[-1][1] == 200):
            asked = time.monotonic()
            try:
                status = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=30).status_code
                answers.append((asked - started, status, time.monotonic() - asked))
            except requests.ConnectionError:
                pass  # not listening yet
            time.sleep(0.1)
        for _ in range(5):  # and it stays ready
            answers.append(
                (
                    time.monotonic() - started,
                    requests.get(f"http://127.0.0.1:{port}/readyz", timeout=30).status_code,
                    0.0,
                )
            )
    finally:
        stop_process_group(process)
    print("readyz polls (since start s, status, took s):", answers)
    assert answers, log.read_text()[-3000:]
    assert max(took for _, _, took in answers) <= 5
    statuses = [status for _, status, _ in answers]
    first_ok = statuses.index(200)
    assert set(statuses[:first_ok]) <= {503} and set(statuses[first_ok:]) == {200}


def test_the_locust_load_test_runs_headless_without_failures(service, tmp_path):
    """benchmarks/locustfile.py as docs/serving.md runs it, briefly (bounded: 8 s of 4 users)."""
    locustfile = service.workspace / "benchmarks" / "locustfile.py"  # beside the workspace's data
    command = [sys.executable, "-m", "locust", "-f", str(locustfile), "--host", service.url]
    command += ["--headless", "--users", "4", "--spawn-rate", "4", "--run-time", "8s"]
    command += ["--csv", str(tmp_path / "load"), "--only-summary"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with open(tmp_path / "load_stats.csv", newline="") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"/predict", "/predict_batch", "Aggregated"}
    assert int(rows["Aggregated"]["Request Count"]) > 20
    assert int(rows["Aggregated"]["Failure Count"]) == 0
