"""`dandelion review` on feedback the stub front stored (POST /predict, then POST /feedback on
its answer), in the local directory and in an S3 bucket (moto's server): listed, drawn,
accepted into a Git + DVC project, rejected; a rerun changes no byte; bad input and a store
that cannot be used end in one line."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from pipeline.label_noise import THUMBNAIL, caption_height
from tests.support.processes import dandelion
from tests.support.review import review_project, tree_bytes
from tests.support.stub_service import StubService, photo, stub_client

pytestmark = pytest.mark.filterwarnings("ignore:Accessing the 'model_fields' attribute")

COLOURS = {"green": (20, 200, 20), "red": (200, 20, 20), "blue": (20, 20, 200)}
COMMIT = "git add data/reviewed.csv data/reviewed.dvc data/.gitignore"


def sha(colour: str) -> str:
    return hashlib.sha256(photo(COLOURS[colour])).hexdigest()


def short(colour: str, label: str) -> str:
    return f"{sha(colour)[:12]}.{label}"


def fed(given: list[tuple[str, str]], records) -> dict[tuple[str, str], str]:
    """Each (colour, label) as a user gives it: the photo to /predict, then feedback on that
    answer; waits until the store holds the records. Their answer ids."""
    answer_ids = {}
    with stub_client() as client:
        front = StubService.instance()
        try:
            for colour, label in given:
                image = ("a.png", photo(COLOURS[colour]))
                answer = client.post("/predict", files={"image": image}).json()
                sent = client.post(
                    "/feedback",
                    files={"image": image},
                    data={"label": label, "answer_id": answer["answer_id"], "comment": colour},
                )
                assert sent.status_code == 202, sent.text
                answer_ids[colour, label] = answer["answer_id"]
                time.sleep(0.01)  # received_at orders the review's list
            deadline = time.monotonic() + 20
            while len(records()) < len(given):
                assert time.monotonic() < deadline, "the flusher did not store the feedback"
                time.sleep(0.05)
        finally:
            front.feedback.stop(0)
    return answer_ids


def review(repo: Path, *args: str, env=None):
    return dandelion(repo, "review", *args, env=env or dict(os.environ))


def ok(repo: Path, *args: str) -> list[str]:
    result = review(repo, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def refused(repo: Path, *args: str, env=None) -> str:
    """The one line a refused review ends with."""
    result = review(repo, *args, env=env)
    assert result.returncode != 0 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("review: ")
    return line


def row(colour: str, label: str, answer_id: str) -> str:
    return f"{label},{label}/{sha(colour)}.png,{sha(colour)},feedback:{answer_id}"


def test_feedback_in_the_local_store_is_listed_drawn_accepted_and_rejected_once(
    feedback_dir, tmp_path
):
    store = feedback_dir / "store"
    given = [("green", "dandelion"), ("red", "grass"), ("blue", "neither"), ("green", "grass")]
    answer_ids = fed(given, lambda: list((store / "records").rglob("*.json")))
    repo = review_project(tmp_path / "repo")

    listed = ok(repo, "list")
    assert [line.split()[0] for line in listed[:-1]] == [short(*item) for item in given]
    assert [line.split()[2] for line in listed[:-1]] == [label for _, label in given]
    assert listed[0].endswith("'green'") and listed[-1] == f"review: 4 pending in {store}"

    assert ok(repo, "sheet", "out/sheet.png")[-1].endswith("drawn in out/sheet.png")
    sheet = Image.open(repo / "out/sheet.png")
    assert sheet.size == (4 * THUMBNAIL, THUMBNAIL + caption_height(3))
    tiles = [sheet.getpixel((i * THUMBNAIL + THUMBNAIL // 2, THUMBNAIL // 2)) for i in range(4)]
    assert tiles == [COLOURS[colour] for colour, _ in given]

    accepted = ok(repo, "accept", short("green", "dandelion"), sha("red")[:7] + ".grass")
    assert accepted[:2] == [
        f"{short('green', 'dandelion')}: accepted as dandelion",
        f"{short('red', 'grass')}: accepted as grass",
    ]
    assert COMMIT in accepted[-1] and "dvc push" in accepted[-1]
    reviewed = repo / "data/reviewed"
    assert (reviewed / f"dandelion/{sha('green')}.png").read_bytes() == photo(COLOURS["green"])
    assert (reviewed / f"grass/{sha('red')}.png").read_bytes() == photo(COLOURS["red"])
    rows = sorted(
        [row("green", "dandelion", answer_ids["green", "dandelion"])]
        + [row("red", "grass", answer_ids["red", "grass"])],
        key=lambda line: line.split(",")[2],
    )
    csv_text = (repo / "data/reviewed.csv").read_text()
    assert csv_text == "\n".join(["label,filename,sha256,source", *rows]) + "\n"
    (tracked,) = yaml.safe_load((repo / "data/reviewed.dvc").read_text())["outs"]
    assert tracked["path"] == "reviewed" and tracked["nfiles"] == 2
    assert "/reviewed" in (repo / "data/.gitignore").read_text().splitlines()

    # What cannot be done says so in one line, and changes nothing.
    before = tree_bytes(repo, "data")
    green_sha = sha("green")
    assert "already accepted as dandelion" in refused(repo, "accept", short("green", "grass"))
    assert "--as <grass|dandelion>, or reject" in refused(repo, "accept", short("blue", "neither"))
    assert "ambiguous" in refused(repo, "accept", green_sha[:12])
    assert "unknown id 'ffffffffffff'" in refused(repo, "reject", "ffffffffffff")
    assert "--as rose" in refused(repo, "accept", short("blue", "neither"), "--as", "rose")
    assert "by id, or give --all" in refused(repo, "accept")
    assert "name it <something>.png" in refused(repo, "sheet", "sheet.jpg")
    assert "accepted: a decision stands" in refused(repo, "reject", short("green", "dandelion"))
    assert tree_bytes(repo, "data") == before

    assert ok(repo, "reject", short("green", "grass"))[0] == f"{short('green', 'grass')}: rejected"
    assert ok(repo, "accept", "--all", "--as", "grass")[0].endswith("accepted as grass")
    assert ok(repo, "list") == [f"review: 0 pending in {store}"]
    assert ok(repo, "sheet", "again.png")[-1].endswith("no sheet written")
    decided = tree_bytes(repo, "data")
    decisions = tree_bytes(store, "reviewed")
    assert len(decisions) == 4
    verdict = json.loads(decisions[f"reviewed/{sha('blue')}/neither.json"])
    assert (verdict["decision"], verdict["label"]) == ("accepted", "grass")
    assert verdict["record"]["answer_id"] == answer_ids["blue", "neither"]

    # Running the same commands again changes no byte, here or in the store.
    again = ok(repo, "accept", short("green", "dandelion"), short("red", "grass"))
    assert again[0] == f"{short('green', 'dandelion')}: already accepted as dandelion"
    assert ok(repo, "reject", short("green", "grass"))[0].endswith("already rejected")
    assert ok(repo, "accept", "--all", "--as", "grass")[-1].startswith("review: 0 accepted")
    assert tree_bytes(repo, "data") == decided and tree_bytes(store, "reviewed") == decisions

    # A review cut short after its local writes, before the store's mark: the rerun finishes it.
    (store / f"reviewed/{sha('red')}/grass.json").unlink()
    assert ok(repo, "list")[0].startswith(short("red", "grass"))
    assert ok(repo, "accept", short("red", "grass"))[0].endswith("accepted as grass")
    assert tree_bytes(repo, "data") == decided and ok(repo, "list")[0].startswith("review: 0")

    # Accepted in the store but not filed in this checkout (reset, say): naming it files it
    # again. While an earlier photo is missing here (not pulled), nothing is accepted: `dvc
    # add` would track the directory without it.
    marks = tree_bytes(store, "reviewed")
    rows_text = (repo / "data/reviewed.csv").read_text()
    green_row = next(line for line in rows_text.splitlines() if sha("green") in line)
    green_file = repo / "data/reviewed" / green_row.split(",")[1]
    red_file = repo / f"data/reviewed/grass/{sha('red')}.png"
    (repo / "data/reviewed.csv").write_text(rows_text.replace(green_row + "\n", ""))
    green_file.unlink()
    red_file.unlink()
    missing = refused(repo, "accept", short("green", "dandelion"))
    assert "nothing accepted" in missing and "dvc pull" in missing and "reviewed.dvc" in missing
    red_file.write_bytes(photo(COLOURS["red"]))
    refiled = ok(repo, "accept", short("green", "dandelion"))
    assert refiled[0] == f"{short('green', 'dandelion')}: accepted as dandelion, filed again"
    assert tree_bytes(repo, "data") == decided and tree_bytes(store, "reviewed") == marks

    elsewhere = dict(os.environ, FEEDBACK_STORE=str(tmp_path / "nowhere"))
    assert "no feedback store at" in refused(repo, "list", env=elsewhere)
    # A decision that names nothing is refused as such, before any store is looked for.
    assert "by id, or give --all" in refused(repo, "reject", env=elsewhere)


def test_feedback_in_a_bucket_is_reviewed_there_and_an_unreachable_store_is_one_line(s3, tmp_path):
    store, endpoint = s3
    store.on()
    given = [("green", "dandelion"), ("red", "grass")]
    fed(given, lambda: [key for key in endpoint.objects() if "/records/" in key])
    repo = review_project(tmp_path / "repo")

    assert ok(repo, "list")[-1] == "review: 2 pending in s3://feedback-bucket/reviews/2024/"
    ok(repo, "accept", short("green", "dandelion"))
    ok(repo, "reject", short("red", "grass"))
    decisions = {
        key: json.loads(body)["decision"]
        for key, body in endpoint.objects().items()
        if key.startswith("reviews/2024/reviewed/")
    }
    assert decisions == {
        f"reviews/2024/reviewed/{sha('green')}/dandelion.json": "accepted",
        f"reviews/2024/reviewed/{sha('red')}/grass.json": "rejected",
    }
    decided, stored = tree_bytes(repo, "data"), endpoint.objects()
    ok(repo, "accept", short("green", "dandelion"))
    ok(repo, "reject", short("red", "grass"))
    assert tree_bytes(repo, "data") == decided and endpoint.objects() == stored
    assert list(tree_bytes(repo, "data/reviewed")) == [
        f"data/reviewed/dandelion/{sha('green')}.png"
    ]

    store.off()
    line = refused(repo, "list")
    assert "the feedback store s3://feedback-bucket/reviews/2024/ cannot be used" in line
