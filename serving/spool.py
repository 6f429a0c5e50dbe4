"""Feedback accepted and not yet stored: the spool on disk, and the thread that empties it.

A feedback is answered 2xx only once it is in the spool: one file per entry, written whole
and fsync'd (file and directory) before the answer. The ``Flusher`` thread then puts each
entry into the store (serving/stores.py) and only then removes it, so an entry leaves the
spool only for the store. While the store is down entries wait, and are tried again every
FLUSH_RETRY_SECONDS; the spool is bounded (``SpoolFull`` past its bounds: the request is
refused, nothing accepted is dropped), and a spool left by a stopped service is flushed when
the next one starts.

An entry that cannot be read back as one (a damaged disk, a hand edit) is set aside in
``quarantine/`` beside the others, kept for a person to look at, so that it blocks no other.

An entry is named ``<photo sha256>.<label>``: the same feedback twice is one entry, and one
record in the store. In the store the photo is ``photos/<sha256>`` and the record
``records/<sha256>/<label>.json`` (the record last, so a stored record always has its photo).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from serving.settings import FLUSH_RETRY_SECONDS, SPOOL_MAX_BYTES, SPOOL_MAX_ENTRIES
from serving.stores import photo_key, record_key

logger = logging.getLogger("bentoml.service.dandelion")

ENTRY_SUFFIX = ".feedback"
QUARANTINE = "quarantine"  # a subdirectory of the spool's


class SpoolFull(Exception):
    pass


def pack(record: dict, photo: bytes) -> bytes:
    """An entry: the record as one line of JSON, then the photo's bytes."""
    return json.dumps(record, sort_keys=True).encode() + b"\n" + photo


def store_objects(entry: bytes) -> list[tuple[str, bytes]]:
    """The store's keys and objects of an entry, the record last."""
    line, _, photo = entry.partition(b"\n")
    record = json.loads(line)
    sha256 = record["photo_sha256"]
    return [(photo_key(sha256), photo), (record_key(sha256, record["label"]), line)]


def fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class Spool:
    """Entries in ``directory`` (made at the first one), at most ``max_entries`` and
    ``max_bytes``; thread-safe. ``on_change(entries, bytes)`` follows its depth."""

    def __init__(
        self,
        directory: Path,
        max_entries: int = SPOOL_MAX_ENTRIES,
        max_bytes: int = SPOOL_MAX_BYTES,
        on_change=lambda entries, size: None,
    ) -> None:
        self.directory, self.max_entries, self.max_bytes = directory, max_entries, max_bytes
        self.on_change = on_change
        self.lock = threading.Lock()
        self.sizes: dict[str, int] = {}  # entry name -> bytes
        self.versions: dict[str, int] = {}  # entry name -> which write it holds
        self.writes = 0
        if directory.is_dir():  # left by a service that stopped before flushing it
            # A write cut short before its rename was never answered 2xx: nothing to keep.
            for partial in directory.glob(f".*{ENTRY_SUFFIX}.partial"):
                partial.unlink()
            for path in directory.glob(f"*{ENTRY_SUFFIX}"):
                self.sizes[path.name] = path.stat().st_size
                self.versions[path.name] = 0
        self.on_change(*self.depth())

    def depth(self) -> tuple[int, int]:
        return len(self.sizes), sum(self.sizes.values())

    def add(self, name: str, entry: bytes) -> None:
        """Write the entry durably (replacing one of the same name), or SpoolFull."""
        name += ENTRY_SUFFIX
        with self.lock:
            others = {key: size for key, size in self.sizes.items() if key != name}
            if len(others) + 1 > self.max_entries or sum(others.values()) + len(entry) > (
                self.max_bytes
            ):
                raise SpoolFull(
                    f"the feedback spool is full ({len(self.sizes)} entries, "
                    f"{sum(self.sizes.values())} bytes) while the store is unreachable"
                )
            self.directory.mkdir(parents=True, exist_ok=True)
            partial = self.directory / f".{name}.partial"
            with open(partial, "wb") as handle:
                handle.write(entry)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(partial, self.directory / name)
            fsync_directory(self.directory)
            self.writes += 1
            self.sizes[name], self.versions[name] = len(entry), self.writes
            self.on_change(*self.depth())

    def pending(self) -> list[tuple[str, int]]:
        """The entries' names and versions, oldest write first."""
        with self.lock:
            return sorted(self.versions.items(), key=lambda item: item[1])

    def read(self, name: str) -> bytes:
        return (self.directory / name).read_bytes()

    def set_aside(self, name: str, version: int) -> None:
        """Move an entry that cannot be read as one into QUARANTINE, out of the queue."""
        with self.lock:
            if self.versions.get(name) != version:
                return
            (self.directory / QUARANTINE).mkdir(exist_ok=True)
            os.replace(self.directory / name, self.directory / QUARANTINE / name)
            fsync_directory(self.directory)
            del self.sizes[name], self.versions[name]
            self.on_change(*self.depth())

    def remove(self, name: str, version: int) -> None:
        """Remove the entry once stored, unless a newer write replaced it meanwhile."""
        with self.lock:
            if self.versions.get(name) != version:
                return
            (self.directory / name).unlink(missing_ok=True)
            fsync_directory(self.directory)
            del self.sizes[name], self.versions[name]
            self.on_change(*self.depth())


class Flusher:
    """A thread that puts the spool's entries into ``store``, oldest first; started with
    the service (``start``), woken at each new entry (``wake``), stopped at its end."""

    def __init__(self, spool: Spool, store, on_stored, on_failure, on_set_aside) -> None:
        self.spool, self.store = spool, store
        self.on_stored, self.on_failure, self.on_set_aside = on_stored, on_failure, on_set_aside
        self.woken = threading.Event()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.run, name="feedback-flusher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def wake(self) -> None:
        self.woken.set()

    def stop(self, within: float) -> None:
        """One last pass over the spool, for at most ``within`` seconds; what is left stays
        on disk for the next start."""
        self.stopping.set()
        self.woken.set()
        if self.thread.is_alive():
            self.thread.join(within)
        left, _ = self.spool.depth()
        if left:
            logger.warning("feedback: %d entries stay spooled in %s", left, self.spool.directory)

    def run(self) -> None:
        while True:
            self.woken.clear()
            flushed = self.flush()
            if self.stopping.is_set():
                return
            self.woken.wait(None if flushed else FLUSH_RETRY_SECONDS)

    def flush(self) -> bool:
        """Store every entry spooled; False at the first the store fails to take."""
        for name, version in self.spool.pending():
            try:
                objects = store_objects(self.spool.read(name))
            except FileNotFoundError:
                # Another service's flusher on the same spool directory stored it (it deletes
                # an entry only once stored): nothing is lost, it is just no longer ours.
                self.spool.remove(name, version)
                continue
            except (ValueError, KeyError) as error:  # not an entry as pack() writes one
                logger.error("feedback: %s is unreadable (%r): set aside", name, error)
                self.spool.set_aside(name, version)
                self.on_set_aside()
                continue
            try:
                for key, data in objects:
                    self.store.put(key, data)
            except Exception as error:  # the store is down, refuses, times out
                logger.warning("feedback: storing %s in %s failed: %r", name, self.store, error)
                self.on_failure()
                return False
            self.spool.remove(name, version)
            self.on_stored()
        return True
