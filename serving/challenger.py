"""The challenger: a second model beside the champion, in shadow or in canary.

The deployment names it when the service starts (settings: CHALLENGER, CHALLENGER_MODE,
CANARY_PERCENT; docs/serving.md, *Challenger: shadow and canary*): a bento tag in BentoML's
store, or a bento archive, which is extracted to a temporary directory. Its card must have the
champion's classes (in order) and image size, and another version; otherwise the service
refuses to start.

Its engine runs in a child process of the front (``Worker``), started with ``spawn`` (the
front already runs threads: a fork could copy a held lock), fed uint8 images over a pipe. So
in shadow mode all of its engine's threads run at the lowest CPU priority, which a thread pool
inside the front could not ensure; a worker that dies or hangs fails its calls at once, and is
started again after a back-off. In shadow mode ``Shadow`` scores the champion's photos from a
bounded queue, off the request path, and sheds what does not fit; in canary mode ``Canary``
says which requests the challenger answers, stickily.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import multiprocessing
import os
import queue
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from serving.contract import MODEL_NAME, ModelCard
from serving.engines import Scorer, load_engine
from serving.settings import (
    CANARY,
    CANARY_BUCKETS,
    CANARY_PERCENT_ENV,
    CHALLENGER_CALL_SECONDS,
    CHALLENGER_ENV,
    CHALLENGER_MODE_ENV,
    CHALLENGER_MODES,
    CHALLENGER_RESTART_SECONDS,
    CHALLENGER_START_SECONDS,
    SHADOW,
    SHADOW_CALL_PHOTOS,
    SHADOW_NICENESS,
    SHADOW_QUEUE_PHOTOS,
)

logger = logging.getLogger("bentoml.service.dandelion")


class ChallengerFailed(Exception):
    """A call of the challenger's worker that gave no scores: dead, hung or failing."""


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ChallengerConfig:
    source: str  # CHALLENGER: a bento tag or a bento archive's path
    mode: str  # one of CHALLENGER_MODES
    percent: float | None  # CANARY_PERCENT, in canary mode


def challenger_config(environ=os.environ) -> ChallengerConfig | None:
    """The deployment's challenger, or None; ValueError saying what is wrong."""
    source = environ.get(CHALLENGER_ENV, "").strip()
    if not source:
        return None
    mode = environ.get(CHALLENGER_MODE_ENV, "").strip() or SHADOW
    if mode not in CHALLENGER_MODES:
        raise ValueError(
            f"{CHALLENGER_MODE_ENV} must be one of {list(CHALLENGER_MODES)}, not {mode!r}"
        )
    if mode != CANARY:
        return ChallengerConfig(source, mode, None)
    text = environ.get(CANARY_PERCENT_ENV, "").strip()
    try:
        percent = float(text)
    except ValueError:
        percent = float("nan")
    if not 0.0 <= percent <= 100.0:  # NaN too
        raise ValueError(
            f"{CANARY_PERCENT_ENV} must be a number from 0 to 100 in canary mode (the share of "
            f"requests the challenger answers), not {text!r}"
        )
    return ChallengerConfig(source, mode, percent)


# --- the canary split ------------------------------------------------------------------------


def bucket(digest: bytes) -> int:
    """A sha256 digest's bucket: its first 8 bytes, modulo CANARY_BUCKETS."""
    return int.from_bytes(digest[:8], "big") % CANARY_BUCKETS


@dataclass(frozen=True)
class Canary:
    percent: float

    def challenger_answers(self, client_key: str | None, photo_sha256: bytes) -> bool:
        """Whether the challenger answers this photo: by the client's key when it sent one
        (each client always gets the same model), else by the photo (each photo does)."""
        digest = hashlib.sha256(client_key.encode()).digest() if client_key else photo_sha256
        return bucket(digest) < self.percent * CANARY_BUCKETS / 100


# --- loading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Export:
    """The challenger's card and export directory (its engine's files)."""

    card: ModelCard
    directory: Path
    extracted: Path | None  # the temporary directory a bento archive was extracted to


def load_export(source: str) -> Export:
    """The model CHALLENGER names: a bento archive (a path) or a tag in BentoML's store."""
    path = Path(source).expanduser()
    if path.suffix == ".bento" or os.sep in source or path.is_file():
        return extracted_export(path, source)
    name, _, version = source.partition(":")
    if name != MODEL_NAME or not version:
        raise ValueError(
            f"{CHALLENGER_ENV}={source!r} is neither a bento archive nor a tag "
            f"'{MODEL_NAME}:<version>' of BentoML's store"
        )
    import bentoml

    try:
        stored = bentoml.models.get(f"{MODEL_NAME}:{version}")
    except bentoml.exceptions.NotFound:
        raise ValueError(
            f"{CHALLENGER_ENV}={source!r}: no model '{MODEL_NAME}:{version}' in BentoML's store "
            "(`bentoml import` its bento first, or name the archive)"
        ) from None
    return Export(ModelCard.from_metadata(stored.info.metadata), Path(stored.path), None)


def extracted_export(archive: Path, source: str) -> Export:
    """The one model of a bento archive, extracted to a new temporary directory."""
    if not archive.is_file():
        raise ValueError(f"{CHALLENGER_ENV}={source!r}: no such bento archive")
    target = Path(tempfile.mkdtemp(prefix="dandelion-challenger-"))
    try:
        try:
            with tarfile.open(archive) as bento:
                models = [m for m in bento.getmembers() if m.name.startswith("models/")]
                # The "data" filter refuses what a model has no use for and an archive could
                # abuse: absolute paths, `..`, links out of the directory, devices.
                bento.extractall(target, members=models, filter="data")
        except (tarfile.TarError, OSError) as error:
            raise ValueError(
                f"{CHALLENGER_ENV}={source!r} is not a bento archive: {error}"
            ) from None
        cards = sorted(target.glob("models/*/*/model.yaml"))
        if len(cards) != 1:
            raise ValueError(
                f"{CHALLENGER_ENV}={source!r}: a bento of this service holds one model, "
                f"this one {len(cards)}"
            )
        metadata = yaml.safe_load(cards[0].read_text())["metadata"]
        return Export(ModelCard.from_metadata(metadata), cards[0].parent, target)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise


def check_challenger(champion: ModelCard, challenger: ModelCard) -> None:
    """Refuse a challenger whose answers cannot be compared with the champion's."""
    problems = []
    if list(challenger.classes) != list(champion.classes):
        problems.append(f"classes {challenger.classes}, not the champion's {champion.classes}")
    if challenger.image_size != champion.image_size:
        problems.append(
            f"image_size {challenger.image_size}, not the champion's {champion.image_size}"
        )
    if challenger.engine != champion.engine:
        # The champion's bento installs its own engine's packages only (engines.py
        # ENGINE_PACKAGES): another engine would fail to load in its image.
        problems.append(f"engine {challenger.engine}, not the champion's {champion.engine}")
    if challenger.version == champion.version:
        problems.append(f"the champion's own version ({champion.version})")
    if problems:
        raise ValueError(f"the challenger ({CHALLENGER_ENV}) has {'; '.join(problems)}")


# --- the worker process ----------------------------------------------------------------------


def serve_scores(connection, load: Callable[[str], Scorer], directory: str, size: int, nice: int):
    """The worker process: load the engine (warmed up), then score each array it receives."""
    if nice:
        os.nice(nice)  # before the engine starts its threads, which inherit it
    score = load(directory)
    score(np.zeros((1, size, size, 3), dtype=np.uint8))
    connection.send(("ready", None, 0.0))
    while True:
        try:
            images = connection.recv()
        except (EOFError, OSError):  # the front is gone
            return
        started = time.perf_counter()
        try:
            outputs = np.asarray(score(images), dtype=np.float32)
        except Exception as error:  # reported to the front, which counts it
            connection.send(("error", repr(error), time.perf_counter() - started))
        else:
            connection.send(("ok", outputs, time.perf_counter() - started))


class Worker:
    """The challenger's engine in a child process: ``score`` from any thread (one call at a
    time), failing fast while the process is down; a dead process is started again after
    CHALLENGER_RESTART_SECONDS (doubling)."""

    def __init__(
        self,
        directory: Path | str,
        image_size: int,
        niceness: int,
        load: Callable[[str], Scorer] = load_engine,
        call_seconds: float = CHALLENGER_CALL_SECONDS,
    ) -> None:
        self.args = (load, str(directory), image_size, niceness)
        self.call_seconds = call_seconds
        self.lock = threading.Lock()  # one call at a time on the pipe
        self.process = None
        self.connection = None  # None while the process is down
        self.stopping = threading.Event()
        self.down = threading.Event()  # wakes the keeper
        self.keeper: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        """Start the process and wait until its engine is loaded (a challenger that cannot
        load stops the service from starting), then keep it running."""
        self.process, self.connection = self.launch()
        self.keeper = threading.Thread(target=self.keep, name="challenger-keeper", daemon=True)
        self.keeper.start()

    def launch(self) -> tuple:
        """A new worker process, its engine loaded, and the front's end of its pipe."""
        context = multiprocessing.get_context("spawn")
        mine, theirs = context.Pipe()
        process = context.Process(
            target=serve_scores, args=(theirs, *self.args), name="challenger", daemon=True
        )
        process.start()
        theirs.close()
        try:
            if not mine.poll(CHALLENGER_START_SECONDS):
                raise ChallengerFailed(f"not loaded within {CHALLENGER_START_SECONDS:.0f} s")
            mine.recv()
        except (EOFError, OSError, ChallengerFailed) as error:
            process.kill()
            process.join()
            mine.close()
            if isinstance(error, ChallengerFailed):
                raise
            raise ChallengerFailed(
                f"the challenger's worker exited while loading (code {process.exitcode})"
            ) from None
        return process, mine

    def score(self, images: np.ndarray) -> tuple[np.ndarray, float]:
        """The challenger's outputs for ``images`` and its engine's seconds; ChallengerFailed."""
        with self.lock:
            connection = self.connection
            if connection is None:
                raise ChallengerFailed("the challenger's worker is down (restarting)")
            try:
                connection.send(images)
                if not connection.poll(self.call_seconds):
                    self.lost(f"no answer within {self.call_seconds:.0f} s")
                    raise ChallengerFailed(f"no answer within {self.call_seconds:.0f} s")
                status, outputs, seconds = connection.recv()
            except (EOFError, OSError) as error:
                self.lost(f"its pipe failed ({error!r})")
                raise ChallengerFailed("the challenger's worker died") from None
        if status != "ok":
            raise ChallengerFailed(f"the challenger's engine failed: {outputs}")
        return outputs, seconds

    def lost(self, why: str) -> None:
        """The process is no use any more (dead, or hung with a call on its pipe): kill it and
        let the keeper start another. Called holding the lock."""
        logger.warning("challenger worker (pid %s) lost: %s", self.pid, why)
        if self.process is not None:
            self.process.kill()
        if self.connection is not None:
            self.connection.close()
        self.connection = None
        self.down.set()

    def keep(self) -> None:
        low, high = CHALLENGER_RESTART_SECONDS
        wait = low
        while not self.stopping.is_set():
            self.down.wait()
            if self.stopping.wait(wait):
                return
            if self.process is not None:
                self.process.join()  # reaped (lost() killed it)
            try:  # not holding the lock: calls meanwhile fail at once
                process, connection = self.launch()
            except Exception as error:  # export gone, engine failing: try again later
                wait = min(wait * 2, high)
                logger.warning("challenger worker not restarted (%s): next in %.0f s", error, wait)
                continue
            with self.lock:
                if self.stopping.is_set():
                    connection.close()
                    process.join(5)
                    return
                self.process, self.connection = process, connection
                self.down.clear()
            wait = low
            logger.info("challenger worker restarted (pid %s)", self.pid)

    def stop(self) -> None:
        self.stopping.set()
        self.down.set()
        # Bounded: a call under way holds the lock for at most call_seconds; past that the
        # process is killed without waiting for it.
        held = self.lock.acquire(timeout=self.call_seconds)
        try:
            if held and self.connection is not None:
                self.connection.close()  # the worker reads EOF and exits
                self.connection = None
            if self.process is not None:
                self.process.join(5 if held else 0)
                if self.process.is_alive():
                    self.process.kill()
                    self.process.join()
        finally:
            if held:
                self.lock.release()
        if self.keeper is not None:
            self.keeper.join(5)


# --- the challenger --------------------------------------------------------------------------


@dataclass
class Challenger:
    """The challenger a front serves beside its champion."""

    card: ModelCard
    mode: str
    worker: Worker
    canary: Canary | None = None
    extracted: Path | None = None

    @classmethod
    def from_environ(cls, champion: ModelCard, environ=os.environ) -> Challenger | None:
        """The deployment's challenger, checked against ``champion``, its worker started;
        None if there is none; ValueError (or ChallengerFailed) saying why it cannot be."""
        config = challenger_config(environ)
        if config is None:
            return None
        export = load_export(config.source)
        try:
            check_challenger(champion, export.card)
            niceness = SHADOW_NICENESS if config.mode == SHADOW else 0
            worker = Worker(export.directory, export.card.image_size, niceness)
            worker.start()
        except BaseException:
            if export.extracted is not None:
                shutil.rmtree(export.extracted, ignore_errors=True)
            raise
        canary = Canary(config.percent) if config.mode == CANARY else None
        return cls(export.card, config.mode, worker, canary, export.extracted)

    def stop(self) -> None:
        self.worker.stop()
        if self.extracted is not None:
            shutil.rmtree(self.extracted, ignore_errors=True)


# --- shadow scoring --------------------------------------------------------------------------


@dataclass(frozen=True)
class ShadowPhoto:
    """A photo the champion answered, to be scored again by the challenger."""

    image: np.ndarray  # decoded, as the champion scored it
    answer: dict  # the champion's verdict (label, neither) and the answer's record fields


class Shadow:
    """Scores the champion's photos with the challenger, in a thread of its own, from a queue
    of at most SHADOW_QUEUE_PHOTOS; ``scored`` gets each batch's photos, outputs and engine
    seconds (or the failure), ``shed`` each photo that found the queue full, ``depth`` the
    queue's length when it changes."""

    def __init__(
        self,
        worker: Worker,
        scored: Callable[[list[ShadowPhoto], np.ndarray | None, float], None],
        shed: Callable[[int], None],
        depth: Callable[[int], None],
    ) -> None:
        self.worker, self.scored, self.shed, self.depth = worker, scored, shed, depth
        self.queue: queue.Queue[ShadowPhoto | None] = queue.Queue(SHADOW_QUEUE_PHOTOS)
        self.thread = threading.Thread(target=self.run, name="shadow", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def offer(self, photos: list[ShadowPhoto]) -> None:
        """Queue ``photos`` for the challenger, never waiting: what does not fit is shed."""
        shed = 0
        for photo in photos:
            try:
                self.queue.put_nowait(photo)
            except queue.Full:
                shed += 1
        if shed:
            self.shed(shed)
        self.depth(self.queue.qsize())

    def run(self) -> None:
        while True:
            batch = [self.queue.get()]
            while len(batch) < SHADOW_CALL_PHOTOS:
                with contextlib.suppress(queue.Empty):
                    batch.append(self.queue.get_nowait())
                    continue
                break
            self.depth(self.queue.qsize())
            photos = [photo for photo in batch if photo is not None]
            if photos:
                try:
                    outputs, seconds = self.worker.score(np.stack([p.image for p in photos]))
                except ChallengerFailed:
                    outputs, seconds = None, 0.0
                try:
                    self.scored(photos, outputs, seconds)
                except Exception:  # a bug in counting must not end the shadow for good
                    logger.exception("shadow: the challenger's scores could not be counted")
            if len(photos) < len(batch):  # stop() was called: what was queued before is done
                return

    def stop(self, within: float) -> None:
        """Score what is queued, within ``within`` seconds; then the thread ends."""
        deadline = time.monotonic() + within
        while True:
            try:
                self.queue.put(None, timeout=max(deadline - time.monotonic(), 0.01))
                break
            except queue.Full:
                if time.monotonic() >= deadline:
                    with contextlib.suppress(queue.Empty):
                        self.queue.get_nowait()  # dropped: shutting down
        self.thread.join(max(deadline - time.monotonic(), 0.0))
