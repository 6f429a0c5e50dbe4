"""Champion and challenger served together by `bentoml serve`: two real bentos, built by the
pipeline, the challenger the same model at another evaluate.threshold (so that a few test
photos change their label). In shadow mode its agreement with the champion on /metrics is
exactly what evaluate's two predictions files say; its worker killed mid-run, the champion
goes on answering and the failure is counted. In canary mode each model answers its share with
exactly evaluate's labels."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest
import requests

from pipeline.bento import bento_version_of
from pipeline.live_evidence import decide, prometheus_evidence
from pipeline.params import PromoteParams
from serving.contract import DecisionRule
from tests.end_to_end.test_scrape import scrape
from tests.support.dvc import dvc, set_param, stages_run
from tests.support.monitoring import (
    dashboard_queries,
    last_scrape,
    needs_challenger,
    scraping,
    wait_until,
)
from tests.support.paths import PIPELINE_PATHS
from tests.support.processes import python_module
from tests.support.service import evaluated_predictions, served_answers, serving

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def challenger_workspace(reproduced, tmp_path_factory) -> Path:
    """A copy of the reproduced pipeline at another evaluate.threshold, rebuilt (evaluate and
    package): a second bento of the same model, some test photos on the other side."""
    workspace = Path(
        shutil.copytree(
            reproduced.workspace, tmp_path_factory.mktemp("challenger") / "repo", symlinks=True
        )
    )
    before = evaluated_predictions(workspace)
    # Midway between two of the lowest dandelion scores, where the gap is widest, so that
    # float noise cannot decide: the photos below it become grass.
    above = sorted(p.score for p in before if p.predicted == "dandelion")[:6]
    low, high = max(itertools.pairwise(above), key=lambda pair: pair[1] - pair[0])
    set_param(workspace, "evaluate.threshold", round((low + high) / 2, 6))
    rebuilt = dvc(workspace, "repro", env=reproduced.env)
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert stages_run(rebuilt.stdout) == ["evaluate", "package", "plots"]
    return workspace


def imported_home(reproduced, workspaces: list[Path], home: Path) -> dict:
    """An environment whose BentoML home holds the bentos the ``workspaces`` built."""
    env = dict(reproduced.env, BENTOML_HOME=str(home))
    for workspace in workspaces:
        archive = workspace / PIPELINE_PATHS["bento_archive"]
        imported = python_module("bentoml", workspace, "import", str(archive), env=env)
        assert imported.returncode == 0, imported.stderr
    return env


def agreement(champion: Path, challenger: Path) -> tuple[int, int]:
    """(agree, disagree) over the test photos, from the two evaluate predictions files: the
    same label and the same neither."""
    pairs = zip(evaluated_predictions(champion), evaluated_predictions(challenger), strict=True)
    same = [
        a.photo == b.photo
        and a.predicted == b.predicted
        and bool(DecisionRule.neither(a.novelty)) == bool(DecisionRule.neither(b.novelty))
        for a, b in pairs
    ]
    return sum(same), len(same) - sum(same)


def challenger_workers(port: int) -> list[psutil.Process]:
    """The challenger's worker processes (one, but while it is replaced) of the server
    listening on ``port``."""
    servers = [
        p for p in psutil.process_iter(["cmdline"]) if str(port) in (p.info["cmdline"] or [])
    ]
    found = {}
    for server in servers:
        for child in server.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "spawn_main" in " ".join(child.cmdline()) and child.status() != "zombie":
                    found[child.pid] = child
    return list(found.values())


def sample(url: str, name: str, **labels) -> float:
    return scrape(url).get((name, tuple(sorted(labels.items()))), 0.0)


def eventually(condition, seconds=60.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_shadow_agreement_is_evaluate_s_and_a_dead_worker_leaves_the_champion_answering(
    reproduced, challenger_workspace, tmp_path
):
    champion_archive = reproduced.workspace / PIPELINE_PATHS["bento_archive"]
    challenger_archive = challenger_workspace / PIPELINE_PATHS["bento_archive"]
    champion_version = bento_version_of(champion_archive)
    challenger_version = bento_version_of(challenger_archive).split(":")[1]
    env = imported_home(reproduced, [reproduced.workspace], tmp_path / "bentoml_home")
    # The challenger from its archive, as a deployment names a bento not (yet) in the store.
    env |= {
        "CHALLENGER": str(challenger_archive),
        "CHALLENGER_MODE": "shadow",
        "FEEDBACK_DIR": str(tmp_path / "feedback"),
        "PREDICTION_LOG_DIR": str(tmp_path / "predictions"),
    }
    agree, disagree = agreement(reproduced.workspace, challenger_workspace)
    assert 0 < disagree < 10, (agree, disagree)  # a few photos changed sides
    photos = [p.photo for p in evaluated_predictions(reproduced.workspace)]

    with (
        serving(champion_version, reproduced.workspace, env, tmp_path) as service,
        scraping(service.url, tmp_path / "prometheus") as prometheus,
    ):
        compared = {
            outcome: ("classifier_shadow_comparisons_total", challenger_version, outcome)
            for outcome in ("agree", "disagree")
        }

        def count(outcome: str) -> float:
            name, version, outcome = compared[outcome]
            return sample(service.url, name, model_version=version, outcome=outcome)

        answers = served_answers(service.url, photos, workers=4)
        assert {a["model_version"] for a in answers} == {champion_version.split(":")[1]}
        eventually(lambda: count("agree") + count("disagree") == len(photos))
        assert (count("agree"), count("disagree")) == (agree, disagree)
        shed = ("classifier_shadow_shed_total", {"model_version": challenger_version})
        assert sample(service.url, shed[0], **shed[1]) == 0

        # The same evidence through a real Prometheus, as `dandelion promote --live
        # prometheus` reads it, and the live gate's agreement check on it.
        everything = (
            f'sum(classifier_shadow_comparisons_total{{model_version="{challenger_version}"}})'
        )
        wait_until(prometheus, f"{everything} == {len(photos)}")
        evidence = prometheus_evidence(
            prometheus,
            champion_version.split(":")[1],
            challenger_version,
            "1h",
            at=last_scrape(prometheus),
        )
        assert evidence.comparisons == {"agree": agree, "disagree": disagree}
        assert evidence.champion.answers == {"served": len(photos)}
        assert evidence.challenger.answers == {"shadow": len(photos)}
        assert evidence.champion.errors == evidence.challenger.errors == 0
        measured = agree / len(photos)
        live = PromoteParams.load(reproduced.workspace / "params.yaml").live
        for bound, passes in ((measured, True), (measured + 0.01, False)):
            thresholds = dataclasses.replace(live, min_answers=len(photos), min_agreement=bound)
            (check,) = [c for c in decide(evidence, thresholds).checks if c.name == "agreement"]
            assert check.passed is passes, check
        # The dashboards' queries of a challenger's series have data now (the end-to-end
        # scrape test serves the bento alone, where they have none).
        for _, expr in dashboard_queries():
            if needs_challenger(expr):
                wait_until(prometheus, expr)

        # The challenger's worker killed mid-run: every photo still gets the champion's answer,
        # the challenger's failure is counted, and its worker comes back.
        errors = {"model_version": challenger_version, "role": "challenger", "mode": "shadow"}
        port = int(service.url.rsplit(":", 1)[1])
        (killed,) = challenger_workers(port)
        killed.send_signal(signal.SIGKILL)
        again = served_answers(service.url, photos, workers=4)
        assert [a["label"] for a in again] == [a["label"] for a in answers]
        eventually(lambda: sample(service.url, "classifier_model_errors_total", **errors) >= 1)

        def compared_again() -> bool:  # once the new worker has loaded its engine
            served_answers(service.url, photos[:4])
            return count("agree") + count("disagree") > len(photos)

        eventually(compared_again)
        assert killed.pid not in [worker.pid for worker in challenger_workers(port)]


def test_the_canary_answers_its_share_with_evaluate_s_labels(
    reproduced, challenger_workspace, tmp_path
):
    # The challenger imported last: the store's latest model is then the challenger's, and
    # the champion's bento must still serve its own (serving/model.py bento_pinned).
    env = imported_home(
        reproduced, [reproduced.workspace, challenger_workspace], tmp_path / "bentoml_home"
    )
    champion_tag = bento_version_of(reproduced.workspace / PIPELINE_PATHS["bento_archive"])
    challenger_tag = bento_version_of(challenger_workspace / PIPELINE_PATHS["bento_archive"])
    # The challenger by its tag in the store.
    env |= {
        "CHALLENGER": challenger_tag,
        "CHALLENGER_MODE": "canary",
        "CANARY_PERCENT": "50",
        "FEEDBACK_DIR": str(tmp_path / "feedback"),
        "PREDICTION_LOG_DIR": str(tmp_path / "predictions"),
    }
    expected = {
        champion_tag.split(":")[1]: evaluated_predictions(reproduced.workspace),
        challenger_tag.split(":")[1]: evaluated_predictions(challenger_workspace),
    }
    photos = [p.photo for p in expected[champion_tag.split(":")[1]]]
    with serving(champion_tag, reproduced.workspace, env, tmp_path) as service:
        answers = served_answers(service.url, photos, workers=4)
        info = requests.get(f"{service.url}/model-info", timeout=60).json()
    assert info["version"] == champion_tag.split(":")[1]  # the champion's card, still
    versions = [a["model_version"] for a in answers]
    assert set(versions) == set(expected)  # 60 photos split by their sha256: both answer
    for index, answer in enumerate(answers):
        assert answer["label"] == expected[answer["model_version"]][index].predicted, index
