"""The model's own Prometheus metrics, served on /metrics next to BentoML's request metrics.

BentoML runs prometheus_client in multiprocess mode: each worker writes its samples to files
in ``PROMETHEUS_MULTIPROC_DIR`` and the front's /metrics merges them (in a thread, so a scrape
never blocks a prediction). The worker sets that variable only after importing the service
module, so the metrics are created on first use in a worker, never at import time.

Names follow Prometheus conventions: counters end in ``_total``, units are base units
(seconds, bytes), and a value between 0 and 1 is a ratio. Every series a dashboard or alert
reads is created at start-up (at 0), so a rate is defined before the first request.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from serving.contract import ModelCard
from serving.settings import (
    CONFIDENCE_BUCKETS,
    FEEDBACK_OUTCOMES,
    IMAGES_PER_CALL_BUCKETS,
    NEITHER_LABEL,
    PROCESS_SAMPLE_SECONDS,
    SHADOW_OUTCOMES,
)


@dataclass(frozen=True)
class ModelMetrics:
    predictions: object  # Counter by label
    confidence: object  # Histogram
    rejected: object  # Counter by reason and status
    info: object  # Gauge, 1, labelled with what is being served
    expected_share: object  # Gauge by label and bound: the test split's predicted share
    expected_accuracy: object  # Gauge by model_version and bound: the test split's accuracy
    retries: object  # Counter: calls to the model service made again after a failure
    images_per_call: object  # Histogram: images the engine scored in one call

    def describe(self, card: ModelCard, git_revision: str, rejections: Mapping[str, int]) -> None:
        """Publish what is served, and start every series the dashboards read at 0: each
        label, and each rejection reason with its status (serving/errors.py REJECTIONS)."""
        self.info.labels(card.version, git_revision, card.dvc_md5).set(1)
        positive = card.rule.positive
        self.expected_share.labels(positive, "lower").set(card.test_metrics["positive_share_low"])
        self.expected_share.labels(positive, "upper").set(card.test_metrics["positive_share_high"])
        self.expect_accuracy(card)
        for label in card.classes:
            self.predictions.labels(label)
        for reason, status in rejections.items():
            self.rejected.labels(reason, str(status))

    def expect_accuracy(self, card: ModelCard) -> None:
        """Publish the test split's accuracy interval of ``card``'s model (the champion's, and
        a challenger's beside it), which its production accuracy is compared with."""
        for bound, metric in (("lower", "accuracy_low"), ("upper", "accuracy_high")):
            self.expected_accuracy.labels(card.version, bound).set(card.test_metrics[metric])

    def count_answer(self, verdict: dict) -> None:
        self.predictions.labels(verdict["label"]).inc()
        self.confidence.observe(verdict["confidence"])

    def count_call(self, images: int) -> None:
        self.images_per_call.observe(images)

    def count_retry(self) -> None:
        self.retries.inc()

    def count_rejection(self, reason: str, status: int) -> None:
        self.rejected.labels(reason, str(status)).inc()


@functools.cache
def model_metrics() -> ModelMetrics:
    """The front's metrics, created once per process."""
    from prometheus_client import Counter, Gauge, Histogram

    return ModelMetrics(
        predictions=Counter(
            "classifier_predictions", "Answers given, by predicted label.", ["label"]
        ),
        confidence=Histogram(
            "classifier_prediction_confidence_ratio",
            "Probability of the label returned, per answer.",
            buckets=CONFIDENCE_BUCKETS,
        ),
        rejected=Counter(
            "classifier_rejected_uploads",
            "Requests answered without a prediction, by reason and HTTP status.",
            ["reason", "status"],
        ),
        info=Gauge(
            "classifier_model_info",
            "The model in service: bento version, Git revision deployed, DVC md5 of the model.",
            ["model_version", "git_revision", "dvc_md5"],
            multiprocess_mode="max",
        ),
        expected_share=Gauge(
            "classifier_expected_predicted_share_ratio",
            "95 % interval of the share of answers with this label on the test split.",
            ["label", "bound"],
            multiprocess_mode="max",
        ),
        # By model_version, the label of the feedback counters: the production accuracy of
        # each model served is compared with that model's own bound.
        expected_accuracy=Gauge(
            "classifier_expected_accuracy_ratio",
            "95 % interval of the model's accuracy on the test split.",
            ["model_version", "bound"],
            multiprocess_mode="max",
        ),
        retries=Counter(
            "classifier_model_call_retries",
            "Calls from the HTTP front to the model service repeated after a failure.",
        ),
        images_per_call=Histogram(
            "classifier_model_call_images",
            "Images scored in one engine call: the batch size.",
            buckets=IMAGES_PER_CALL_BUCKETS,
        ),
    )


@dataclass(frozen=True)
class RolloutMetrics:
    """Each model's answers, champion and challenger (served or in shadow), side by side."""

    answers: object  # Counter by model_version, role, mode, label (a class, or neither)
    confidence: object  # Histogram by model_version, role, mode
    scoring: object  # Histogram by model_version, role, mode: engine seconds per call
    errors: object  # Counter by model_version, role, mode: scoring calls that failed
    comparisons: object  # Counter by model_version (the challenger's), outcome
    shed: object  # Counter by model_version: photos the shadow had no room for
    queue: object  # Gauge: photos waiting for the shadow
    challenger: object  # Gauge by model_version, mode: 1 while a challenger is loaded

    def describe(self, card: ModelCard, role: str, mode: str) -> None:
        """Start every series of a model's answers at 0: each label it can answer."""
        for label in (*card.classes, NEITHER_LABEL):
            self.answers.labels(card.version, role, mode, label)
        self.errors.labels(card.version, role, mode)
        self.scoring.labels(card.version, role, mode)
        self.confidence.labels(card.version, role, mode)

    def describe_challenger(self, card: ModelCard, mode: str) -> None:
        self.challenger.labels(card.version, mode).set(1)
        for outcome in SHADOW_OUTCOMES:
            self.comparisons.labels(card.version, outcome)
        self.shed.labels(card.version)
        self.queue.set(0)

    def count_call(self, card: ModelCard, role: str, mode: str, verdicts, seconds: float) -> None:
        """One scoring call of a model, the verdicts it gave and its ``seconds`` per image
        (per_image): observed once per image, so that calls of one photo (the champion's
        /predict) and of several (a batch, the shadow's calls) compare."""
        scoring = self.scoring.labels(card.version, role, mode)
        for verdict in verdicts:
            scoring.observe(seconds)
            label = NEITHER_LABEL if verdict["neither"] else verdict["label"]
            self.answers.labels(card.version, role, mode, label).inc()
            self.confidence.labels(card.version, role, mode).observe(verdict["confidence"])


def per_image(seconds: float, images: int) -> float:
    """A scoring call's ``seconds`` per image, as classifier_model_scoring_seconds and the
    prediction log's ``latency_seconds`` give it."""
    return seconds / max(images, 1)


@functools.cache
def rollout_metrics() -> RolloutMetrics:
    """The per-model metrics (the challenger's rollout), created once per process."""
    from prometheus_client import Counter, Gauge, Histogram

    by_model = ["model_version", "role", "mode"]
    return RolloutMetrics(
        answers=Counter(
            "classifier_model_answers",
            "Answers of each model, by version, role (champion, challenger), mode (served to "
            "the client, or shadow) and label (a class, or neither).",
            [*by_model, "label"],
        ),
        confidence=Histogram(
            "classifier_model_confidence_ratio",
            "Probability of the label each model answered, per answer.",
            by_model,
            buckets=CONFIDENCE_BUCKETS,
        ),
        scoring=Histogram(
            "classifier_model_scoring_seconds",
            "Engine time per image of each model: a scoring call's time over its images, "
            "observed once per image.",
            by_model,
        ),
        errors=Counter(
            "classifier_model_errors",
            "Images each model failed to score (engine error, worker dead, timeout), counted "
            "per image as the answers are.",
            by_model,
        ),
        comparisons=Counter(
            "classifier_shadow_comparisons",
            "Photos the challenger scored in shadow, by its version and whether its answer "
            "(label and neither) agrees with the champion's.",
            ["model_version", "outcome"],
        ),
        shed=Counter(
            "classifier_shadow_shed",
            "Photos not scored in shadow because the shadow's queue was full.",
            ["model_version"],
        ),
        queue=Gauge(
            "classifier_shadow_queue_images",
            "Photos waiting to be scored in shadow.",
            multiprocess_mode="mostrecent",
        ),
        challenger=Gauge(
            "classifier_challenger_info",
            "The challenger loaded beside the champion: its version and mode.",
            ["model_version", "mode"],
            multiprocess_mode="max",
        ),
    )


@functools.cache
def sample_process(service: str) -> threading.Thread:
    """Publish this process's RSS and CPU time every few seconds, labelled ``service``.

    BentoML's multiprocess /metrics has no process collector; this samples the same figures
    (prometheus_client's ProcessCollector, from /proc) for each BentoML service process.
    """
    from prometheus_client import Counter, Gauge
    from prometheus_client.process_collector import ProcessCollector

    rss = Gauge(
        "classifier_process_resident_memory_bytes",
        "Resident memory of the service's process.",
        ["service"],
        multiprocess_mode="mostrecent",
    ).labels(service)
    cpu = Counter(
        "classifier_process_cpu_seconds",
        "CPU time (user and system) of the service's process.",
        ["service"],
    ).labels(service)
    collector = ProcessCollector(registry=None)

    def sample() -> None:
        counted = 0.0
        while True:
            values = {s.name: s.value for f in collector.collect() for s in f.samples}
            if values:  # empty where /proc is missing
                rss.set(values["process_resident_memory_bytes"])
                cpu.inc(values["process_cpu_seconds_total"] - counted)
                counted = values["process_cpu_seconds_total"]
            time.sleep(PROCESS_SAMPLE_SECONDS)

    thread = threading.Thread(target=sample, name=f"process-metrics-{service}", daemon=True)
    thread.start()
    return thread


@dataclass(frozen=True)
class FeedbackMetrics:
    received: object  # Counter by label: feedback accepted (spooled)
    stored: object  # Counter: spool entries put into the store
    flush_failures: object  # Counter: store calls of the flusher that failed
    set_aside: object  # Counter: spool entries unreadable as one, moved to its quarantine
    spool_entries: object  # Gauge: feedback accepted and not yet stored
    spool_bytes: object  # Gauge: their bytes on disk
    answers: object  # Counter by model_version, label answered and outcome (FEEDBACK_OUTCOMES)
    unscored: object  # Counter: feedback accepted without the served model's answer

    def describe(self, labels: list[str], model_version: str) -> None:
        """Start every series the rules and dashboards read at 0: each label given, and each
        label the model served can answer with each outcome."""
        for label in labels:
            self.received.labels(label)
            for outcome in FEEDBACK_OUTCOMES:
                self.answers.labels(model_version, label, outcome)

    def count_answer(self, model_version: str, answered: str, given: str) -> None:
        """A feedback saying ``given`` on a photo the model ``model_version`` answers
        ``answered``: that answer confirmed, or corrected."""
        outcome = FEEDBACK_OUTCOMES[given != answered]
        self.answers.labels(model_version, answered, outcome).inc()

    def spool_depth(self, entries: int, size: int) -> None:
        self.spool_entries.set(entries)
        self.spool_bytes.set(size)


@functools.cache
def feedback_metrics() -> FeedbackMetrics:
    """The feedback's metrics (POST /feedback, the spool), created once per process."""
    from prometheus_client import Counter, Gauge

    return FeedbackMetrics(
        received=Counter(
            "classifier_feedback_received", "Feedback accepted, by label given.", ["label"]
        ),
        stored=Counter("classifier_feedback_stored", "Feedback put into the feedback store."),
        flush_failures=Counter(
            "classifier_feedback_flush_failures",
            "Attempts to put spooled feedback into the store that failed (it stays spooled).",
        ),
        set_aside=Counter(
            "classifier_feedback_set_aside",
            "Spooled feedback that could not be read back, moved to the spool's quarantine.",
        ),
        spool_entries=Gauge(
            "classifier_feedback_spool_entries",
            "Feedback accepted and not yet in the store (on the spool's disk).",
            multiprocess_mode="mostrecent",
        ),
        spool_bytes=Gauge(
            "classifier_feedback_spool_bytes",
            "Bytes of the feedback spool.",
            multiprocess_mode="mostrecent",
        ),
        answers=Counter(
            "classifier_feedback_answers",
            "Feedback on the served model's answer for its photo, by model version, label "
            "answered (a class, or neither) and outcome (confirmed, corrected).",
            ["model_version", "label", "outcome"],
        ),
        unscored=Counter(
            "classifier_feedback_unscored",
            "Feedback accepted without the served model's answer (the model failed or was "
            "too slow): it counts in no outcome.",
        ),
    )


# Why a record never reached the log (serving/prediction_log.py): the buffer was full; the
# record could not be written (not JSON, a disk error); it was deleted from disk to keep the
# bounds before any store had it; or the service stopped before it was written.
PREDICTION_LOG_DROP_REASONS = ("buffer_full", "unwritable", "evicted", "stopped")
# What became of a photo given to the log to keep: kept on disk, or not (no room within the
# bounds, a disk error, or bytes that are not the record's photo_sha256).
PREDICTION_LOG_PHOTO_OUTCOMES = ("kept", "dropped")


@dataclass(frozen=True)
class PredictionLogMetrics:
    records: object  # Counter by outcome: written
    dropped: object  # Counter by reason (PREDICTION_LOG_DROP_REASONS)
    photos: object  # Counter by outcome (PREDICTION_LOG_PHOTO_OUTCOMES)
    uploaded: object  # Counter: files (records, photos) put into the store
    upload_failures: object  # Counter: store calls of the uploader that failed
    disk_files: object  # Gauge: the log's files on disk (records and photos)
    disk_bytes: object  # Gauge: their bytes

    def describe(self) -> None:
        """Start every series at 0."""
        self.records.labels("written")
        for reason in PREDICTION_LOG_DROP_REASONS:
            self.dropped.labels(reason)
        for outcome in PREDICTION_LOG_PHOTO_OUTCOMES:
            self.photos.labels(outcome)

    def on_disk(self, files: int, size: int) -> None:
        self.disk_files.set(files)
        self.disk_bytes.set(size)


@functools.cache
def prediction_log_metrics() -> PredictionLogMetrics:
    """The prediction log's metrics, created once per process."""
    from prometheus_client import Counter, Gauge

    return PredictionLogMetrics(
        records=Counter(
            "classifier_prediction_log_records",
            "Answers written to the prediction log, by outcome.",
            ["outcome"],
        ),
        dropped=Counter(
            "classifier_prediction_log_dropped",
            "Answers the prediction log lost, by reason (buffer_full, unwritable, evicted, "
            "stopped).",
            ["reason"],
        ),
        photos=Counter(
            "classifier_prediction_log_photos",
            "Photos given to the prediction log to keep, by outcome (kept, dropped).",
            ["outcome"],
        ),
        uploaded=Counter(
            "classifier_prediction_log_uploaded_files",
            "Files of the prediction log (closed record files, photos) put into its store.",
        ),
        upload_failures=Counter(
            "classifier_prediction_log_upload_failures",
            "Attempts to put the prediction log's files into its store that failed (they stay "
            "on disk, within its bounds, and are tried again).",
        ),
        disk_files=Gauge(
            "classifier_prediction_log_disk_files",
            "Files of the prediction log on disk (records and kept photos).",
            multiprocess_mode="mostrecent",
        ),
        disk_bytes=Gauge(
            "classifier_prediction_log_disk_bytes",
            "Bytes of the prediction log on disk (records and kept photos).",
            multiprocess_mode="mostrecent",
        ),
    )
