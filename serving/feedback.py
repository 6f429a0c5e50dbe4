"""Feedback on an answer (POST /feedback): the photo, the right label, and what it corrects.

A feedback carries the photo itself, in the multipart field `image` (checked by the upload
rules of /predict: it must be a photo /predict would answer), and the text fields
FEEDBACK_FIELDS: `label` (one of the model's classes, or NEITHER_LABEL), and optionally the
`answer_id` and `model_version` of the answer it corrects, and a bounded `comment`. The
service keys it by the photo's sha256: the same photo with the same label is one record (the
latest wins), with another label another record (both kept, for the review to settle).

The photo is also scored by the served model, exactly as /predict scores it (the same
decoding, engine call and decision rule, "neither" included): the model is deterministic, so
that is the answer it gives, or gave, for this photo. The record keeps that answer
(``served_label``, a class or NEITHER_LABEL, and ``served_confidence``), and /metrics counts
it confirmed or corrected (classifier_feedback_answers_total), under the served model's
version, whatever ``model_version`` the feedback quotes. A feedback whose photo cannot be
scored (the Keras engine's model service down or too slow) is accepted all the same, its
served fields null, and counted unscored. With a challenger beside the champion (shadow or
canary), its answer for the photo is counted too, under its own version: the two models'
production accuracy, paired on the same photos.

Accepted means spooled on disk (serving/spool.py), answered 202; the flusher puts it into
the store. Feedback is never trusted: it enters training only after review (issue 24).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import os
import uuid
from collections.abc import Awaitable, Callable

import anyio
import numpy as np
from starlette.datastructures import FormData
from starlette.requests import Request

from serving.admission import Admission
from serving.api import rounded
from serving.contract import NOVELTY, PROBABILITY, ModelCard
from serving.decoding import decoded, held
from serving.errors import Rejection
from serving.metrics import feedback_metrics
from serving.settings import (
    FEEDBACK_FIELDS,
    FEEDBACK_SCORING_SECONDS,
    IMAGE_FIELD,
    MAX_COMMENT_CHARS,
    MAX_MODEL_VERSION_CHARS,
    NEITHER_LABEL,
    SHUTDOWN_FLUSH_SECONDS,
    SPOOL_FULL_RETRY_AFTER_SECONDS,
)
from serving.spool import Flusher, Spool, SpoolFull, pack
from serving.stores import feedback_config
from serving.uploads import Pace, Upload

logger = logging.getLogger("bentoml.service.dandelion")

# The front's scoring: the model's outputs (contract: PROBABILITY, NOVELTY) for uint8 images.
Scores = Callable[[np.ndarray], Awaitable[np.ndarray]]


def text_fields(form: FormData, labels: tuple[str, ...]) -> dict[str, str | None]:
    """The feedback's text fields, checked: each of FEEDBACK_FIELDS (None if not sent)."""
    unknown = sorted(set(form.keys()) - {IMAGE_FIELD, *FEEDBACK_FIELDS})
    if unknown:
        raise Rejection(
            "unknown_field",
            f"unknown fields {unknown}: a feedback takes '{IMAGE_FIELD}' and "
            f"{list(FEEDBACK_FIELDS)}",
        )
    fields = {}
    for name in FEEDBACK_FIELDS:
        values = form.getlist(name)
        if len(values) > 1 or not all(isinstance(value, str) for value in values):
            raise Rejection("unknown_field", f"the field '{name}' takes one text value")
        fields[name] = values[0] if values else None
    if fields["label"] not in labels:
        raise Rejection(
            "bad_label",
            f"the field 'label' must be one of {list(labels)} (got {fields['label']!r})",
        )
    if fields["answer_id"] is not None:
        try:
            fields["answer_id"] = str(uuid.UUID(fields["answer_id"]))
        except ValueError:
            raise Rejection(
                "bad_answer_id", "the field 'answer_id' must be an answer's answer_id (a UUID)"
            ) from None
    if fields["model_version"] is not None and len(fields["model_version"]) > (
        MAX_MODEL_VERSION_CHARS
    ):
        raise Rejection(
            "model_version_too_long",
            f"the field 'model_version' has {len(fields['model_version'])} characters: "
            f"at most {MAX_MODEL_VERSION_CHARS}",
        )
    if fields["comment"] is not None and len(fields["comment"]) > MAX_COMMENT_CHARS:
        raise Rejection(
            "comment_too_long",
            f"the comment has {len(fields['comment'])} characters: at most {MAX_COMMENT_CHARS}",
        )
    return fields


class FeedbackDesk:
    """Takes a front's feedback (``receive``) and keeps it until stored: its spool and
    flusher, made for ``card`` with the deployment's configuration (``environ``); ``scores``
    is how the front scores photos for /predict."""

    def __init__(self, card: ModelCard, upload: Upload, scores: Scores, environ=os.environ) -> None:
        # /predict's upload rules, but not its advice to send several photos to /predict_batch.
        self.card, self.upload = card, dataclasses.replace(upload, hint=" (one per feedback)")
        self.scores = scores
        self.challenger: tuple[ModelCard, Scores] | None = None
        self.labels = (*card.classes, NEITHER_LABEL)
        self.config = feedback_config(environ)
        self.metrics = feedback_metrics()
        self.metrics.describe(list(self.labels), card.version)
        self.spool = Spool(self.config.spool_dir, on_change=self.metrics.spool_depth)
        self.flusher = Flusher(
            self.spool,
            self.config.store(),
            on_stored=self.metrics.stored.inc,
            on_failure=self.metrics.flush_failures.inc,
            on_set_aside=self.metrics.set_aside.inc,
        )

    def add_challenger(self, card: ModelCard, scores: Scores) -> None:
        """Count the answers of the challenger of ``card`` (scored by ``scores``) as well."""
        self.challenger = card, scores
        self.metrics.describe(list(self.labels), card.version)

    def start(self) -> None:
        self.flusher.start()

    def stop(self, within: float = SHUTDOWN_FLUSH_SECONDS) -> None:
        self.flusher.stop(min(within, SHUTDOWN_FLUSH_SECONDS))

    async def receive(self, request: Request, admission: Admission, pace: Pace) -> dict:
        """Spool a feedback read from ``request`` (durably, before the answer), or Rejection."""
        async with admission.accepted(request.headers, self.upload):
            async with self.upload.form(request, pace) as form:
                (file,) = self.upload.files(form)
                return await self.take(form, file.filename, await file.read())

    async def take(self, form: FormData, filename: str, photo: bytes) -> dict:
        """Spool the feedback of ``form``'s text fields on ``photo`` (durably, before the
        answer): its receipt, or Rejection. For POST /feedback and its typed twin."""
        fields = text_fields(form, self.labels)

        # Checked as /predict checks it: feedback is on photos the service would answer.
        images = await decoded([held(filename, photo)], self.card.image_size, self.upload.limits)
        served = await self.served_answer(np.stack(images))
        sha256 = hashlib.sha256(photo).hexdigest()
        record = {
            **fields,
            "photo_sha256": sha256,
            "filename": filename,
            "served_model_version": self.card.version,
            "served_label": served["label"] if served else None,
            "served_confidence": served["confidence"] if served else None,
            "received_at": datetime.datetime.now(datetime.UTC).isoformat(),
        }
        await self.spooled(f"{sha256}.{fields['label']}", pack(record, photo))
        # Counted once accepted: a feedback refused (spool full) counts nowhere.
        self.metrics.received.labels(fields["label"]).inc()
        if served is None:
            self.metrics.unscored.inc()
        else:
            self.metrics.count_answer(self.card.version, served["label"], fields["label"])
        if self.challenger is not None:
            card, scores = self.challenger
            theirs = await self.served_answer(np.stack(images), card, scores)
            if theirs is not None:
                self.metrics.count_answer(card.version, theirs["label"], fields["label"])
        self.flusher.wake()
        return {"photo_sha256": sha256, "label": fields["label"], "answer_id": fields["answer_id"]}

    async def served_answer(
        self, images: np.ndarray, card: ModelCard | None = None, scores: Scores | None = None
    ) -> dict | None:
        """The served model's answer (or ``card``'s, scored by ``scores``) for the one photo
        of ``images``, as /predict gives it: ``label`` (NEITHER_LABEL when it says neither)
        and ``confidence``; None if the model fails or takes longer than
        FEEDBACK_SCORING_SECONDS (logged, never the feedback's fault)."""
        card, scores = card or self.card, scores or self.scores
        try:
            with anyio.fail_after(FEEDBACK_SCORING_SECONDS):
                (outputs,) = await scores(images)
        except Exception as error:  # the model service down or overloaded, an engine failure
            logger.warning("feedback: model %s failed to score (%r)", card.version, error)
            return None
        rule = card.rule
        verdict = rounded(
            rule.verdict(float(outputs[PROBABILITY]), float(outputs[NOVELTY])), rule.positive
        )
        label = NEITHER_LABEL if verdict["neither"] else verdict["label"]
        return {"label": label, "confidence": verdict["confidence"]}

    async def spooled(self, name: str, entry: bytes) -> None:
        try:
            await anyio.to_thread.run_sync(self.spool.add, name, entry)
        except SpoolFull as full:
            raise Rejection(
                "feedback_spool_full",
                f"{full}: feedback cannot be accepted now, retry later",
                retry_after=SPOOL_FULL_RETRY_AFTER_SECONDS,
            ) from None
        except OSError as error:
            raise Rejection(
                "feedback_not_stored", f"the feedback could not be written to disk: {error}"
            ) from None
