"""What an answer holds, on every prediction route of the front on a stub model: its numbers
rounded to ANSWER_DECIMALS only after the decision, and the docs' example answer in the served
answer's keys and number format (against the real bento: tests/end_to_end/test_service.py)."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from serving.model import ServedModel
from serving.settings import ANSWER_DECIMALS
from tests.support.service import EXAMPLE_ANSWER_PAGES, answer_shape, example_answer
from tests.support.stub_service import CARD, STUB_MODEL, front_restored, photo

# BentoML's own server code (its typed endpoints) on pydantic 2.11+.
pytestmark = pytest.mark.filterwarnings("ignore:Accessing the 'model_fields' attribute")
# Each route and its multipart field; the batch routes answer {"predictions": [...]}.
ROUTES = {
    "/predict": "image",
    "/predict_batch": "images",
    "/api/predict": "image",
    "/api/predict_batch": "images",
}


def scoring(score: float, novelty: float) -> ServedModel:
    """The stub model, with an engine that gives every photo ``score`` and ``novelty``."""

    def engine(images: np.ndarray) -> np.ndarray:
        return np.tile(np.float32([score, novelty]), (len(images), 1))

    return ServedModel(STUB_MODEL.tag, CARD, engine)


def respond(client, route: str, score: float, novelty: float):
    """``route``'s response for one photo that the engine scores ``score`` and ``novelty``."""
    with front_restored() as front:
        front.model = scoring(score, novelty)
        response = client.post(route, files=[(ROUTES[route], ("a.png", photo()))])
    assert response.status_code == 200, response.text
    return response


def answer(client, route: str, score: float, novelty: float) -> dict:
    """``route``'s answer for one photo that the engine scores ``score`` and ``novelty``."""
    body = respond(client, route, score, novelty).json()
    if "predictions" in body:
        (body,) = body["predictions"]
        del body["filename"]
    assert uuid.UUID(body.pop("answer_id")).version == 4
    return body


@pytest.mark.parametrize("route", ROUTES)
def test_every_answer_has_an_id_of_its_own(client, route):
    """Feedback quotes an answer by its id: a random UUID, new for each answer and file."""
    files = [(ROUTES[route], (f"{i}.png", photo())) for i in range(2 if "batch" in route else 1)]
    ids = []
    for _ in range(2):
        body = client.post(route, files=files).json()
        ids += [answer["answer_id"] for answer in body.get("predictions", [body])]
    assert len(set(ids)) == len(ids) and all(uuid.UUID(i).version == 4 for i in ids)


@pytest.mark.parametrize("route", ROUTES)
def test_a_score_that_rounds_onto_the_threshold_keeps_its_unrounded_label(client, route):
    """0.49996 reads 0.5 at four decimals, the threshold, yet is below it: grass. Novelty
    1.00004 reads 1.0, the limit, yet is above it: neither."""
    assert CARD.threshold == 0.5 and ANSWER_DECIMALS == 4
    assert answer(client, route, 0.49996, 1.00004) == {
        "label": "grass",
        "confidence": 0.5,
        "probabilities": {"dandelion": 0.5, "grass": 0.5},
        "neither": True,
        "novelty": 1.0,
        "model_version": CARD.version,
    }


@pytest.mark.parametrize(
    ("score", "probabilities"),
    [
        (0.9999940395355225, {"dandelion": 1.0, "grass": 0.0}),  # float32's 1 - 6e-6
        (0.12345, {"dandelion": 0.1235, "grass": 0.8765}),  # float32: 0.12345000356...
        (0.00014, {"dandelion": 0.0001, "grass": 0.9999}),
    ],
)
def test_probabilities_are_rounded_and_still_sum_to_one(client, score, probabilities):
    body = answer(client, "/predict", score, 0.3701234)
    assert body["probabilities"] == probabilities
    assert sum(probabilities.values()) == pytest.approx(1, abs=1e-12)
    assert body["confidence"] == probabilities[body["label"]]
    assert body["novelty"] == 0.3701


@pytest.mark.parametrize("page", EXAMPLE_ANSWER_PAGES)
def test_the_docs_example_answer_is_written_as_the_service_answers(client, page):
    """Keys (recursively), value types and how each number is written: the example's, and
    the answer to a photo whose unrounded scores have many digits."""
    example = example_answer(page)
    served = answer_example_like(client, example)
    assert answer_shape(example) == answer_shape(served)


def answer_example_like(client, example: str) -> str:
    """The raw JSON answer (as sent) of /predict for a photo that the engine scores with
    float32 digits to spare; the stub's classes must be the example's."""
    assert set(json.loads(example)["probabilities"]) == set(CARD.classes)
    return respond(client, "/predict", 0.9999940395355225, 0.37012345).text


@pytest.mark.parametrize("page", EXAMPLE_ANSWER_PAGES)
def test_the_docs_example_answer_is_consistent(page):
    example = json.loads(example_answer(page))
    probabilities = example["probabilities"]
    assert example["confidence"] == probabilities[example["label"]]
    assert sum(probabilities.values()) == pytest.approx(1, abs=1e-12)
    assert example["neither"] == (example["novelty"] > 1)
