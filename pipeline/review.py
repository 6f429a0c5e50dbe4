"""The review of feedback: what the service's users said about its answers becomes training data
only through a person's decision. Run by hand, outside ``dvc repro``: ``dandelion review``.

The feedback store (serving/stores.py, configured from the environment as the service's is)
holds each feedback's photo and record, keyed by the photo's sha256 and the label given. A
record is *pending* until the review decides on it:

- ``accept`` writes the photo to ``data/reviewed/<label>/<sha256>.<ext>`` and a row to
  ``data/reviewed.csv`` (sorted by sha256, so the same photos give the same bytes), has DVC
  track ``data/reviewed``, and then records the decision in the store;
- ``reject`` records the decision in the store, and writes nothing else.

A decision is an object of its own in the store (``reviewed/<sha256>/<label>.json``: the
decision, the label accepted and the record), written last: a review cut short before it is
repaired by running the same command again, and running a command again changes nothing.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import functools
import io
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError
from PIL import Image, UnidentifiedImageError

from pipeline import catalogue
from pipeline.catalogue import REVIEWED_COLUMNS, ReviewedEntry, read_catalogue, reviewed_photos
from pipeline.hashing import sha256_of
from pipeline.label_noise import THUMBNAIL, contact_sheet
from pipeline.params import EvaluateParams, PreprocessParams, classes, pipeline_paths
from pipeline.stage import StageError
from serving.contract import DecisionRule, load_image
from serving.settings import ACCEPTED_FORMATS, NEITHER_LABEL
from serving.stores import (
    DECISIONS,
    RECORDS,
    decision_key,
    feedback_config,
    photo_key,
    record_key,
    write_whole,
)

# What to commit and push after accepting (`dvc add` writes the .dvc file and the .gitignore).
COMMIT_HINT = (
    'git add {csv} {directory}.dvc {gitignore} && git commit -m "reviewed feedback" && dvc push'
)


@dataclass(frozen=True)
class Reviewed:
    """Where the accepted photos go, as dvc.yaml's vars declare them (relative to the root)."""

    csv: Path  # one row per accepted photo, in Git
    directory: Path  # the photos, tracked by DVC

    @classmethod
    def of(cls, root: Path) -> Reviewed:
        paths = pipeline_paths(root / "dvc.yaml")
        return cls(Path(paths["reviewed_catalogue"]), Path(paths["reviewed_dir"]))

    def commit_hint(self) -> str:
        gitignore = self.directory.parent / ".gitignore"
        return COMMIT_HINT.format(csv=self.csv, directory=self.directory, gitignore=gitignore)


SHORT_ID = 12  # hex digits of the sha256 an id shows, at least
ACCEPTED, REJECTED = "accepted", "rejected"
SOURCE_PREFIX = "feedback:"  # reviewed.csv's source: where a photo came from
# A photo's file extension, from the format Pillow reads in its bytes.
# Pillow reads a phone's multi-picture JPEG as MPO (serving/settings.py ACCEPTED_FORMATS).
EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg"}
KEY = re.compile(r"(?P<sha256>[0-9a-f]{64})/(?P<label>[^/]+)\.json")


class ReviewError(StageError):
    """The review cannot go ahead: bad input or an unreachable store; the message says what."""


Key = tuple[str, str]  # (photo sha256, label given): one record


def keyed(keys: list[str], folder: str) -> set[Key]:
    """The (sha256, label) of each of ``folder``'s objects named as a record is."""
    return {
        (match["sha256"], match["label"])
        for key in keys
        if (match := KEY.fullmatch(key.removeprefix(folder)))
    }


@contextlib.contextmanager
def reaching(store) -> Iterator[None]:
    """A store that cannot be used (missing, down, refusing) ends the review in one line."""
    try:
        yield
    except (OSError, BotoCoreError, ClientError) as error:
        raise ReviewError(
            f"the feedback store {store} cannot be used: {error} (it comes from FEEDBACK_STORE, "
            "or FEEDBACK_DIR/store, as the service's; docs/serving.md, *Feedback*)"
        ) from None


def short_ids(keys: set[Key]) -> dict[Key, str]:
    """Each record's id, ``<sha256 prefix>.<label>``: SHORT_ID hex digits, more if two photos'
    sha256 begin alike, so that every id names one record."""
    photos = sorted({sha256 for sha256, _ in keys})
    length = SHORT_ID
    while len({sha256[:length] for sha256 in photos}) < len(photos):
        length += 1
    return {(sha256, label): f"{sha256[:length]}.{label}" for sha256, label in keys}


class Feedback:
    """The store's feedback as the review sees it: records, decisions, photos."""

    def __init__(self, store) -> None:
        self.store = store
        with reaching(store):
            self.records = keyed(store.keys(RECORDS), RECORDS)
            self.decided = keyed(store.keys(DECISIONS), DECISIONS)
        self.ids = short_ids(self.records)
        self.objects: dict[str, dict] = {}  # records and decisions read (photos are not kept)

    def get(self, key: str) -> bytes:
        with reaching(self.store):
            return self.store.get(key)

    def json_object(self, key: str) -> dict:
        if key not in self.objects:
            try:
                self.objects[key] = json.loads(self.get(key))
            except ValueError:
                raise ReviewError(f"the store's {key} is not a JSON object: damaged") from None
        return self.objects[key]

    def record(self, key: Key) -> dict:
        return self.json_object(record_key(*key))

    def decision(self, key: Key) -> dict | None:
        return self.json_object(decision_key(*key)) if key in self.decided else None

    def pending(self) -> list[Key]:
        """The records not decided yet, oldest first."""
        keys = self.records - self.decided
        return sorted(keys, key=lambda key: (self.record(key).get("received_at", ""), key))

    def photo(self, sha256: str) -> bytes:
        """The photo's bytes, checked against the sha256 that keys them."""
        data = self.get(photo_key(sha256))
        if sha256_of(data) != sha256:
            raise ReviewError(
                f"the store's {photo_key(sha256)} holds bytes of sha256 {sha256_of(data)}: "
                "damaged, not reviewed"
            )
        return data

    def resolve(self, ids: list[str]) -> list[Key]:
        """The records the ``ids`` name (``<sha256 prefix>[.<label>]``), in order, each once."""
        found: list[Key] = []
        for given in ids:
            prefix, _, label = given.strip().lower().partition(".")
            if not re.fullmatch(r"[0-9a-f]+", prefix):
                raise ReviewError(
                    f"{given!r} is not an id: ids are <sha256 prefix>.<label>, as "
                    "`dandelion review list` shows them"
                )
            matches = sorted(
                key
                for key in self.records
                if key[0].startswith(prefix) and (not label or key[1] == label)
            )
            if not matches:
                raise ReviewError(
                    f"unknown id {given!r}: no feedback in {self.store} has it "
                    "(`dandelion review list` shows the pending ones)"
                )
            if len(matches) > 1:
                named = ", ".join(self.ids[key] for key in matches)
                raise ReviewError(f"id {given!r} is ambiguous: it names {named}")
            if matches[0] not in found:
                found.append(matches[0])
        return found

    def mark(self, key: Key, decision: str, label: str | None = None) -> None:
        """Record the review's decision on a record: it is no longer pending."""
        body = {
            "decision": decision,
            "label": label,
            "record": self.record(key),
            "decided_at": datetime.datetime.now(datetime.UTC).isoformat(),
        }
        with reaching(self.store):
            self.store.put(decision_key(*key), json.dumps(body, sort_keys=True).encode())
        self.decided.add(key)


def open_feedback(environ=os.environ) -> Feedback:
    """The feedback of the store the environment configures, as the service reads it."""
    try:
        store = feedback_config(environ).store()
    except ValueError as error:
        raise ReviewError(str(error)) from None
    return Feedback(store)


def served_answer(record: dict) -> str | None:
    """The answer the served model gave the photo, as the record keeps it (if it does)."""
    label, confidence = record.get("served_label"), record.get("served_confidence")
    if label is None:
        return None
    return f"{label} {confidence:.2f}" if isinstance(confidence, int | float) else str(label)


def pending_lines(feedback: Feedback) -> list[str]:
    """``dandelion review list``: one line per pending feedback."""
    lines = []
    for key in feedback.pending():
        record = feedback.record(key)
        comment = " ".join((record.get("comment") or "").split())
        lines.append(
            f"{feedback.ids[key]}  given {key[1]}  served {served_answer(record) or 'not recorded'}"
            f"  {record.get('received_at', '')}" + (f"  {comment!r}" if comment else "")
        )
    return lines


# --- the contact sheet ---------------------------------------------------------------------


def export_scorer(root: Path):
    """The local export's answer for a photo's bytes (evaluate's engine, decision rule and
    decoding), or None when there is no export here."""
    from serving.engines import engine_of, load_engine

    export_dir = root / pipeline_paths(root / "dvc.yaml")["export_dir"]
    try:
        engine = engine_of(export_dir)
    except FileNotFoundError:
        return None
    if engine == "keras":
        from pipeline.logs import import_tensorflow_quietly

        import_tensorflow_quietly()
    score = load_engine(export_dir)
    params = root / "params.yaml"
    rule = DecisionRule(tuple(classes(params)), EvaluateParams.load(params).threshold)
    size = PreprocessParams.load(params).image_size
    return lambda photo: rule.verdict(*score(load_image(io.BytesIO(photo), size)[None])[0])


def model_answer(record: dict, photo: bytes, scorer: Callable[[], Callable | None]) -> str:
    """A caption's model answer: the served one if the record keeps it, else the local
    export's (``scorer()``, loaded only when needed), else unknown."""
    served = served_answer(record)
    if served is not None:
        return f"served {served}"
    if scorer() is None:
        return "model: unknown"
    verdict = scorer()(photo)
    neither = ", neither?" if verdict["neither"] else ""
    return f"export {verdict['label']} {verdict['confidence']:.2f}{neither}"


def write_sheet(feedback: Feedback, out: Path, root: Path) -> int:
    """The contact sheet of the pending feedback at ``out`` (PNG); how many photos it shows."""
    if out.suffix.lower() != ".png":
        raise ReviewError(f"the contact sheet is a PNG: name it <something>.png, not {out}")
    scorer = functools.cache(lambda: export_scorer(root))
    pending = feedback.pending()
    images, captions = [], []
    for key in pending:
        record, photo = feedback.record(key), feedback.photo(key[0])
        images.append(load_image(io.BytesIO(photo), THUMBNAIL))
        captions.append(
            f"{feedback.ids[key]}\ngiven {key[1]}\n{model_answer(record, photo, scorer)}"
        )
    if pending:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            contact_sheet(images, captions, lines=3).save(out, optimize=False)
        except OSError as error:
            raise ReviewError(f"the contact sheet cannot be written to {out}: {error}") from None
    return len(pending)


# --- accepting and rejecting -----------------------------------------------------------------


def read_reviewed(path: Path) -> dict[str, dict]:
    """data/reviewed.csv's rows by sha256 (none if there is no file yet)."""
    if not path.is_file():
        return {}
    try:
        entries = catalogue.read_reviewed(path)
    except ValueError as error:
        raise ReviewError(str(error)) from None
    return {entry.sha256: dataclasses.asdict(entry) for entry in entries}


def reviewed_text(rows: dict[str, dict]) -> str:
    """data/reviewed.csv: the header, then the rows sorted by sha256."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=REVIEWED_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows[sha256] for sha256 in sorted(rows))
    return buffer.getvalue()


def extension(photo: bytes, sha256: str) -> str:
    """The file extension of ``photo``, opened as the service opens uploads."""
    try:
        with Image.open(io.BytesIO(photo), formats=ACCEPTED_FORMATS) as image:
            kind = image.format
    except (UnidentifiedImageError, OSError):
        raise ReviewError(f"photo {sha256} is not in a format the service accepts") from None
    return EXTENSIONS.get(kind, kind.lower())


@dataclass(frozen=True)
class Acceptance:
    key: Key
    label: str  # the label the photo is accepted with
    source: str
    decided: bool = False  # accepted in the store already: only its files are written again


def plan_acceptances(
    feedback: Feedback, keys: list[Key], as_label: str | None, known: list[str], root: Path
) -> tuple[list[Acceptance], list[str]]:
    """What accepting ``keys`` writes, checked whole before anything is written; and the
    messages for those already accepted."""
    if as_label is not None and as_label not in known:
        raise ReviewError(f"--as {as_label}: the label must be one of {known}")
    reviewed = read_reviewed(root / Reviewed.of(root).csv)
    catalogue_csv = root / pipeline_paths(root / "dvc.yaml")["catalogue"]
    catalogue = {entry.sha256: entry for entry in read_catalogue(catalogue_csv) if entry.sha256}
    plan, done, labels = [], [], {}
    for key in keys:
        name = feedback.ids[key]
        decision = feedback.decision(key)
        if decision is not None:
            if decision.get("decision") != ACCEPTED:
                raise ReviewError(f"{name} was {decision.get('decision')}: a decision stands")
            if key[0] in reviewed:
                done.append(f"{name}: already accepted as {decision.get('label')}")
                continue
            # Accepted in the store but not filed in this checkout (its files lost, or the
            # acceptance made elsewhere never committed): filed again with its decided label.
            label = decision.get("label")
        else:
            label = as_label or key[1]
        if label == NEITHER_LABEL:
            raise ReviewError(
                f"{name} is labelled {NEITHER_LABEL}, which is no class of this model: "
                f"accept it with --as <{'|'.join(known)}>, or reject it"
            )
        if label not in known:
            raise ReviewError(f"{name}: label {label!r} is not one of params.yaml's {known}")
        sha256 = key[0]
        if sha256 in catalogue:
            entry = catalogue[sha256]
            raise ReviewError(
                f"{name}: the photo is already in {catalogue_csv.name} as {entry.relative_path}; "
                "reject it (a wrong label there is fixed in the catalogue)"
            )
        earlier = labels.get(sha256) or reviewed.get(sha256, {}).get("label")
        if earlier is not None and earlier != label:
            raise ReviewError(
                f"{name}: the photo is already accepted as {earlier}, and a photo has one label; "
                "reject this one"
            )
        labels[sha256] = label
        record = feedback.record(key)
        source = SOURCE_PREFIX + (record.get("answer_id") or record.get("received_at", ""))
        plan.append(Acceptance(key, label, source, decided=decision is not None))
    return plan, done


def track_reviewed(root: Path, directory: Path) -> None:
    """``dvc add data/reviewed``: the same files give the same data/reviewed.dvc."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            repo.scm_context.quiet = True  # its advice to `git add` is in the command's last line
            repo.add([str(directory)])
    except DvcException as error:  # not a DVC repository, its lock held by a running repro
        raise ReviewError(
            f"the photos are filed, but `dvc add` failed ({error}): run the same command again"
        ) from None


def accept(
    feedback: Feedback, keys: list[Key], as_label: str | None, root: Path
) -> tuple[list[str], int]:
    """Accept ``keys``' photos into data/reviewed; the messages, and how many were new."""
    known = classes(root / "params.yaml")
    plan, messages = plan_acceptances(feedback, keys, as_label, known, root)
    if not plan:
        return messages, 0
    photos = {item.key[0]: feedback.photo(item.key[0]) for item in plan}  # checked first
    filenames = {
        item.key: f"{item.label}/{sha256}.{extension(photos[sha256], sha256)}"
        for item in plan
        for sha256 in [item.key[0]]
    }
    reviewed = Reviewed.of(root)
    rows = read_reviewed(root / reviewed.csv)
    # The photos accepted before must be here: `dvc add` of a directory without them would
    # track it without them, while the catalogue still lists them.
    try:
        reviewed_photos([ReviewedEntry(**row) for row in rows.values()], root / reviewed.directory)
    except StageError as error:
        raise ReviewError(f"nothing accepted: {error}") from None
    for item in plan:
        sha256, filename = item.key[0], filenames[item.key]
        write_whole(root / reviewed.directory / filename, photos[sha256])
        # A photo accepted before keeps its row (and source): the row names the file, not the
        # feedback.
        rows.setdefault(
            sha256,
            {"label": item.label, "filename": filename, "sha256": sha256, "source": item.source},
        )
    write_whole(root / reviewed.csv, reviewed_text(rows).encode())
    track_reviewed(root, reviewed.directory)
    for item in plan:  # last: a review cut short before is done again by a rerun
        if item.decided:
            messages.append(f"{feedback.ids[item.key]}: accepted as {item.label}, filed again")
            continue
        feedback.mark(item.key, ACCEPTED, item.label)
        messages.append(f"{feedback.ids[item.key]}: accepted as {item.label}")
    return messages, len(plan)


def reject(feedback: Feedback, keys: list[Key]) -> list[str]:
    messages = []
    for key in keys:
        name, decision = feedback.ids[key], feedback.decision(key)
        if decision is None:
            feedback.mark(key, REJECTED)
            messages.append(f"{name}: rejected")
        elif decision["decision"] == REJECTED:
            messages.append(f"{name}: already rejected")
        else:
            raise ReviewError(f"{name} was {decision['decision']}: a decision stands")
    return messages


def check_choice(ids: list[str], everything: bool) -> None:
    """A decision names its feedback by id or takes --all: checked before the store is read."""
    if everything == bool(ids):
        raise ReviewError("name the feedback to decide on by id, or give --all (not both)")


def chosen(feedback: Feedback, ids: list[str], everything: bool) -> list[Key]:
    """The records named on the command line, or every pending one."""
    check_choice(ids, everything)
    return feedback.pending() if everything else feedback.resolve(ids)
