"""From a served answer to training data, reproducibly (issue 24's loop, minus GitHub).

A user posts photos the project has never seen to the served champion and says, through
POST /feedback, which label each really has. A person reviews the stored feedback and accepts
it (`dandelion review accept --all`). Then `dvc repro` retrains on the larger set: it reruns
the stages that depend on the data and nothing else, the original test split keeps exactly its
photos, and a clean clone elsewhere, given the reviewed photos by `dvc pull`, reproduces the
same `dvc.lock`.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from pipeline.params import SplitParams
from pipeline.shards import SplitPhotos
from pipeline.splits import PRODUCTION_TEST, TEST, read_split
from serving.contract import MODEL_NAME
from stages.split import reviewed_split
from tests.support.dvc import dvc, pipeline_env, stages_run
from tests.support.git import git
from tests.support.http import serve_directory
from tests.support.paths import EVALUATE_METRICS, PIPELINE_PATHS, PIPELINE_STAGES
from tests.support.processes import dandelion
from tests.support.service import own_metrics_home, serving

pytestmark = pytest.mark.slow

STORED_WITHIN_SECONDS = 30  # the flusher stores a spooled feedback at once on a local store
# Reviewed photos wanted per class, by where the hash rule places them: some to learn from,
# some held out in production_test.
WANTED = {"train": 2, PRODUCTION_TEST: 1}


def unseen_photo(original: bytes) -> bytes:
    """A photo the project has never seen: ``original`` cropped by 2 pixels, re-encoded."""
    with Image.open(io.BytesIO(original)) as image:
        cropped = image.convert("RGB").crop((2, 2, image.width - 2, image.height - 2))
    out = io.BytesIO()
    cropped.save(out, "JPEG", quality=90)
    return out.getvalue()


def choose_photos(workspace: Path) -> list[tuple[bytes, str, str]]:
    """(bytes, true label, split the rule gives it) of unseen variants of train photos: per
    class, WANTED["train"] the rule puts in train or val, WANTED[production_test] held out."""
    params = SplitParams.load(workspace / "params.yaml")
    wanted = {(kind, label): n for kind, n in WANTED.items() for label in ("dandelion", "grass")}
    chosen = []
    photos = SplitPhotos(PIPELINE_PATHS["raw_dir"], workspace)
    for row in read_split(workspace / PIPELINE_PATHS["split_csv"]):
        if row.split != "train":
            continue
        photo = unseen_photo(photos.read(row.path))
        split = reviewed_split(hashlib.sha256(photo).hexdigest(), params)
        kind = (PRODUCTION_TEST if split == PRODUCTION_TEST else "train", row.label)
        if wanted.get(kind):
            wanted[kind] -= 1
            chosen.append((photo, row.label, split))
    assert not any(wanted.values()), f"too few train photos to choose from: {wanted}"
    return chosen


def give_feedback(url: str, photo: bytes, label: str) -> dict:
    """POST /predict, then POST /feedback with the right label on that answer; the answer."""
    answer = requests.post(f"{url}/predict", files={"image": ("p.jpg", photo)}, timeout=60)
    assert answer.status_code == 200, answer.text
    answered = answer.json()
    fields = {
        "label": label,
        "answer_id": answered["answer_id"],
        "model_version": answered["model_version"],
    }
    receipt = requests.post(
        f"{url}/feedback", files={"image": ("p.jpg", photo)}, data=fields, timeout=60
    )
    assert receipt.status_code == 202, receipt.text
    return answered


def wait_stored(records: Path, count: int) -> list[dict]:
    deadline = time.monotonic() + STORED_WITHIN_SECONDS
    while time.monotonic() < deadline:
        found = sorted(records.glob("*/*.json"))
        if len(found) == count:
            return [json.loads(path.read_text()) for path in found]
        time.sleep(0.2)
    raise AssertionError(f"{len(list(records.glob('*/*.json')))} of {count} records stored")


def test_feedback_on_served_answers_retrains_reproducibly(
    pipeline_copy, reproduced, promoted, dataset_mirror, tmp_path
):
    workspace = pipeline_copy
    feedback_dir = tmp_path / "feedback"
    env = dict(reproduced.env, FEEDBACK_DIR=str(feedback_dir))
    split_csv = workspace / PIPELINE_PATHS["split_csv"]
    test_rows = [(r.path, r.label, r.sha256) for r in read_split(split_csv) if r.split == TEST]
    photos = choose_photos(workspace)

    # 1. Served answers, and feedback on them.
    home = own_metrics_home(Path(env["BENTOML_HOME"]), tmp_path / "bentoml_home")
    with serving(
        f"{MODEL_NAME}:latest", workspace, dict(env, BENTOML_HOME=str(home)), tmp_path
    ) as s:
        answers = [give_feedback(s.url, photo, label) for photo, label, _ in photos]
        records = wait_stored(feedback_dir / "store" / "records", len(photos))
    assert sorted(r["answer_id"] for r in records) == sorted(a["answer_id"] for a in answers)

    # 2. The review: every pending feedback listed, accepted; running it again changes nothing.
    listed = dandelion(workspace, "review", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    *lines, summary = listed.stdout.strip().splitlines()
    shown = {line.split(".")[0] for line in lines}
    assert shown == {hashlib.sha256(p).hexdigest()[: len(min(shown))] for p, _, _ in photos}
    assert summary.startswith(f"review: {len(photos)} pending"), listed.stdout
    accepted = dandelion(workspace, "review", "accept", "--all", env=env)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    tracked = [PIPELINE_PATHS["reviewed_catalogue"], f"{PIPELINE_PATHS['reviewed_dir']}.dvc"]
    before = {path: (workspace / path).read_bytes() for path in tracked}
    again = dandelion(workspace, "review", "accept", "--all", env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert {path: (workspace / path).read_bytes() for path in tracked} == before
    listed = dandelion(workspace, "review", "list", env=env)
    assert listed.stdout.startswith("review: 0 pending"), listed.stdout
    git(workspace, "add", "-A")  # and data/.gitignore, as the command's last line says
    git(workspace, "commit", "-qm", "review: accept the feedback")

    # 3. Retraining: every stage from the split on (the photos are not downloaded), and the
    # original test split is the same photos.
    repro = dvc(workspace, "repro", env=reproduced.env)
    assert repro.returncode == 0, repro.stdout + repro.stderr
    assert stages_run(repro.stdout) == [s for s in PIPELINE_STAGES if s != "download"]
    rows = read_split(split_csv)
    assert [(r.path, r.label, r.sha256) for r in rows if r.split == TEST] == test_rows
    reviewed = {
        r.sha256: r.split for r in rows if r.path.startswith(PIPELINE_PATHS["reviewed_dir"])
    }
    assert reviewed == {hashlib.sha256(p).hexdigest(): split for p, _, split in photos}
    metrics = json.loads((workspace / EVALUATE_METRICS).read_text())
    assert set(metrics) >= {TEST, PRODUCTION_TEST}
    git(workspace, "add", "-A")
    git(workspace, "commit", "-qm", "retrained on the reviewed photos")

    # 4. A clean clone elsewhere, with the reviewed photos from the remote, gives the same lock.
    remote, clone = tmp_path / "remote", tmp_path / "clone"
    reviewed_dvc = f"{PIPELINE_PATHS['reviewed_dir']}.dvc"
    git(tmp_path, "clone", "-q", str(workspace), str(clone))
    for where in (workspace, clone):
        added = dvc(where, "remote", "add", "--local", "e2e", str(remote), env=env)
        assert added.returncode == 0, added.stderr
    pushed = dvc(workspace, "push", "-r", "e2e", reviewed_dvc, env=env)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    pulled = dvc(clone, "pull", "-r", "e2e", reviewed_dvc, env=env)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    clean_env = pipeline_env(Path(env["KERAS_HOME"]), tmp_path / "clone_bentoml_home")
    with serve_directory(dataset_mirror) as mirror_url:
        clean = dvc(clone, "repro", env=dict(clean_env, DOWNLOAD_BASE_URL=f"{mirror_url}/data"))
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert (clone / "dvc.lock").read_bytes() == (workspace / "dvc.lock").read_bytes()
    assert git(clone, "status", "--porcelain").stdout == ""
