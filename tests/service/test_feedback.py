"""POST /feedback on the stub front: stored in the local directory by default or in an S3
bucket (moto's server, credentials checked), once per photo and label, refused with a 4xx
naming what is wrong, and never lost while the store is down (spooled, then flushed)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator

import anyio
import pytest
import requests
from prometheus_client import REGISTRY

import serving.feedback
from serving.settings import (
    FEEDBACK_OUTCOMES,
    FLUSH_RETRY_SECONDS,
    MAX_COMMENT_CHARS,
    MAX_MODEL_VERSION_CHARS,
    MAX_PREDICTIONS_IN_FLIGHT,
    SHUTDOWN_FLUSH_SECONDS,
    SPOOL_FULL_RETRY_AFTER_SECONDS,
)
from serving.stores import feedback_config
from tests.support.http import free_port
from tests.support.paths import REPO_ROOT
from tests.support.processes import running_server
from tests.support.stub_service import CARD, StubService, front_restored, photo, stub_client

pytestmark = pytest.mark.filterwarnings("ignore:Accessing the 'model_fields' attribute")


@contextlib.contextmanager
def feedback_front() -> Iterator:
    """A client on a new stub front, whose feedback flusher is stopped on leaving (as SIGTERM
    stops it in a served front)."""
    with stub_client() as client:
        front = StubService.instance()
        try:
            yield client
        finally:
            front.feedback.stop(0)


def spool_entries() -> float:
    return REGISTRY.get_sample_value("classifier_feedback_spool_entries") or 0.0


def flush_failures() -> float:
    return REGISTRY.get_sample_value("classifier_feedback_flush_failures_total") or 0.0


def feedback_answers() -> dict[tuple[str, str, str], float]:
    """classifier_feedback_answers_total in this process (the stub front's /metrics), by
    (model_version, label, outcome)."""
    (family,) = [m for m in REGISTRY.collect() if m.name == "classifier_feedback_answers"]
    return {
        (s.labels["model_version"], s.labels["label"], s.labels["outcome"]): s.value
        for s in family.samples
        if s.name.endswith("_total")
    }


def unscored() -> float:
    return REGISTRY.get_sample_value("classifier_feedback_unscored_total") or 0.0


def grown(before: dict, after: dict) -> dict:
    return {
        key: after[key] - before.get(key, 0.0) for key in after if after[key] != before.get(key)
    }


def give(client, label="grass", colour=(20, 200, 20), **fields):
    data = {"label": label, **fields} if label is not None else fields
    return client.post("/feedback", files={"image": ("a.png", photo(colour))}, data=data)


def eventually(condition, seconds=20.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def local_objects(root) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file()
    }


def records(endpoint) -> list[str]:
    return [key for key in endpoint.objects() if "/records/" in key]


def test_the_configuration_comes_from_the_environment(tmp_path):
    default = feedback_config({})
    assert default.spool_dir.parts[-2:] == ("dandelion-feedback", "spool")
    assert default.store_url.endswith("dandelion-feedback/store")
    store = feedback_config({"FEEDBACK_STORE": "s3://b/p/q/", "FEEDBACK_DIR": str(tmp_path)})
    assert store.spool_dir == tmp_path / "spool" and str(store.store()) == "s3://b/p/q/"
    with pytest.raises(ValueError, match="names no bucket"):
        feedback_config({"FEEDBACK_STORE": "s3://"}).store()


def test_feedback_is_stored_in_the_local_directory_by_default(feedback_dir):
    with feedback_front() as client:
        answer = client.post("/predict", files={"image": ("a.png", photo())}).json()
        given = give(client, answer_id=answer["answer_id"], comment="a lawn, no flower")
        assert given.status_code == 202, given.text
        sha256 = hashlib.sha256(photo()).hexdigest()
        assert given.json() == {
            "photo_sha256": sha256,
            "label": "grass",
            "answer_id": answer["answer_id"],
        }
        store = feedback_dir / "store"
        eventually(lambda: len(local_objects(store)) == 2)
    objects = local_objects(store)
    assert objects[f"photos/{sha256}"] == photo()
    record = json.loads(objects[f"records/{sha256}/grass.json"])
    assert record["answer_id"] == answer["answer_id"] and record["label"] == "grass"
    assert record["comment"] == "a lawn, no flower" and record["photo_sha256"] == sha256
    assert record["served_model_version"] == answer["model_version"]
    assert not any((feedback_dir / "spool").iterdir())


def test_feedback_goes_to_the_bucket_and_prefix_configured_once_per_photo_and_label(s3):
    store, endpoint = s3
    store.on()
    with feedback_front() as client:
        for label in ("grass", "grass", "neither"):  # the same feedback twice, then another
            assert give(client, label).status_code == 202
        eventually(lambda: len(endpoint.objects()) == 3)
        sha256 = hashlib.sha256(photo()).hexdigest()
        assert set(endpoint.objects()) == {
            f"reviews/2024/photos/{sha256}",
            f"reviews/2024/records/{sha256}/grass.json",
            f"reviews/2024/records/{sha256}/neither.json",
        }


@pytest.mark.parametrize(
    ("fields", "status", "message"),
    [
        ({"label": "rose"}, 422, "must be one of ['grass', 'dandelion', 'neither']"),
        ({}, 422, "must be one of"),
        ({"label": "grass", "comment": "x" * (MAX_COMMENT_CHARS + 1)}, 422, "at most 1000"),
        ({"label": "grass", "answer_id": "42"}, 422, "must be an answer's answer_id"),
        (
            {"label": "grass", "model_version": "v" * (MAX_MODEL_VERSION_CHARS + 1)},
            422,
            f"'model_version' has {MAX_MODEL_VERSION_CHARS + 1} characters: at most",
        ),
        ({"label": "grass", "colour": "green"}, 422, "unknown fields ['colour']"),
        ({"label": "grass", "image": b"not a photo"}, 415, "is not a JPEG"),
        ({"label": "grass", "image": photo(size=(8, 8))}, 422, "at least 16 px"),
    ],
)
def test_bad_feedback_gets_a_4xx_with_its_reason_and_is_not_kept(
    feedback_dir, fields, status, message
):
    image = fields.pop("image", photo())
    with feedback_front() as client:
        refused = client.post("/feedback", files={"image": ("a.png", image)}, data=fields)
    assert refused.status_code == status and message in refused.json()["error"]
    assert local_objects(feedback_dir) == {}


def test_two_photos_in_one_feedback_get_a_400_with_no_advice_to_use_predict_batch(feedback_dir):
    with feedback_front() as client:
        refused = client.post(
            "/feedback",
            files=[("image", ("a.png", photo())), ("image", ("b.png", photo()))],
            data={"label": "grass"},
        )
    assert refused.status_code == 400
    assert refused.json() == {
        "error": "too many files: at most 1 per request in the field 'image' (one per feedback)"
    }
    assert local_objects(feedback_dir) == {}


def test_feedback_accepted_while_the_store_is_stopped_is_stored_once_it_is_back(s3):
    """The store stops while 30 feedbacks arrive: every one is accepted (202, on the spool's
    disk), the spool grows, and once the store is back every one is in it and the spool is
    empty."""
    store, endpoint = s3
    sent, answers, depths = 30, [], []
    store.on()
    with feedback_front() as client:
        for index in range(sent):
            if index == 10:  # mid-stream, once the flusher has stored the first ones
                eventually(lambda: len(records(endpoint)) == 10)
                store.off()
            answers.append(give(client, colour=(index, 200, 20)).status_code)
            depths.append(spool_entries())
        assert answers == [202] * sent
        assert depths[10:] == list(range(1, sent - 10 + 1))  # each kept, none stored
        # The flusher found the store down after the last feedback, and waits to retry: no
        # new feedback will wake it, only its retry timer.
        last = flush_failures()
        eventually(lambda: flush_failures() > last)
        time.sleep(1)
        store.on()
        eventually(lambda: spool_entries() == 0, seconds=3 * FLUSH_RETRY_SECONDS)
    assert len(records(endpoint)) == sent


def test_a_full_spool_answers_503_and_keeps_what_it_holds(s3):
    """With the store down and room for 3 entries: 3 feedbacks accepted, the 4th refused
    with 503 and Retry-After, and the 3 stored once the store is back."""
    store, endpoint = s3
    with feedback_front() as client, front_restored() as front:
        front.feedback.spool.max_entries = 3
        answers = [give(client, colour=(i, 200, 20)) for i in range(4)]
        assert [a.status_code for a in answers] == [202, 202, 202, 503]
        assert "spool is full" in answers[3].json()["error"]
        assert answers[3].headers["Retry-After"] == str(SPOOL_FULL_RETRY_AFTER_SECONDS)
        store.on()
        eventually(lambda: spool_entries() == 0, seconds=60)
    assert len(records(endpoint)) == 3


def test_a_spool_left_by_a_stopped_service_is_stored_by_the_next(s3):
    store, endpoint = s3
    with feedback_front() as client:  # the store is down: what it accepts stays spooled
        assert give(client).status_code == 202
    assert spool_entries() == 1 and records(endpoint) == []
    store.on()
    with feedback_front():
        eventually(lambda: len(records(endpoint)) == 1, seconds=60)
    assert spool_entries() == 0


def test_a_feedback_is_on_disk_before_it_is_answered(feedback_dir):
    """Nothing is flushed (the flusher holds its lock): the 202 comes with the entry on disk."""
    with feedback_front() as client, front_restored() as front:
        front.feedback.flusher.stopping.set()
        front.feedback.flusher.wake()
        front.feedback.flusher.thread.join(10)
        assert give(client).status_code == 202
        (entry,) = (feedback_dir / "spool").iterdir()
        assert entry.read_bytes().endswith(photo())


# The stub front served by uvicorn in a process of its own, in its main thread, so that SIGTERM
# takes the service's path (drain, then the flusher's last pass). The flusher's retry timer is
# pushed out of the test's reach: only a new feedback or the last pass tries the store.
SERVE_STUB = """
import sys
import uvicorn
import serving.spool
serving.spool.FLUSH_RETRY_SECONDS = 3600
from tests.support.stub_service import stub_service
uvicorn.run(stub_service().app, host="127.0.0.1", port=int(sys.argv[1]), log_level="info")
"""


def test_sigterm_gives_the_flusher_a_last_pass_and_leaves_spooled_what_it_cannot_store(
    s3, feedback_dir, tmp_path
):
    store, endpoint = s3
    spool = feedback_dir / "spool"

    def served_until_sigterm(colour, store_on_at_sigterm: bool) -> None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-c", SERVE_STUB, str(port)]
        log = tmp_path / f"serve-{port}.log"
        with running_server(command, url, log, cwd=REPO_ROOT, timeout=120) as process:

            def failures() -> int:  # the flusher's warnings in the server's log
                return sum("failed: EndpointConnectionError" in line for line in open(log))

            # What a previous run left is tried at the start, and fails: then the flusher waits.
            left = len(list(spool.iterdir())) if spool.exists() else 0
            eventually(lambda: failures() == left)
            sent = {"image": ("a.png", photo(colour))}
            given = requests.post(f"{url}/feedback", files=sent, data={"label": "grass"})
            assert given.status_code == 202, given.text
            # The attempt the feedback wakes has failed too: only the last pass is left.
            eventually(lambda: failures() == left + 1)
            if store_on_at_sigterm:
                store.on()
            os.kill(process.pid, signal.SIGTERM)
            # A graceful exit: uvicorn re-raises the SIGTERM it caught once it has shut down.
            assert process.wait(timeout=SHUTDOWN_FLUSH_SECONDS + 20) == -signal.SIGTERM
            assert "Application shutdown complete" in log.read_text()

    # The store down throughout: the last pass fails, and the feedback stays on disk.
    served_until_sigterm((20, 200, 20), store_on_at_sigterm=False)
    assert len(list(spool.iterdir())) == 1 and records(endpoint) == []
    # The store back just as SIGTERM comes: the last pass stores both, the left one too.
    served_until_sigterm((30, 200, 20), store_on_at_sigterm=True)
    assert len(records(endpoint)) == 2 and list(spool.iterdir()) == []


# The stub scores P(dandelion) = mean green and novelty = 2 x mean red (neither above 1).
DANDELION, GRASS, NEITHER = (20, 200, 20), (20, 50, 20), (200, 200, 20)


def test_feedback_counts_the_served_answer_confirmed_or_corrected_by_version_and_label(
    feedback_dir,
):
    """Each feedback counts the served model's answer for its photo, as /predict gives it
    ("neither" included), confirmed when the label given is that answer, corrected when not;
    under the served model's version, also when the feedback quotes another."""
    sent = [  # (photo, label given, the model_version quoted)
        (DANDELION, "dandelion", None),
        (DANDELION, "grass", CARD.version),
        (GRASS, "grass", None),
        (GRASS, "neither", "fedcba9876543210"),  # an older model's answer
        (NEITHER, "neither", None),
        (NEITHER, "dandelion", None),
        (NEITHER, "grass", None),
    ]
    with feedback_front() as client:
        # Every series the rules read exists at 0 from the start, for each label the model
        # can answer and each outcome.
        before = feedback_answers()
        assert {(version, label, outcome) for version, label, outcome in before} >= {
            (CARD.version, label, outcome)
            for label in ("grass", "dandelion", "neither")
            for outcome in FEEDBACK_OUTCOMES
        }
        left_unscored = unscored()
        answers = {}
        for colour, label, version in sent:
            answers[colour] = client.post("/predict", files={"image": ("a.png", photo(colour))})
            fields = {"model_version": version} if version else {}
            assert give(client, label, colour, **fields).status_code == 202
        counted = grown(before, feedback_answers())
        assert unscored() == left_unscored
        eventually(lambda: len(local_objects(feedback_dir / "store")) == 3 + len(sent))
    assert counted == {
        (CARD.version, "dandelion", "confirmed"): 1,
        (CARD.version, "dandelion", "corrected"): 1,
        (CARD.version, "grass", "confirmed"): 1,
        (CARD.version, "grass", "corrected"): 1,
        (CARD.version, "neither", "confirmed"): 1,
        (CARD.version, "neither", "corrected"): 2,
    }
    # Each record keeps that answer: the label (or neither) and confidence /predict gave.
    for colour, label, _ in sent:
        sha256 = hashlib.sha256(photo(colour)).hexdigest()
        record = json.loads((feedback_dir / "store/records" / sha256 / f"{label}.json").read_text())
        answer = answers[colour].json()
        served = "neither" if answer["neither"] else answer["label"]
        assert (record["served_label"], record["served_confidence"]) == (
            served,
            answer["confidence"],
        )
        assert record["served_model_version"] == CARD.version


def engine_down(images):
    raise RuntimeError("the engine is down")


async def never_answers(images):
    await anyio.sleep(3600)


@pytest.mark.parametrize(
    "failure", ["the engine fails", "the model does not answer", "the service is at capacity"]
)
def test_feedback_the_model_cannot_score_is_accepted_unscored(feedback_dir, monkeypatch, failure):
    """The model fails (as the Keras engine's model service, down, makes /predict fail) or
    does not answer in FEEDBACK_SCORING_SECONDS, or every prediction's place is taken (scoring
    a feedback adds no load past capacity): the feedback is accepted and stored all the same,
    its served fields null, counted unscored and in no outcome."""
    with feedback_front() as client, front_restored() as front:
        if failure == "the engine fails":
            front.model = dataclasses.replace(front.model, score=engine_down)
        elif failure == "the service is at capacity":  # every prediction's place taken
            monkeypatch.setattr(front.admission, "in_flight", MAX_PREDICTIONS_IN_FLIGHT)
        else:
            monkeypatch.setattr(serving.feedback, "FEEDBACK_SCORING_SECONDS", 0.5)
            front.feedback.scores = never_answers
        before, left_unscored = feedback_answers(), unscored()
        started = time.monotonic()
        given = give(client, "grass", answer_id="9b2f6c1e-3d4a-4f0b-8c7e-2a5d1e6f4b3c")
        assert given.status_code == 202, given.text
        assert time.monotonic() - started < 5
        assert unscored() == left_unscored + 1 and grown(before, feedback_answers()) == {}
        eventually(lambda: len(local_objects(feedback_dir / "store")) == 2)
    sha256 = hashlib.sha256(photo()).hexdigest()
    record = json.loads((feedback_dir / "store/records" / sha256 / "grass.json").read_text())
    assert record["served_label"] is None and record["served_confidence"] is None
    assert record["label"] == "grass" and record["served_model_version"] == CARD.version
