"""``dandelion predict-batch``: the service's answer for every photo of a folder or a bucket.

Every file under SOURCE (a directory, or ``s3://bucket/prefix``) is decoded as the service
decodes an upload (serving/decoding.py ``decode_upload``, with the upload limits of
params.yaml `serve`), scored by the export through the engine loader evaluate and the service
use (serving/engines.py ``load_engine``), and decided by the contract's rule
(``DecisionRule.verdict``, rounded as the service answers by serving/api.py ``rounded``). So
each row holds the fields ``POST /predict`` answers for that file but its random
``answer_id`` and the bento's ``model_version`` (an export has no card; the file's metadata
names the model's sha256 instead). A file the service would refuse is a row too, with the
service's reason (``error``) and message; a file that cannot be read at all has the reason
``unreadable``. Nothing is skipped.

The sorted listing is scored in chunks of ``predict_batch.chunk_photos`` photos; each chunk's
rows go to their own Parquet part in ``OUT.parts/`` as soon as it is scored, beside a
manifest of the listing and the model. A run that stops half way (killed, a lost machine) is
run again with the same command: the chunks whose part is there are not scored again, and a
listing, model or chunk size other than the manifest's is refused, since the parts would
mix two runs. Once every part is there they are joined into OUT, in listing order, and the
parts removed: the same photos and model give the same bytes, however the work was split.

With ``RAY_ADDRESS`` set (pipeline/cluster.py), the chunks are scored on that Ray cluster
with Ray Data: ``map_batches`` over the chunks with an actor class that loads the export once
per worker. Each worker reads SOURCE itself, with the credentials of its own environment
(AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL...): none are shipped from here. The parts it returns are
the bytes this process would have written.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.params import (
    EvaluateParams,
    PredictBatchParams,
    PreprocessParams,
    ServeParams,
    classes,
)
from pipeline.stage import StageError
from serving.contract import NOVELTY, PROBABILITY, DecisionRule
from serving.decoding import UploadLimits, decode_upload
from serving.engines import Scorer, engine_of, load_engine
from serving.errors import Rejection
from serving.settings import MAX_BATCH_SIZE, NEITHER_LABEL

PARTS_SUFFIX = ".parts"  # OUT.parts/: the finished chunks of a run, until OUT is written
MANIFEST_FILE = "manifest.json"
PART_FILE = "part-{:06d}.parquet"
UNREADABLE = "unreadable"  # the error of a file that could not be read (the others: REJECTIONS)
# What a run's parts depend on (its manifest's keys), as a refusal names them: the files and
# their sizes, the model's sha256, and how the listing is cut into chunks.
COMPARED = {"listing": "listing", "model": "model", "chunk_photos": "predict_batch.chunk_photos"}
LISTED = 20  # unreadable files the summary names; OUT has them all
# The metadata key of OUT's schema that names the model (its sha256, engine, rule, limits).
MODEL_METADATA_KEY = b"dandelion.model"


class BatchPredictError(StageError):
    pass


@dataclass(frozen=True)
class BatchModel:
    """What answers: the export's files, and the rule, input size and limits params.yaml gives
    it (as evaluate and the package stage read them). Plain bytes, so that it travels to Ray
    workers, which need no copy of the export of their own."""

    files: tuple[tuple[str, bytes], ...]  # (name, bytes) of each file of the export directory
    engine: str
    classes: tuple[str, str]
    threshold: float
    image_size: int
    limits: UploadLimits

    @classmethod
    def read(cls, export_dir: Path, params: Path) -> BatchModel:
        if not export_dir.is_dir():
            raise BatchPredictError(
                f"{export_dir}: no export directory (`dvc pull` or `dvc repro` makes it)"
            )
        try:
            engine = engine_of(export_dir)
        except FileNotFoundError as error:
            raise BatchPredictError(str(error)) from None
        serve = ServeParams.load(params)
        return cls(
            files=tuple(
                (path.name, path.read_bytes())
                for path in sorted(export_dir.iterdir())
                if path.is_file()
            ),
            engine=engine,
            classes=tuple(classes(params)),
            threshold=EvaluateParams.load(params).threshold,
            image_size=PreprocessParams.load(params).image_size,
            limits=UploadLimits(serve.max_upload_bytes, serve.min_side, serve.max_pixels),
        )

    @property
    def rule(self) -> DecisionRule:
        return DecisionRule(self.classes, self.threshold)

    def description(self) -> dict:
        """Everything that makes an answer but the export's bytes (which its sha256 covers)."""
        return {
            "engine": self.engine,
            "classes": list(self.classes),
            "threshold": self.threshold,
            "image_size": self.image_size,
            "limits": vars(self.limits),
        }

    @property
    def sha256(self) -> str:
        digest = hashlib.sha256(json.dumps(self.description(), sort_keys=True).encode())
        for name, data in self.files:
            digest.update(f"\0{name}\0{len(data)}\0".encode() + data)
        return digest.hexdigest()

    def scorer(self) -> Scorer:
        """The engine, loaded from a copy of the export's files."""
        with tempfile.TemporaryDirectory(prefix="dandelion-batch-") as scratch:
            for name, data in self.files:
                (Path(scratch) / name).write_bytes(data)
            return load_engine(scratch)  # read whole when loaded: the copy may go


def open_fs(url: str):
    """(fsspec filesystem, path) of a local path or an ``s3://`` URL. s3fs takes the endpoint
    from AWS_ENDPOINT_URL and the credentials from the standard variables, as boto3 does."""
    import fsspec

    # Not fsspec's cached instance: its listings would outlive changes between runs.
    fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True)
    return fs, path.rstrip("/")


def is_local(fs) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


class Source:
    """The files under a directory or an ``s3://bucket/prefix``, named relative to it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.fs, self.root = open_fs(url)
        self.local = is_local(self.fs)

    def listing(self) -> list[tuple[str, int]]:
        """(relative name, size) of every file under the source, sorted by name."""
        try:
            found = self.fs.find(self.root, detail=True)
        except OSError as error:
            raise BatchPredictError(f"{self.url}: {error}") from None
        prefix = self.root + "/"
        listing = sorted(
            (path.removeprefix(prefix), int(info.get("size") or 0))
            for path, info in found.items()
            if info.get("type") != "directory" and path.startswith(prefix)
        )
        if not listing:
            raise BatchPredictError(f"{self.url}: no such directory or prefix, or no file in it")
        return listing

    def read(self, name: str, most: int) -> bytes:
        """At most ``most`` bytes of the file: a file past the upload limit is refused as
        the service refuses it, without being read whole."""
        read, left = [], most
        path = f"{self.root}/{name}"
        # A local file through Python's own open: fsspec's seeks to its end first, which a
        # file that is a stream (a FIFO) cannot do.
        with open(path, "rb") if self.local else self.fs.open(path, "rb") as handle:
            # One read may return less than asked before the end (a pipe, a network stream).
            while left > 0 and (data := handle.read(left)):
                read.append(data)
                left -= len(data)
        return b"".join(read)


def schema(rule: DecisionRule):
    import pyarrow as pa

    return pa.schema(
        [
            ("path", pa.string()),  # relative to SOURCE
            ("label", pa.string()),
            ("confidence", pa.float64()),
            ("probabilities", pa.struct([(name, pa.float64()) for name in rule.classes])),
            ("neither", pa.bool_()),
            ("novelty", pa.float64()),
            ("score", pa.float64()),  # P(classes[1]) as the engine gave it, before rounding
            ("error", pa.string()),  # why the file has no answer: a Rejection's reason
            ("error_message", pa.string()),
        ]
    )


def answers(score: Scorer, rule: DecisionRule, images: list[np.ndarray]) -> list[dict]:
    """The service's answer for each decoded image, scored in batches no larger than the
    service's engine calls get."""
    from serving.api import rounded  # FastAPI and BentoML: only once there is work

    rows = []
    for start in range(0, len(images), MAX_BATCH_SIZE):
        outputs = score(np.stack(images[start : start + MAX_BATCH_SIZE]))
        for row in outputs:
            score_ = float(row[PROBABILITY])
            answer = rounded(rule.verdict(score_, float(row[NOVELTY])), rule.positive)
            rows.append({**answer, "score": score_})
    return rows


def part_bytes(model: BatchModel, score: Scorer, source: Source, names: list[str]) -> bytes:
    """The Parquet part of one chunk: a row per file, in the order of ``names``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rule = model.rule
    rows: list[dict] = []
    decoded: list[tuple[int, np.ndarray]] = []
    for name in names:
        rows.append({"path": name})
        try:
            data = source.read(name, model.limits.max_upload_bytes + 1)
            decoded.append((len(rows) - 1, decode_upload(data, model.image_size, model.limits)))
        except Rejection as rejection:
            rows[-1].update(error=rejection.reason, error_message=rejection.message)
        except OSError as error:
            rows[-1].update(error=UNREADABLE, error_message=str(error) or type(error).__name__)
    given = answers(score, rule, [image for _, image in decoded])
    for (index, _), answer in zip(decoded, given, strict=True):
        rows[index].update(
            {key: answer[key] for key in ("label", "confidence", "probabilities", "neither")},
            novelty=answer["novelty"],
            score=answer["score"],
        )
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema(rule)), buffer)
    return buffer.getvalue()


def chunked(names: list[str], size: int) -> list[list[str]]:
    return [names[start : start + size] for start in range(0, len(names), size)]


class Parts:
    """OUT.parts/: the manifest of a run and the part of each finished chunk."""

    def __init__(self, out: str) -> None:
        self.url = out + PARTS_SUFFIX
        self.fs, self.path = open_fs(self.url)

    def part(self, index: int) -> str:
        return f"{self.path}/{PART_FILE.format(index)}"

    def begin(self, manifest: dict) -> set[int]:
        """Start the run ``manifest`` describes, or go on with it: the chunks already done.
        A run of another listing, model or chunk size is refused."""
        path = f"{self.path}/{MANIFEST_FILE}"
        if self.fs.exists(path):
            earlier = json.loads(self.fs.cat_file(path))
            changed = [name for key, name in COMPARED.items() if earlier.get(key) != manifest[key]]
            if changed:
                raise BatchPredictError(
                    f"{self.url} holds the parts of an unfinished run with another "
                    f"{' and '.join(changed)}: run again with "
                    f"the photos, model and params it had, or delete {self.url} to start over"
                )
            count = manifest["chunks"]
            return {index for index in range(count) if self.fs.exists(self.part(index))}
        self.fs.makedirs(self.path, exist_ok=True)
        write_whole(self.fs, path, json.dumps(manifest, indent=1, sort_keys=True).encode())
        return set()

    def write(self, index: int, data: bytes) -> None:
        write_whole(self.fs, self.part(index), data)

    def joined(self, count: int):
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = [pq.read_table(io.BytesIO(self.fs.cat_file(self.part(i)))) for i in range(count)]
        return pa.concat_tables(tables).combine_chunks()

    def remove(self) -> None:
        self.fs.rm(self.path, recursive=True)


def write_whole(fs, path: str, data: bytes) -> None:
    """``data`` at ``path``, all or nothing: a run killed while writing leaves no half file
    (an S3 object appears whole when its upload ends)."""
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def in_process(
    model: BatchModel, source: Source, chunks: dict[int, list[str]]
) -> Iterator[tuple[int, bytes]]:
    """Each chunk's part, scored here, one chunk after the other."""
    score = model.scorer()
    for index, names in chunks.items():
        yield index, part_bytes(model, score, source, names)


class ChunkScorer:
    """A Ray Data actor: the export loaded once, then a part per chunk it is given."""

    def __init__(self, model: BatchModel, source_url: str) -> None:
        self.model, self.score, self.source = model, model.scorer(), Source(source_url)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        parts = [
            part_bytes(self.model, self.score, self.source, json.loads(str(names)))
            for names in batch["names"]
        ]
        return {"chunk": [int(index) for index in batch["chunk"]], "part": parts}


def on_ray(
    model: BatchModel, source: Source, chunks: dict[int, list[str]]
) -> Iterator[tuple[int, bytes]]:
    """Each chunk's part, scored on the Ray cluster of RAY_ADDRESS, as each comes back."""
    import ray
    import ray.data

    workers = max(1, min(len(chunks), int(ray.cluster_resources().get("CPU", 1))))
    items = [{"chunk": index, "names": json.dumps(names)} for index, names in chunks.items()]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ChunkScorer,
        batch_size=1,  # a chunk per call: each part is that chunk's alone
        compute=ray.data.ActorPoolStrategy(size=workers),
        fn_constructor_kwargs={"model": model, "source_url": source.url},
        num_cpus=1,
    )
    for row in dataset.iter_rows():
        yield int(row["chunk"]), bytes(row["part"])


def counted(table) -> tuple[Counter, Counter]:
    """Answers by label (and "neither"), and unreadable files by reason."""
    labels, errors = Counter(), Counter()
    for label, neither, error in zip(
        table["label"].to_pylist(),
        table["neither"].to_pylist(),
        table["error"].to_pylist(),
        strict=True,
    ):
        if error is not None:
            errors[error] += 1
        else:
            labels[label] += 1
            labels[NEITHER_LABEL] += bool(neither)  # a flag beside the label, counted apart
    return labels, errors


def summary(table, source: Source, out: str, chunks: int, resumed: int, where: str) -> str:
    labels, errors = counted(table)
    scored = table.num_rows - sum(errors.values())
    lines = []
    for path, error, message in zip(
        table["path"].to_pylist(),
        table["error"].to_pylist(),
        table["error_message"].to_pylist(),
        strict=True,
    ):
        if error is not None and len(lines) < LISTED:
            lines.append(f"  unreadable: {path}: {error}: {message}")
    if sum(errors.values()) > LISTED:
        lines.append(f"  ... and {sum(errors.values()) - LISTED} more (their error in {out})")
    neither = labels.pop(NEITHER_LABEL, 0)
    by_label = ", ".join(f"{label} {count}" for label, count in sorted(labels.items()))
    by_reason = ", ".join(f"{reason} {count}" for reason, count in sorted(errors.items()))
    lines.append(
        f"predict-batch: {table.num_rows} files of {source.url}: {scored} answered "
        f"({by_label or 'none'}; {neither} flagged {NEITHER_LABEL}), "
        f"{sum(errors.values())} unreadable ({by_reason or 'none'}); "
        f"{chunks} chunks, {resumed} done by an earlier run, the rest {where} -> {out}"
    )
    return "\n".join(lines)


def predict_batch(
    source_url: str, out: str, export_dir: Path, params: Path, ray_address: str | None = None
) -> str:
    """Answer every file of ``source_url`` into the Parquet file ``out``; the summary."""
    import pyarrow.parquet as pq

    model = BatchModel.read(export_dir, params)
    chunk_photos = PredictBatchParams.load(params).chunk_photos
    source = Source(source_url)
    listing = source.listing()
    names = [name for name, _ in listing]
    chunks = chunked(names, chunk_photos)
    parts = Parts(out)
    done = parts.begin(
        {
            "listing": hashlib.sha256(json.dumps(listing).encode()).hexdigest(),
            "model": model.sha256,
            "chunk_photos": chunk_photos,
            "chunks": len(chunks),
        }
    )
    todo = {index: names for index, names in enumerate(chunks) if index not in done}
    if ray_address:
        from pipeline.cluster import connected

        with connected():
            for index, data in on_ray(model, source, todo):
                parts.write(index, data)
        where = f"scored on Ray at {ray_address}"
    else:
        for index, data in in_process(model, source, todo):
            parts.write(index, data)
        where = "scored here"
    table = parts.joined(len(chunks))
    metadata = {MODEL_METADATA_KEY: json.dumps({"sha256": model.sha256, **model.description()})}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    out_fs, out_path = open_fs(out)
    write_whole(out_fs, out_path, buffer.getvalue())
    parts.remove()
    return summary(table, source, out, len(chunks), len(done), where)
