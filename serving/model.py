"""The model a front serves: its card, and its engine when the engine runs in the front.

BentoML starts a service with no arguments, so a front loads ``ServedModel.stored`` from
BentoML's model store when it starts (never at import). Tests give a front a ``ServedModel``
of their own: a made-up card and a stub scorer, and no store at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from serving.contract import MODEL_NAME, ModelCard
from serving.engines import BATCHING, SERVICES, Scorer, load_engine
from serving.metrics import model_metrics


@dataclass(frozen=True)
class ServedModel:
    tag: str  # the model's BentoML tag, as /model-info reports it
    card: ModelCard
    score: Scorer | None  # the engine in this process; None when a model service scores

    @classmethod
    def stored(cls, reference, batching: bool) -> ServedModel:
        """The model a BentoML model ``reference`` (a ``bentoml.models.BentoModel``) names,
        read from the store now, for a front that ``batching`` or runs the engine itself."""
        stored = reference.stored
        if stored is None:
            raise RuntimeError(
                f"no model '{MODEL_NAME}' in BentoML's store: run `dandelion promote` "
                "(or serve a built bento)"
            )
        card = ModelCard.from_metadata(stored.info.metadata)
        check_service(card, batching)  # before loading an engine into the wrong process
        score = None if batching else serving_scorer(stored.path, card.image_size)
        return cls(str(stored.tag), card, score)


def bento_pinned(reference, service):
    """``reference`` (an unversioned ``bentoml.models.BentoModel``) pinned to the model its
    bento was built with, when ``service`` (a ``bentoml.Service``) is served from a bento.

    BentoML resolves an unversioned reference to the store's latest model of that name when it
    serves a bento from the local store (its ``on_load_bento`` pins Hugging Face models only),
    so importing another bento after this one would make this bento serve the other's model
    under its own code and card. From source (``bentoml serve serving.service:...``) there is
    no bento: the store's latest model is meant.
    """
    bento = getattr(service, "bento", None)
    if bento is None:
        return reference
    for info in bento.info.all_models:
        if info.tag.name == reference.tag.name:
            return type(reference)(info.tag)
    raise RuntimeError(f"the bento {bento.tag} lists no model '{reference.tag.name}'")


def check_service(card: ModelCard, batching: bool) -> None:
    """Refuse a card whose engine the other front service serves (engines.py SERVICES)."""
    if BATCHING[card.engine] != batching:
        raise RuntimeError(
            f"the model's engine is {card.engine}: serve {SERVICES[card.engine]} "
            "(bentofile.yaml `service`, as the package stage sets it)"
        )


def serving_scorer(export_dir: str, image_size: int) -> Scorer:
    """The export loaded with its engine, as evaluate loaded it, warmed up, and counting the
    images of each call on /metrics (classifier_model_call_images)."""
    score = load_engine(export_dir)
    # The first call compiles and allocates (TensorFlow: seconds); make it before serving.
    score(np.zeros((1, image_size, image_size, 3), dtype=np.uint8))
    metrics = model_metrics()

    def counted(images: np.ndarray) -> np.ndarray:
        metrics.count_call(len(images))
        return score(images)

    return counted


def deployed_revision(value: str | None) -> tuple[str, bool | None]:
    """The commit named by GIT_REVISION (as `git describe --always --dirty` prints it) and
    whether tracked files differed from it ("-dirty"); ("unknown", None) if it is not set."""
    if not value:
        return "unknown", None
    return value.removesuffix("-dirty"), value.endswith("-dirty")


def served_info(model: ServedModel) -> dict:
    """/model-info: the card (but its upload limits), the batch size, and the deployment.

    Which commit was deployed is not part of the (content-addressed) bento: whoever deploys
    it says so (compose and the Kubernetes overlay pass GIT_REVISION), and whether its work
    tree was dirty, with git's "-dirty" suffix."""
    git_revision, git_dirty = deployed_revision(os.environ.get("GIT_REVISION"))
    card = model.card.to_metadata()
    return {
        "model": model.tag,
        "git_revision": git_revision,
        "git_dirty": git_dirty,
        **{key: value for key, value in card.items() if key != "serve"},
        "max_batch_files": card["serve"]["max_batch_files"],  # the page splits bigger drops
    }
