"""A challenger beside the champion on the stub front: its configuration and checks, the
canary's sticky share, shadow scoring (agreement, shedding) and what a dead worker does.

The challenger's worker is a real child process (serving/challenger.py Worker) running the
stub engine (tests/support/stub_service.py stub_engine) at a higher threshold than the
champion's: photos whose mean green is from 0.5 to 0.7 are dandelion for one, grass for the
other.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import tarfile
import time
from collections.abc import Iterator

import pytest
import yaml
from prometheus_client import REGISTRY

from serving.challenger import (
    Canary,
    Challenger,
    ChallengerFailed,
    Worker,
    bucket,
    challenger_config,
    check_challenger,
    load_export,
)
from serving.prediction_log import PredictionLog, read_records
from serving.settings import (
    CANARY,
    CANARY_BUCKETS,
    CLIENT_KEY_HEADER,
    SHADOW,
    SHADOW_QUEUE_PHOTOS,
)
from tests.support.stub_service import (
    CARD,
    CHALLENGER_CARD,
    SLOW_CALL_SECONDS,
    SLOW_EXPORT,
    STUB_EXPORT,
    front_restored,
    photo,
    stub_engine,
)

pytestmark = pytest.mark.filterwarnings("ignore:Accessing the 'model_fields' attribute")
GREEN = (20, 200, 20)  # mean green 0.78: dandelion for both models
DISPUTED = (20, 150, 20)  # 0.59: dandelion for the champion, grass for the challenger
GRASS = (20, 60, 20)  # 0.24: grass for both


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def comparisons(outcome: str) -> float:
    return sample(
        "classifier_shadow_comparisons_total",
        model_version=CHALLENGER_CARD.version,
        outcome=outcome,
    )


def errors(mode: str) -> float:
    return sample(
        "classifier_model_errors_total",
        model_version=CHALLENGER_CARD.version,
        role="challenger",
        mode=mode,
    )


def shed() -> float:
    return sample("classifier_shadow_shed_total", model_version=CHALLENGER_CARD.version)


def eventually(condition, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@contextlib.contextmanager
def challenged(
    mode: str, percent: float | None = None, export: str = STUB_EXPORT, log_dir=None
) -> Iterator[tuple[object, Challenger]]:
    """The module's front serving the stub challenger in ``mode`` (its worker a real child
    process), and logging answers to ``log_dir`` if given; all undone on leaving."""
    worker = Worker(export, CHALLENGER_CARD.image_size, niceness=0, load=stub_engine)
    worker.start()
    challenger = Challenger(
        CHALLENGER_CARD, mode, worker, Canary(percent) if mode == CANARY else None
    )
    with front_restored() as front:
        log = None
        if log_dir is not None:
            log = front.log = PredictionLog(("files",), log_dir)
            log.start()
        front.serve_challenger(challenger)
        try:
            yield front, challenger
        finally:
            if front.shadow is not None:
                front.shadow.stop(10)
            challenger.stop()
            front.feedback.challenger = None
            if log is not None:
                log.stop(10)


def predict(client, colour, key: str | None = None, route="/predict") -> dict:
    headers = {CLIENT_KEY_HEADER: key} if key is not None else {}
    field = "images" if "batch" in route else "image"
    response = client.post(route, files=[(field, ("a.png", photo(colour)))], headers=headers)
    assert response.status_code == 200, response.text
    body = response.json()
    return body["predictions"][0] if "predictions" in body else body


# --- configuration ---------------------------------------------------------------------------


def test_no_challenger_unless_configured():
    assert challenger_config({}) is None
    config = challenger_config({"CHALLENGER": "dandelion-vs-grass:abc"})
    assert (config.mode, config.percent) == (SHADOW, None)
    config = challenger_config(
        {"CHALLENGER": "x.bento", "CHALLENGER_MODE": "canary", "CANARY_PERCENT": "12.5"}
    )
    assert (config.mode, config.percent) == (CANARY, 12.5)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"CHALLENGER_MODE": "mirror"}, "CHALLENGER_MODE must be one of ['shadow', 'canary']"),
        ({"CHALLENGER_MODE": "canary"}, "CANARY_PERCENT must be a number from 0 to 100"),
        ({"CHALLENGER_MODE": "canary", "CANARY_PERCENT": "101"}, "not '101'"),
        ({"CHALLENGER_MODE": "canary", "CANARY_PERCENT": "-1"}, "not '-1'"),
        ({"CHALLENGER_MODE": "canary", "CANARY_PERCENT": "ten"}, "not 'ten'"),
        ({"CHALLENGER_MODE": "canary", "CANARY_PERCENT": "nan"}, "not 'nan'"),
    ],
)
def test_a_bad_mode_or_share_is_refused_with_its_reason(environ, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        challenger_config({"CHALLENGER": "dandelion-vs-grass:abc", **environ})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"classes": ["dandelion", "grass"]}, "classes ['dandelion', 'grass'], not the champion's"),
        ({"image_size": 64}, "image_size 64, not the champion's 32"),
        ({"version": CARD.version}, "the champion's own version"),
        # The champion's bento installs only its own engine's packages.
        ({"engine": "keras"}, "engine keras, not the champion's openvino"),
    ],
)
def test_a_challenger_unlike_the_champion_is_refused(change, message):
    import dataclasses

    check_challenger(CARD, CHALLENGER_CARD)  # the stub challenger is fine
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_challenger(CARD, dataclasses.replace(CHALLENGER_CARD, **change))


def bento_archive(path, members: dict[str, bytes]) -> str:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return str(path)


def model_yaml(card) -> bytes:
    return yaml.safe_dump({"name": "dandelion-vs-grass", "metadata": card.to_metadata()}).encode()


def test_a_bento_archive_is_read_from_a_temporary_directory(tmp_path):
    model = f"models/dandelion-vs-grass/{CHALLENGER_CARD.version}"
    archive = bento_archive(
        tmp_path / "challenger.bento",
        {
            "bento.yaml": b"{}",
            f"{model}/model.yaml": model_yaml(CHALLENGER_CARD),
            f"{model}/w": b"1",
        },
    )
    export = load_export(archive)
    try:
        assert export.card == CHALLENGER_CARD
        assert (export.directory / "w").read_bytes() == b"1"
        assert export.directory.is_relative_to(export.extracted)
        assert not export.extracted.is_relative_to(tmp_path)
    finally:
        Challenger(
            export.card, SHADOW, Worker(export.directory, 32, 0), None, export.extracted
        ).stop()
    assert not export.extracted.exists()  # stopped: removed


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"models/../../evil/model.yaml": b"x"}, "is not a bento archive"),  # outside the directory
        ({"bento.yaml": b"{}"}, "holds one model, this one 0"),
    ],
)
def test_a_bad_archive_is_refused_and_leaves_nothing(tmp_path, members, message):
    archive = bento_archive(tmp_path / "bad.bento", members)
    before = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
    with pytest.raises(ValueError, match=message):
        load_export(archive)
    assert not {
        n for n in set(os.listdir(os.environ.get("TMPDIR", "/tmp"))) - before if "challenger" in n
    }
    assert not (tmp_path.parent / "evil").exists()


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("/nowhere/challenger.bento", "no such bento archive"),
        ("another-model:abc", "neither a bento archive nor a tag 'dandelion-vs-grass:<version>'"),
        ("dandelion-vs-grass:0000000000000000", "no model 'dandelion-vs-grass:0000000000000000'"),
    ],
)
def test_a_challenger_that_cannot_be_found_is_refused(tmp_path, monkeypatch, source, message):
    monkeypatch.setenv("BENTOML_HOME", str(tmp_path))  # an empty store
    with pytest.raises(ValueError, match=message.replace("<", ".").replace(">", ".")):
        load_export(source)


def test_a_worker_whose_engine_cannot_load_stops_the_start():
    worker = Worker("gone", 32, 0, load=stub_engine)
    with pytest.raises(ChallengerFailed, match="exited while loading"):
        worker.start()


# --- canary ----------------------------------------------------------------------------------


def test_the_canary_split_is_by_the_first_8_bytes_of_a_sha256():
    digest = bytes.fromhex("00000000000003e7" + "ff" * 24)  # 999
    assert bucket(digest) == 999
    assert Canary(10).challenger_answers(None, digest)  # 999 < 1000
    assert not Canary(9.99).challenger_answers(None, digest)
    assert not Canary(0).challenger_answers(None, bytes(32))
    assert Canary(100).challenger_answers("any key", digest)
    assert CANARY_BUCKETS == 10_000


def test_the_canary_answers_its_share_of_clients_each_always_with_the_same_model(client):
    with challenged(CANARY, percent=30) as (front, challenger):
        served = {}
        for number in range(1000):
            served[f"client-{number}"] = predict(client, GREEN, f"client-{number}")["model_version"]
        share = sum(v == CHALLENGER_CARD.version for v in served.values()) / len(served)
        assert abs(share - 0.30) <= 0.05, share
        assert set(served.values()) == {CARD.version, CHALLENGER_CARD.version}
        # Sticky: the same key, another photo, another route, another time: the same model.
        for key in list(served)[:40]:
            for colour, route in [(DISPUTED, "/predict_batch"), (GRASS, "/api/predict")]:
                assert predict(client, colour, key, route)["model_version"] == served[key]


def test_without_a_key_the_canary_splits_by_photo(client):
    with challenged(CANARY, percent=50):
        photos = [(i, 200 - i, 20) for i in range(30)]
        first = [predict(client, colour)["model_version"] for colour in photos]
        assert set(first) == {CARD.version, CHALLENGER_CARD.version}
        assert [predict(client, colour)["model_version"] for colour in photos] == first


def test_a_canary_whose_worker_dies_is_answered_by_the_champion_counted(client):
    with challenged(CANARY, percent=100) as (front, challenger):
        assert predict(client, DISPUTED)["label"] == "grass"  # the challenger's threshold
        failures = errors("served")
        os.kill(challenger.worker.pid, signal.SIGKILL)
        answer = predict(client, DISPUTED)
        assert (answer["model_version"], answer["label"]) == (CARD.version, "dandelion")
        assert errors("served") == failures + 1
        # Restarted after its back-off: the challenger answers again.
        eventually(lambda: predict(client, DISPUTED)["model_version"] == CHALLENGER_CARD.version)


# --- shadow ----------------------------------------------------------------------------------


def test_shadow_compares_every_answer_and_logs_both(client, tmp_path):
    colours = [GREEN, DISPUTED, GRASS, DISPUTED]
    agree, disagree = comparisons("agree"), comparisons("disagree")
    with challenged(SHADOW, log_dir=tmp_path) as (front, challenger):
        answers = [predict(client, colour) for colour in colours]
        eventually(lambda: comparisons("agree") + comparisons("disagree") == agree + disagree + 4)
    assert {a["model_version"] for a in answers} == {CARD.version}  # the champion answers
    assert (comparisons("agree") - agree, comparisons("disagree") - disagree) == (2, 2)
    assert (
        sample("classifier_challenger_info", model_version=CHALLENGER_CARD.version, mode=SHADOW)
        == 1
    )
    labels = {"model_version": CHALLENGER_CARD.version, "role": "challenger", "mode": SHADOW}
    assert sample("classifier_model_answers_total", **labels, label="grass") >= 3

    records = list(read_records(tmp_path))
    served = {r["answer_id"]: r for r in records if not r["shadow"]}
    shadows = {r["answer_id"]: r for r in records if r["shadow"]}
    assert set(served) == set(shadows) == {a["answer_id"] for a in answers}
    for answer in answers:
        mine, theirs = served[answer["answer_id"]], shadows[answer["answer_id"]]
        assert (mine["role"], mine["model_version"], mine["label"]) == (
            "champion",
            CARD.version,
            answer["label"],
        )
        assert (theirs["role"], theirs["model_version"]) == ("challenger", CHALLENGER_CARD.version)
        assert theirs["photo_sha256"] == mine["photo_sha256"]
        assert theirs["score"] == mine["score"]  # the same stub engine
        assert set(mine) == {
            "time", "answer_id", "photo_sha256", "model_version", "role", "shadow", "label",
            "score", "novelty", "neither", "confidence", "latency_seconds", "endpoint",
        }  # fmt: skip
        assert mine["endpoint"] == "predict"


def test_a_shadow_that_cannot_keep_up_sheds_counted_and_loses_nothing_else(client):
    """A challenger taking 0.5 s a call: the queue fills, the rest is shed, and every photo
    the champion answered is either compared or shed."""
    before = comparisons("agree") + comparisons("disagree"), shed()
    with challenged(SHADOW, export=SLOW_EXPORT) as (front, challenger):
        sent, slowest = 0, 0.0
        for _ in range(SHADOW_QUEUE_PHOTOS // 3 + 20):
            files = [("images", (f"{i}.png", photo(GREEN))) for i in range(3)]
            started = time.monotonic()
            assert client.post("/predict_batch", files=files).status_code == 200
            slowest = max(slowest, time.monotonic() - started)
            sent += 3

        def settled() -> bool:
            done = comparisons("agree") + comparisons("disagree") - before[0]
            return done + shed() - before[1] == sent

        eventually(settled, seconds=60)
    assert shed() > before[1]
    assert slowest < SLOW_CALL_SECONDS  # no answer waited for the shadow


def test_feedback_counts_the_challenger_s_answer_under_its_version(client, feedback_dir):
    from tests.service.test_feedback import feedback_answers, grown

    with challenged(SHADOW):
        before = feedback_answers()
        response = client.post(
            "/feedback", files={"image": ("a.png", photo(DISPUTED))}, data={"label": "grass"}
        )
        assert response.status_code == 202, response.text
        assert grown(before, feedback_answers()) == {
            (CARD.version, "dandelion", "corrected"): 1.0,
            (CHALLENGER_CARD.version, "grass", "confirmed"): 1.0,
        }
