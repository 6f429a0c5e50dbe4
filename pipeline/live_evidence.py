"""Live evidence for promotion: how a challenger did beside the champion in production, and
whether that is good enough to make it champion (``dandelion promote --live``).

The evidence comes from one of two sources, over the last ``promote.live.window``:

- Prometheus's HTTP API (``prometheus_evidence``): instant queries of ``increase(...[window])``
  over the service's per-model metrics (docs/serving.md, *Challenger: shadow and canary*);
- the prediction log (``log_evidence``): its JSON-lines records, one per model answer.

``decide`` is pure: every check with its measured value, its bound and whether it passed, and
the decision in one readable table (docs/pipeline.md, *Promotion on live evidence*). A check
that the source cannot measure (the log records no failures, no feedback; a canary period
has no shadow comparisons) is shown as not measured and does not decide.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import requests

from pipeline.intervals import wilson
from pipeline.params import LivePromoteParams, duration_seconds
from pipeline.stage import StageError
from serving.settings import (
    AGREE,
    CHALLENGER,
    CHAMPION,
    DISAGREE,
    FEEDBACK_OUTCOMES,
    SERVED_MODE,
    SHADOW,
)

# The service's per-model metrics (serving/metrics.py), whose labels' values are settings'.
ANSWERS = "classifier_model_answers_total"
ERRORS = "classifier_model_errors_total"
SCORING = "classifier_model_scoring_seconds"
COMPARISONS = "classifier_shadow_comparisons_total"
FEEDBACK = "classifier_feedback_answers_total"
SERVED = SERVED_MODE
CONFIRMED, CORRECTED = FEEDBACK_OUTCOMES

# Where `dandelion promote --live prometheus` asks, unless --prometheus-url says otherwise.
PROMETHEUS_URL_ENV = "PROMETHEUS_URL"
DEFAULT_PROMETHEUS_URL = "http://localhost:9090"
PROMETHEUS, LOG = "prometheus", "log"  # the sources of `--live`

QUANTILE = 0.95  # the latency compared: p95 of the scoring time
PROMETHEUS_TIMEOUT_SECONDS = 30  # a query over a day of a few series answers well within it


class LiveEvidenceError(StageError):
    """The evidence cannot be read; the message says where and why."""


@dataclass(frozen=True)
class ModelEvidence:
    """One model's answers in the window, as champion or challenger."""

    version: str
    role: str
    answers: dict[str, int]  # by mode (served, shadow)
    errors: int | None  # failed scoring calls; None: the source does not record them
    p95_seconds: float | None  # of its scoring time; None: nothing observed
    feedback: dict[str, int] | None  # by outcome (confirmed, corrected); None: not recorded

    @property
    def total(self) -> int:
        return sum(self.answers.values())

    @property
    def error_rate(self) -> float | None:
        """Failed scoring calls per call tried (answers + failures)."""
        if self.errors is None or self.total + self.errors == 0:
            return None
        return self.errors / (self.total + self.errors)


@dataclass(frozen=True)
class Evidence:
    source: str  # where it was read: the Prometheus URL or the log's location
    window: str
    champion: ModelEvidence
    challenger: ModelEvidence
    comparisons: dict[str, int]  # shadow comparisons by outcome (agree, disagree)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Check:
    name: str
    measured: str  # the value, as the table shows it
    bound: str
    passed: bool | None  # None: not measured by this source, does not decide
    reason: str


@dataclass(frozen=True)
class Decision:
    checks: list[Check]
    evidence: Evidence
    thresholds: LivePromoteParams

    @property
    def passed(self) -> bool:
        return all(check.passed is not False for check in self.checks)

    @property
    def refused(self) -> list[Check]:
        return [check for check in self.checks if check.passed is False]

    def table(self) -> str:
        """The checks, one a line, aligned: what was measured, against what, and the verdict."""
        rows = [("check", "measured", "bound", "result", "")]
        verdicts = {True: "pass", False: "FAIL", None: "not measured"}
        rows += [(c.name, c.measured, c.bound, verdicts[c.passed], c.reason) for c in self.checks]
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        return "\n".join(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip()
            + (f"  {row[4]}" if row[4] else "")
            for row in rows
        )

    def summary(self) -> str:
        champion, challenger = self.evidence.champion, self.evidence.challenger
        verdict = "supports" if self.passed else "does not support"
        return (
            f"live evidence ({self.evidence.source}, last {self.evidence.window}) {verdict} "
            f"promoting challenger {challenger.version} over champion {champion.version}"
        )

    def metrics(self) -> dict[str, float]:
        """The measured numbers, as MLflow metrics (``live_...``); those not measured left out."""
        numbers = {}
        for model in (self.evidence.champion, self.evidence.challenger):
            feedback = model.feedback or {}
            numbers |= {
                f"live_{model.role}_answers": model.total,
                f"live_{model.role}_p95_seconds": model.p95_seconds,
                f"live_{model.role}_error_rate": model.error_rate,
                f"live_{model.role}_accuracy": feedback.get(CONFIRMED, 0) / sum(feedback.values())
                if sum(feedback.values())
                else None,
            }
        compared = sum(self.evidence.comparisons.values())
        numbers["live_agreement"] = (
            self.evidence.comparisons.get(AGREE, 0) / compared if compared else None
        )
        return {name: float(value) for name, value in numbers.items() if value is not None}

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "summary": self.summary(),
            "checks": [dataclasses.asdict(check) for check in self.checks],
            "evidence": self.evidence.to_dict(),
            "thresholds": self.thresholds.to_dict(),
        }


@dataclass(frozen=True)
class LiveSource:
    """Where the evidence is read: ``prometheus`` and its URL, or ``log`` and its location."""

    kind: str
    location: str

    def evidence(self, champion: str, challenger: str, window: str) -> Evidence:
        if self.kind == PROMETHEUS:
            return prometheus_evidence(self.location, champion, challenger, window)
        return log_evidence(read_log(self.location), self.location, champion, challenger, window)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f} ms"


def decide(evidence: Evidence, thresholds: LivePromoteParams) -> Decision:
    """Every check of the live gate on ``evidence``: enough answers from both models, the
    shadow agreement, the p95 scoring time, the error rate and the production accuracy."""
    champion, challenger = evidence.champion, evidence.challenger
    need = thresholds.min_answers
    checks = [
        Check(
            f"{model.role} answers",
            f"{model.total} ({', '.join(f'{n} {mode}' for mode, n in model.answers.items())})",
            f">= {need}",
            model.total >= need,
            "" if model.total >= need else f"too few answers of {model.version} in the window",
        )
        for model in (champion, challenger)
    ]
    checks.append(agreement_check(evidence, thresholds))
    checks.append(latency_check(champion, challenger, thresholds.latency_tolerance))
    checks.append(error_check(evidence, thresholds.error_tolerance))
    checks.append(accuracy_check(champion, challenger, thresholds))
    return Decision(checks, evidence, thresholds)


def agreement_check(evidence: Evidence, thresholds: LivePromoteParams) -> Check:
    agree, disagree = (evidence.comparisons.get(o, 0) for o in (AGREE, DISAGREE))
    bound = f">= {thresholds.min_agreement}"
    if agree + disagree == 0:
        if evidence.challenger.answers.get(SHADOW, 0):
            return Check(
                "agreement", "no comparisons", bound, False, "shadow answers, none compared"
            )
        return Check(
            "agreement", "-", bound, None, "no shadow answers (a canary period compares none)"
        )
    share = agree / (agree + disagree)
    passed = share >= thresholds.min_agreement
    return Check(
        "agreement",
        f"{share:.4f} ({agree} of {agree + disagree})",
        bound,
        passed,
        "" if passed else "the challenger answers differently too often",
    )


def latency_check(champion: ModelEvidence, challenger: ModelEvidence, tolerance: float) -> Check:
    """The served answers' scoring time per image. A shadow's is not compared: it runs at the
    lowest CPU priority, so on a busy service its time counts the waits for a core too, and
    it is measured only once the challenger answers clients (canary)."""
    name = f"p{round(QUANTILE * 100)} scoring time"
    if challenger.p95_seconds is None and challenger.answers.get(SHADOW):
        return Check(
            name,
            "-",
            f"<= champion's x {1 + tolerance:g}",
            None,
            "a shadow's time is not compared (lowest CPU priority): measured in canary",
        )
    if champion.p95_seconds is None or challenger.p95_seconds is None:
        missing = [m.role for m in (champion, challenger) if m.p95_seconds is None]
        return Check(
            name,
            f"{_seconds(challenger.p95_seconds)} vs {_seconds(champion.p95_seconds)}",
            f"<= champion's x {1 + tolerance:g}",
            False,
            f"no scoring time observed for the {' and '.join(missing)}",
        )
    bound = champion.p95_seconds * (1 + tolerance)
    passed = challenger.p95_seconds <= bound
    return Check(
        name,
        f"{_seconds(challenger.p95_seconds)} (champion {_seconds(champion.p95_seconds)})",
        f"<= {_seconds(bound)}",
        passed,
        "" if passed else "the challenger is slower",
    )


def error_check(evidence: Evidence, tolerance: float) -> Check:
    champion, challenger = evidence.champion, evidence.challenger
    if champion.errors is None or challenger.errors is None:
        return Check(
            "error rate", "-", "-", None, f"{evidence.source} does not record failed calls"
        )
    bound = (champion.error_rate or 0.0) + tolerance
    rate = challenger.error_rate or 0.0
    passed = rate <= bound
    return Check(
        "error rate",
        f"{rate:.4f} ({challenger.errors} failed; champion {_share(champion.error_rate)})",
        f"<= {bound:.4f}",
        passed,
        "" if passed else "the challenger fails more often",
    )


def accuracy_check(
    champion: ModelEvidence, challenger: ModelEvidence, thresholds: LivePromoteParams
) -> Check:
    """Production accuracy from feedback: refused when the champion's accuracy is above the
    challenger's 95 % Wilson upper bound, that is when the challenger is worse beyond what
    its feedback count can tell apart."""
    name = "production accuracy"
    if not thresholds.production_accuracy:
        return Check(name, "-", "-", None, "off (promote.live.production_accuracy: false)")
    if champion.feedback is None or challenger.feedback is None:
        return Check(name, "-", "-", None, "the source does not record feedback")
    counts = {
        m.role: (m.feedback.get(CONFIRMED, 0), sum(m.feedback.values()))
        for m in (champion, challenger)
    }
    short = [role for role, (_, n) in counts.items() if n < thresholds.min_feedback]
    measured = " vs ".join(f"{role} {k}/{n}" for role, (k, n) in counts.items())
    if short:
        return Check(
            name,
            measured,
            f">= {thresholds.min_feedback} feedback each",
            False,
            f"too little feedback on the {' and '.join(short)}'s answers",
        )
    confirmed, total = counts[CHAMPION]
    champion_accuracy = confirmed / total
    interval = wilson(*counts[CHALLENGER])
    low, high = float(interval.low), float(interval.high)
    challenger_accuracy = counts[CHALLENGER][0] / counts[CHALLENGER][1]
    passed = champion_accuracy <= high
    return Check(
        name,
        f"{challenger_accuracy:.4f} [{low:.4f}, {high:.4f}] (champion {champion_accuracy:.4f})",
        "champion's <= challenger's upper bound",
        passed,
        "" if passed else "the challenger is less accurate in production",
    )


# --- Prometheus ------------------------------------------------------------------------------


def prometheus_queries(champion: str, challenger: str, window: str) -> dict[str, str]:
    """The PromQL of the evidence, each an instant query: name -> expression. Replicas and
    jobs are summed; a model is selected by its version and role."""
    models = {CHAMPION: champion, CHALLENGER: challenger}
    queries = {}
    for role, version in models.items():
        selector = f'model_version="{version}", role="{role}"'
        queries[f"{role}_answers"] = f"sum by (mode) (increase({ANSWERS}{{{selector}}}[{window}]))"
        queries[f"{role}_errors"] = f"sum(increase({ERRORS}{{{selector}}}[{window}]))"
        queries[f"{role}_p95"] = (  # served answers only: see latency_check
            f"histogram_quantile({QUANTILE}, sum by (le) "
            f'(increase({SCORING}_bucket{{{selector}, mode="{SERVED}"}}[{window}])))'
        )
        queries[f"{role}_feedback"] = (
            f'sum by (outcome) (increase({FEEDBACK}{{model_version="{version}"}}[{window}]))'
        )
    queries["comparisons"] = (
        f'sum by (outcome) (increase({COMPARISONS}{{model_version="{challenger}"}}[{window}]))'
    )
    return queries


def query(url: str, expr: str, at: float | None = None) -> list[dict]:
    """The result of the instant query ``expr`` at ``url``, evaluated at the Unix time ``at``
    (default: now); LiveEvidenceError if it fails."""
    try:
        response = requests.get(
            f"{url.rstrip('/')}/api/v1/query",
            params={"query": expr, **({} if at is None else {"time": at})},
            timeout=PROMETHEUS_TIMEOUT_SECONDS,
        )
    except requests.RequestException as error:
        raise LiveEvidenceError(
            f"Prometheus at {url} cannot be reached ({type(error).__name__}): start it, or "
            "point --prometheus-url (or PROMETHEUS_URL) at the one that scrapes the service"
        ) from None
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code != 200 or body.get("status") != "success":
        raise LiveEvidenceError(
            f"Prometheus at {url} answered {response.status_code} to {expr}: "
            f"{body.get('error') or response.text[:200]}"
        )
    return body["data"]["result"]


def _counts(result: list[dict], label: str) -> dict[str, int]:
    """``sum by (label)`` results as whole counts: increase() extrapolates to the window's
    edges, so a counter's growth reads a little off a whole number."""
    return {
        series["metric"].get(label, ""): round(float(series["value"][1]))
        for series in result
        if math.isfinite(float(series["value"][1]))
    }


def _scalar(result: list[dict]) -> float | None:
    values = [float(series["value"][1]) for series in result]
    return values[0] if values and math.isfinite(values[0]) else None


def prometheus_evidence(
    url: str, champion: str, challenger: str, window: str, at: float | None = None
) -> Evidence:
    """The evidence for ``challenger`` served beside ``champion`` (model versions), from the
    Prometheus at ``url``, over the ``window`` before the Unix time ``at`` (default: now)."""
    queries = prometheus_queries(champion, challenger, window)
    results = {name: query(url, expr, at) for name, expr in queries.items()}
    models = {}
    for role, version in ((CHAMPION, champion), (CHALLENGER, challenger)):
        if not results[f"{role}_answers"]:
            raise LiveEvidenceError(
                f"Prometheus at {url} has no {ANSWERS} series for version {version} as {role} "
                f"in the last {window}; it has: {served_versions(url, window, at)}. "
                + (
                    f"Serve it beside the champion first (CHALLENGER={version}, "
                    "docs/serving.md), for at least the window"
                    if role == CHALLENGER
                    else "Is this the Prometheus that scrapes the service?"
                )
            )
        feedback = _counts(results[f"{role}_feedback"], "outcome")
        models[role] = ModelEvidence(
            version=version,
            role=role,
            answers=_counts(results[f"{role}_answers"], "mode"),
            errors=round(_scalar(results[f"{role}_errors"]) or 0.0),
            p95_seconds=_scalar(results[f"{role}_p95"]),
            feedback={outcome: feedback.get(outcome, 0) for outcome in FEEDBACK_OUTCOMES},
        )
    comparisons = _counts(results["comparisons"], "outcome")
    return Evidence(
        source=f"Prometheus {url}",
        window=window,
        champion=models[CHAMPION],
        challenger=models[CHALLENGER],
        comparisons={outcome: comparisons.get(outcome, 0) for outcome in (AGREE, DISAGREE)},
    )


def served_versions(url: str, window: str, at: float | None) -> str:
    """The (version, role) pairs with answers in the window, for an error message."""
    expr = f"group by (model_version, role) (last_over_time({ANSWERS}[{window}]))"
    result = query(url, expr, at)
    pairs = sorted(
        f"{series['metric'].get('model_version')} as {series['metric'].get('role')}"
        for series in result
    )
    return ", ".join(pairs) or "none"


# --- the prediction log ----------------------------------------------------------------------


def read_log(location: str, environ: Mapping[str, str] = os.environ) -> Iterator[dict]:
    """Every record of the prediction log at ``location`` (its directory, or
    ``s3://bucket/prefix``; serving/prediction_log.py), its time parsed."""
    from serving.prediction_log import read_records

    try:
        for record in read_records(location, environ):
            yield parse_time(record, location)
    except (FileNotFoundError, ValueError) as error:
        raise LiveEvidenceError(
            f"the prediction log at {location} cannot be read: {error}"
        ) from None


def parse_time(record: dict, location: str) -> dict:
    """``record`` with its time as a datetime; a record without a UTC time is an error."""
    try:
        time = datetime.fromisoformat(record["time"])
    except (KeyError, TypeError, ValueError):
        time = None
    if time is None or time.tzinfo is None:
        raise LiveEvidenceError(
            f"the prediction log at {location} has a record without a UTC time: {record}"
        )
    return {**record, "time": time}


def log_evidence(
    records: Iterable[dict],
    source: str,
    champion: str,
    challenger: str,
    window: str,
    now: datetime | None = None,
) -> Evidence:
    """The evidence from prediction-log records (the issue-25 record, one per model answer):
    those of the last ``window`` before ``now``. Agreement joins each shadow answer to the
    champion's answer it shadows (``answer_id``): same label and same "neither" flag."""
    since = (now or datetime.now(UTC)) - timedelta(seconds=duration_seconds(window))
    roles = {CHAMPION: champion, CHALLENGER: challenger}
    answers = {role: {SERVED: 0, SHADOW: 0} for role in roles}
    latencies = {role: [] for role in roles}
    champion_answers, shadow_answers = {}, []
    for record in records:
        role = record.get("role")
        if record["time"] < since or roles.get(role) != record.get("model_version"):
            continue
        shadow = bool(record.get("shadow"))
        answers[role][SHADOW if shadow else SERVED] += 1
        if not shadow:  # served answers only: see latency_check
            try:
                latencies[role].append(float(record["latency_seconds"]))
            except (KeyError, TypeError, ValueError):
                raise LiveEvidenceError(
                    f"the prediction log at {source} has a record of answer "
                    f"{record.get('answer_id')} without a number in latency_seconds"
                ) from None
        answer = (record.get("label"), bool(record.get("neither")))
        if role == CHAMPION:
            champion_answers[record.get("answer_id")] = answer
        elif shadow:
            shadow_answers.append((record.get("answer_id"), answer))
    comparisons = {AGREE: 0, DISAGREE: 0}
    for answer_id, answer in shadow_answers:
        if answer_id in champion_answers:  # its champion answer may be just out of the window
            comparisons[AGREE if champion_answers[answer_id] == answer else DISAGREE] += 1
    if not any(answers[CHALLENGER].values()):
        raise LiveEvidenceError(
            f"the prediction log at {source} has no answer of version {challenger} as "
            f"challenger in the last {window}: serve it beside the champion first "
            f"(CHALLENGER={challenger}, docs/serving.md)"
        )
    models = {
        role: ModelEvidence(
            version=version,
            role=role,
            answers=answers[role],
            errors=None,  # a failed call leaves no record
            p95_seconds=float(np.quantile(latencies[role], QUANTILE)) if latencies[role] else None,
            feedback=None,  # feedback is kept in the feedback store, not in the log
        )
        for role, version in roles.items()
    }
    return Evidence(
        source=f"prediction log {source}",
        window=window,
        champion=models[CHAMPION],
        challenger=models[CHALLENGER],
        comparisons=comparisons,
    )
