"""The review of feedback (pipeline/review.py) in parts: ids, reviewed.csv, the checks before
an acceptance, the stores' listing (a directory; moto's S3 server, past one page). The
command on feedback the service stored: tests/service/test_review.py."""

from __future__ import annotations

import functools
import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from pipeline import review
from serving.stores import LocalStore, S3Store, photo_key, record_key
from tests.support.review import review_project
from tests.support.stub_service import photo


def stored(store, picture: bytes, label: str, **fields) -> tuple[str, str]:
    """A photo and its record in ``store`` as the flusher puts them (the record last)."""
    sha256 = hashlib.sha256(picture).hexdigest()
    store.put(photo_key(sha256), picture)
    record = {"photo_sha256": sha256, "label": label, "received_at": "2025-05-01T00:00:00"}
    store.put(record_key(sha256, label), json.dumps(record | fields).encode())
    return sha256, label


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store")


def test_ids_are_12_hex_digits_and_the_label_or_as_many_as_tell_photos_apart():
    one, other = "ab" * 32, "ab" * 6 + "cd" * 26
    assert review.short_ids({(one, "grass"), (one, "neither")}) == {
        (one, "grass"): "abababababab.grass",
        (one, "neither"): "abababababab.neither",
    }
    ids = review.short_ids({(one, "grass"), (other, "grass")})
    assert ids == {(one, "grass"): f"{one[:13]}.grass", (other, "grass"): f"{other[:13]}.grass"}


def test_an_id_names_one_record_or_is_a_clear_error(store):
    green = stored(store, photo((20, 200, 20)), "grass")
    stored(store, photo((20, 200, 20)), "dandelion")
    red = stored(store, photo((200, 20, 20)), "grass")
    feedback = review.Feedback(store)

    assert feedback.resolve([feedback.ids[green], red[0][:6], f"{green[0][:5]}.GRASS "]) == [
        green,
        red,
    ]
    with pytest.raises(review.ReviewError, match=r"id '.{6}' is ambiguous: it names .*dandelion"):
        feedback.resolve([green[0][:6]])
    with pytest.raises(review.ReviewError, match="unknown id 'ffffffffffff'"):
        feedback.resolve(["ffffffffffff"])
    with pytest.raises(review.ReviewError, match="unknown id"):
        feedback.resolve([f"{red[0][:8]}.neither"])
    with pytest.raises(review.ReviewError, match="'grass' is not an id"):
        feedback.resolve(["grass"])
    with pytest.raises(review.ReviewError, match="by id, or give --all"):
        review.chosen(feedback, [], everything=False)
    with pytest.raises(review.ReviewError, match="by id, or give --all"):
        review.chosen(feedback, [feedback.ids[red]], everything=True)


def test_a_store_url_without_a_bucket_is_a_review_error():
    with pytest.raises(review.ReviewError, match="names no bucket"):
        review.open_feedback({"FEEDBACK_STORE": "s3://"})


def test_reviewed_csv_is_its_header_then_rows_sorted_by_sha256(tmp_path):
    rows = {
        sha: {"label": "grass", "filename": f"grass/{sha}.jpg", "sha256": sha, "source": "x"}
        for sha in ("f" * 64, "0" * 64)
    }
    text = review.reviewed_text(rows)
    assert text.splitlines()[0] == "label,filename,sha256,source"
    assert [line.split(",")[2] for line in text.splitlines()[1:]] == ["0" * 64, "f" * 64]
    path = tmp_path / "reviewed.csv"
    path.write_text(text)
    assert review.read_reviewed(path) == rows
    assert review.read_reviewed(tmp_path / "none.csv") == {}
    path.write_text("label,filename,sha256\n")
    with pytest.raises(review.ReviewError, match="columns must be label,filename,sha256,source"):
        review.read_reviewed(path)


def test_a_photo_is_filed_by_the_format_of_its_bytes():
    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, "JPEG")
    assert review.extension(jpeg.getvalue(), "x") == "jpg"
    assert review.extension(photo(fmt="PNG"), "x") == "png"
    assert review.extension(photo(fmt="WEBP"), "x") == "webp"
    # A phone's multi-picture JPEG: Pillow reads it as MPO, the service answers it, so the
    # review files it, as a JPEG.
    mpo = io.BytesIO()
    Image.new("RGB", (8, 8)).save(
        mpo, "MPO", save_all=True, append_images=[Image.new("RGB", (8, 8))]
    )
    assert Image.open(io.BytesIO(mpo.getvalue())).format == "MPO"
    assert review.extension(mpo.getvalue(), "x") == "jpg"
    with pytest.raises(review.ReviewError, match="not in a format the service accepts"):
        review.extension(b"not a photo", "x")


def test_what_cannot_be_accepted_is_refused_before_anything_is_written(store, tmp_path):
    root = review_project(tmp_path / "repo")
    known = ["grass", "dandelion"]
    green = stored(store, photo((20, 200, 20)), "grass", answer_id="9b2f6c1e")
    green_too = stored(store, photo((20, 200, 20)), "dandelion")
    blue = stored(store, photo((20, 20, 200)), "neither")
    known_photo = next(line for line in (root / "data/catalogue.csv").read_text().splitlines()[1:])
    label, filename, sha256 = known_photo.split(",")[:3]
    store.put(record_key(sha256, "grass"), json.dumps({"label": "grass"}).encode())
    feedback = review.Feedback(store)

    def plan(keys, as_label=None):
        return review.plan_acceptances(feedback, keys, as_label, known, root)

    (accepted,), done = plan([green])
    assert accepted == review.Acceptance(green, "grass", "feedback:9b2f6c1e") and not done
    assert plan([blue], "dandelion")[0][0].label == "dandelion"
    with pytest.raises(review.ReviewError, match=r"neither.*--as <grass\|dandelion>, or reject"):
        plan([green, blue])
    with pytest.raises(review.ReviewError, match=r"--as rose: the label must be one of"):
        plan([green], "rose")
    with pytest.raises(review.ReviewError, match="already accepted as grass.*reject this one"):
        plan([green, green_too])
    with pytest.raises(review.ReviewError, match=f"already in catalogue.csv as {label}/{filename}"):
        plan([(sha256, "grass")])
    (root / review.Reviewed.of(root).csv).write_text(
        review.reviewed_text(
            {green[0]: {"label": "dandelion", "filename": "f", "sha256": green[0], "source": "s"}}
        )
    )
    with pytest.raises(review.ReviewError, match="already accepted as dandelion"):
        plan([green])
    assert not (root / review.Reviewed.of(root).directory).exists()


def test_the_model_answer_is_the_served_one_when_the_record_keeps_it():
    served = {"served_label": "grass", "served_confidence": 0.8123}
    assert review.model_answer(served, b"", scorer=lambda: None) == "served grass 0.81"
    assert review.model_answer({}, b"", scorer=lambda: None) == "model: unknown"


def test_a_local_store_lists_whole_objects_and_is_an_error_when_missing(store):
    with pytest.raises(FileNotFoundError, match="no feedback store"):
        store.keys("records/")
    green = stored(store, photo(), "grass")
    (store.root / "records" / green[0] / ".dandelion.json.partial").write_bytes(b"{")
    assert store.keys("records/") == [record_key(*green)]
    assert store.get(photo_key(green[0])) == photo()
    assert review.Feedback(store).pending() == [green]


@pytest.mark.slow  # 1003 objects put on moto's server, checking credentials: 7 s
def test_an_s3_store_lists_past_a_page_of_1000_keys(s3, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_access_key)
    store = S3Store(s3.bucket, "feedback/", s3.url)
    client = s3.client()
    keys = [f"records/{index:064x}/grass.json" for index in range(1003)]
    with ThreadPoolExecutor(8) as pool:  # a few seconds, not 13, one by one
        list(pool.map(lambda key: client.put_object(Bucket=s3.bucket, Key=f"feedback/{key}"), keys))
    client.put_object(Bucket=s3.bucket, Key="elsewhere/records/x", Body=b"{}")
    assert store.keys("records/") == keys
    assert store.get(keys[-1]) == b""
    assert len(review.Feedback(store).records) == 1003


@pytest.mark.slow  # seconds of TensorFlow: a small Keras model, exported for OpenVINO
def test_without_a_served_answer_the_sheet_asks_the_local_export(tmp_path):
    import keras

    from pipeline.export import export_model
    from serving.contract import MODEL_FILE

    root = review_project(tmp_path / "repo")
    assert review.export_scorer(root) is None  # no export here: the sheet says unknown
    # P(dandelion) = sigmoid(4 (green - red)) and novelty = 4 blue, channels' means in [0, 1].
    inputs = keras.Input((224, 224, 3))
    means = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
    probability = keras.layers.Dense(1, activation="sigmoid")(means)
    novelty = keras.layers.Dense(1)(means)
    model = keras.Model(inputs, keras.layers.Concatenate()([probability, novelty]))
    model.layers[3].set_weights([np.array([[-4.0], [4.0], [0.0]]), np.zeros(1)])
    model.layers[4].set_weights([np.array([[0.0], [0.0], [4.0]]), np.zeros(1)])
    model.save(tmp_path / MODEL_FILE)
    export_model(tmp_path / MODEL_FILE, root / "data/export", "openvino")

    def answer(colour):
        return review.model_answer({}, photo(colour), functools.cache(lambda: scorer))

    scorer = review.export_scorer(root)
    # green: sigmoid(4 (200 - 20) / 255) = 0.944; red the same for grass; blue: sigmoid(0) is
    # the threshold 0.5 itself (dandelion), and novelty 4 * 200 / 255 > 1 flags it.
    assert answer((20, 200, 20)) == "export dandelion 0.94"
    assert answer((200, 20, 20)) == "export grass 0.94"
    assert answer((20, 20, 200)) == "export dandelion 0.50, neither?"
    assert review.model_answer({"served_label": "grass"}, b"", lambda: scorer) == "served grass"
