"""Promotion: register the evaluated bento's model in MLflow if it beats the champion, and deploy
the champion's bento to BentoML's store. Run it after ``dvc repro``: ``dandelion promote``.

It is deliberately not a DVC stage: the MLflow Model Registry and BentoML's store are state
outside Git and DVC, and what ``dvc repro`` produces must not depend on them.

1. Refuses to run unless the pipeline is up to date (``dvc status`` is clean), so the model,
   its test metrics and the bento archive belong together.
2. Finds the MLflow run that trained the model (tag ``model_sha256``). The model is
   registered as ``dandelion-vs-grass`` and the alias ``champion`` moved to it only if its
   test ``promote.metric`` beats the champion's by more than ``promote.min_improvement``. The
   registered version carries the bento's tag, the model's DVC md5, the Git revision, the
   test metrics and the test set's digest as tags (the production test metrics too, for
   information), and the bento archive is logged to the run (``bento/``), so any machine can
   deploy the champion.

   Test metrics are compared only on the same test set: the original photos' ``test`` split,
   identified by ``test_set_sha256`` (pipeline/splits.py ``split_digest``). A candidate tested
   on another set than the champion's (or a champion without the tag) stops promotion with
   both digests, unless ``different_test_set`` (``dandelion promote --different-test-set``)
   accepts promoting it without comparison, which its version records in the tag
   ``promoted_without_comparison``. The production test metrics are never compared: that set
   grows with every reviewed photo, so two models' numbers on it are on different photos.
   With ``--live prometheus|log`` (``live``), the test gate is not enough: the candidate must
   first have been served as challenger beside the champion, and its live evidence
   (pipeline/live_evidence.py, thresholds ``promote.live``) must pass every check. That
   gate comes first: a refusal stops promotion with the checks table, whatever the test
   metrics say; evidence that passes still leaves the decision to the test gate. Both
   decisions are recorded: the live one on the candidate's run (``live_evidence/`` artifact,
   ``live_*`` metrics and tags), and on the registered version when it is promoted.
3. Deploys the champion: imports its bento into BentoML's store (``$BENTOML_HOME``) and makes
   it what ``bentoml serve dandelion-vs-grass:latest`` serves.

Running it again changes nothing.
"""

from __future__ import annotations

import json
import logging
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from pipeline import bentoml_store
from pipeline.bento import bento_version_of, included_files, model_card
from pipeline.live_evidence import Decision, LiveSource, decide
from pipeline.logs import dropped
from pipeline.params import LivePromoteParams, PromoteParams
from pipeline.splits import PRODUCTION_TEST, TEST, read_split, split_digest
from pipeline.stage import StageError
from pipeline.tracking import (
    MODEL_SHA256_TAG,
    is_refused_login,
    login_errors,
    training_run,
    use_project_store,
)
from serving.contract import MODEL_FILE, MODEL_NAME

CHAMPION = "champion"
BENTO_TAG = "bento"  # registered version tag: the version of the bento that ships it
BENTO_ARTIFACTS = "bento"  # run artifact folder holding the bento archive
TEST_SET_TAG = "test_set_sha256"  # registered version tag: the test split its metrics are on
WITHOUT_COMPARISON_TAG = "promoted_without_comparison"  # why its metrics were not compared
LIVE_ARTIFACTS = "live_evidence"  # run artifact folder: each live decision, as JSON
LIVE_DECISION_TAG = "live_decision"  # run tag: passed or refused (the latest decision)
LIVE_EVIDENCE_TAG = "live_evidence"  # run and registered version tag: that decision's artifact


class PromotionError(StageError):
    """Promotion cannot go ahead; the message says what to do."""


def is_registration_notice(record: logging.LogRecord) -> bool:
    """MLflow 3 keeps a model logged with log_model(name="model") apart from its run's
    artifacts, so registering runs:/<run id>/model finds no artifacts there and registers that
    logged model (models:/m-...) instead: exactly the model meant, but announced as a WARNING
    that reads like a failure. Only that message is dropped; MLflow's other warnings show."""
    return "has no artifacts at artifact path 'model'" in record.getMessage()


def current_champion(client: MlflowClient, name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as error:  # no registered model or no alias yet
        if is_refused_login(error):  # not "no champion": the server did not say
            raise
        return None


def promote_if_better(
    client: MlflowClient,
    name: str,
    run_id: str,
    bento_version: str,
    test_metrics: dict,
    test_set: str,
    gate: PromoteParams,
    tags: dict[str, str],
    different_test_set: bool = False,
) -> tuple[ModelVersion, bool]:
    """The champion after the gate, and whether ``run_id``'s model just became it.

    A candidate is identified by its bento version (model, decision threshold and service
    code together); promoting the champion's own bento again changes nothing. Its
    ``test_metrics`` are compared with the champion's only if both were measured on the test
    set whose digest is ``test_set``; otherwise a PromotionError, unless
    ``different_test_set`` promotes it without comparison.
    """
    candidate = float(test_metrics[gate.metric])
    champion = current_champion(client, name)
    unconfirmed = {}
    if champion is not None:
        if champion.tags.get(BENTO_TAG) == bento_version:
            return champion, False
        champion_set = champion.tags.get(TEST_SET_TAG) or "none recorded"
        if champion_set != test_set:
            if not different_test_set:
                raise PromotionError(
                    f"the champion (version {champion.version}) was tested on test set "
                    f"{champion_set}, this model on test set {test_set}: their test metrics "
                    "are not comparable. Promote it without comparing them with "
                    "`dandelion promote --different-test-set` (recorded on the version)"
                )
            unconfirmed[WITHOUT_COMPARISON_TAG] = (
                f"champion version {champion.version} was tested on test set {champion_set}"
            )
        elif candidate <= float(champion.tags[f"test_{gate.metric}"]) + gate.min_improvement:
            return champion, False
    with dropped("mlflow.tracking._model_registry.fluent", is_registration_notice):
        version = mlflow.register_model(
            f"runs:/{run_id}/model",
            name,
            tags={
                **tags,
                **unconfirmed,
                BENTO_TAG: bento_version,
                TEST_SET_TAG: test_set,
                **{f"test_{key}": str(value) for key, value in test_metrics.items()},
            },
        )
    client.set_registered_model_alias(name, CHAMPION, version.version)
    return client.get_model_version(name, version.version), True


def live_gate(
    client: MlflowClient,
    name: str,
    run_id: str,
    candidate: str,
    source: LiveSource,
    thresholds: LivePromoteParams,
) -> tuple[Decision, str] | None:
    """The live evidence of the bento version ``candidate`` served as challenger beside the
    champion, decided and logged to the run ``run_id`` (the decision, and its artifact's path
    in the run); PromotionError with the checks table when it does not support promoting it.
    None when the candidate is already champion: there is nothing to prove."""
    champion = current_champion(client, name)
    if champion is not None and champion.tags.get(BENTO_TAG) == candidate:
        return None
    if champion is None:
        raise PromotionError(
            "there is no champion yet: live evidence compares a challenger with the champion "
            "it would replace; promote the first model without --live"
        )
    evidence = source.evidence(champion.tags[BENTO_TAG], candidate, thresholds.window)
    decision = decide(evidence, thresholds)
    path = log_decision(client, run_id, decision)
    if not decision.passed:
        raise PromotionError(f"{decision.summary()}: not promoted\n{decision.table()}")
    return decision, path


def log_decision(client: MlflowClient, run_id: str, decision: Decision) -> str:
    """Record ``decision`` on the candidate's training run: the whole of it (evidence,
    thresholds, checks) as a JSON artifact, its numbers as ``live_*`` metrics, its verdict as
    tags. Returns the artifact's path in the run."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = f"{LIVE_ARTIFACTS}/{decision.evidence.challenger.version}-{stamp}.json"
    client.log_dict(run_id, decision.to_dict(), path)
    for name, value in decision.metrics().items():
        client.log_metric(run_id, name, value)
    client.set_tag(run_id, LIVE_DECISION_TAG, "passed" if decision.passed else "refused")
    client.set_tag(run_id, LIVE_EVIDENCE_TAG, path)
    return path


def check_up_to_date() -> None:
    from dvc.repo import Repo

    with Repo() as repo:
        # The serving pipeline only: the opt-in crossval/dvc.yaml may lag behind it.
        changed = repo.status(targets=["dvc.yaml"])
    if changed:
        raise PromotionError(
            f"the pipeline is not up to date (stages changed: {', '.join(sorted(changed))}); "
            "run `dvc repro` first, so the model, its metrics and its bento belong together"
        )


def git_revision() -> str:
    """HEAD's commit, with ``-dirty`` if tracked files differ from it; "" outside Git."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"{commit}-dirty" if commit and dirty else commit


def deploy(champion: ModelVersion, local_archive: Path) -> str:
    """Make the champion's bento what ``bentoml serve dandelion-vs-grass:latest`` serves."""
    import bentoml

    tag = f"{MODEL_NAME}:{champion.tags[BENTO_TAG]}"
    try:
        bentoml.bentos.get(tag)
    except bentoml.exceptions.NotFound:
        with tempfile.TemporaryDirectory() as tmp:
            if local_archive.is_file() and bento_version_of(local_archive) == tag:
                archive = local_archive
            else:  # the champion came from another commit: its run holds its bento
                archive = Path(
                    mlflow.artifacts.download_artifacts(
                        run_id=champion.run_id,
                        artifact_path=f"{BENTO_ARTIFACTS}/{local_archive.name}",
                        dst_path=tmp,
                    )
                )
            bentoml.bentos.import_bento(str(archive.resolve()))  # relative: fs root
    bentoml_store.set_latest(MODEL_NAME, champion.tags[BENTO_TAG])
    return tag


def promote(
    paths: dict[str, str], different_test_set: bool = False, live: LiveSource | None = None
) -> str:
    """Gate, register and deploy; return a summary. ``different_test_set``: promote
    without comparison a model tested on another test set than the champion's. ``live``:
    require live evidence from there first (``live_gate``). An MLflow server that refuses
    the login (docs/team-setup.md) stops it with a StageError naming the variables to set."""
    with login_errors():
        return _promote(paths, different_test_set, live)


def _promote(paths: dict[str, str], different_test_set: bool, live: LiveSource | None) -> str:
    use_project_store()  # first: a login the server refuses stops it before `dvc status`
    check_up_to_date()
    model_dir = Path(paths["model_dir"])
    model_file = model_dir / MODEL_FILE
    archive = Path(paths["bento_archive"])
    evaluated = json.loads((Path(paths["evaluate_dir"]) / "metrics.json").read_text())
    test_metrics = evaluated[TEST]
    test_set = split_digest(read_split(Path(paths["split_csv"])))
    card = model_card(model_dir, Path(paths["export_dir"]), test_metrics, included_files())
    if bento_version_of(archive) != f"{MODEL_NAME}:{card.version}":
        raise PromotionError(f"{archive} is not the bento of this model: run `dvc repro`")

    run = training_run(card.model_sha256)
    if run is None:
        raise PromotionError(
            f"no MLflow run in {mlflow.get_tracking_uri()} trained {model_file} "
            f"(tag {MODEL_SHA256_TAG}={card.model_sha256}); train it here with `dvc repro`, or "
            "set MLFLOW_TRACKING_URI to the store that trained it"
        )
    client = MlflowClient()
    gate = PromoteParams.load()
    decided = live and live_gate(client, MODEL_NAME, run.info.run_id, card.version, live, gate.live)
    decision = decided[0] if decided else None
    live_tags = (
        {
            LIVE_EVIDENCE_TAG: f"runs:/{run.info.run_id}/{decided[1]}",
            "live_summary": decided[0].summary(),
        }
        if decided
        else {}
    )
    champion, promoted = promote_if_better(
        client,
        MODEL_NAME,
        run.info.run_id,
        card.version,
        test_metrics,
        test_set,
        gate,
        {
            MODEL_SHA256_TAG: card.model_sha256,
            "dvc_md5": card.dvc_md5,  # of the served export, as on the service's /metrics
            "git_revision": git_revision(),
            **live_tags,
            # For information only: never compared (the set grows as photos are reviewed).
            **{
                f"{PRODUCTION_TEST}_{key}": str(value)
                for key, value in evaluated.get(PRODUCTION_TEST, {}).items()
            },
        },
        different_test_set,
    )
    if promoted:
        client.log_artifact(run.info.run_id, str(archive), BENTO_ARTIFACTS)
    deployed = deploy(champion, archive)
    verdict = (
        (
            "promoted to champion without comparison (another test set than the champion's)"
            if WITHOUT_COMPARISON_TAG in champion.tags
            else "promoted to champion"
        )
        if promoted
        else "already champion"
        if champion.tags[BENTO_TAG] == card.version
        else f"not promoted (test {gate.metric} {test_metrics[gate.metric]:.4f} does not beat "
        f"{float(champion.tags['test_' + gate.metric]):.4f} + {gate.min_improvement})"
    )
    return (
        (f"promote: {decision.summary()}\n{decision.table()}\n" if decision else "")
        + f"promote: bento {MODEL_NAME}:{card.version} {verdict}; champion is version "
        f"{champion.version}, serving {deployed} as {MODEL_NAME}:latest"
    )
