"""The feedback spool on its own (serving/spool.py): what a crash or a damaged entry leaves on
its disk neither blocks the feedback accepted nor is taken for feedback."""

from __future__ import annotations

from collections import Counter

from serving.spool import ENTRY_SUFFIX, QUARANTINE, Flusher, Spool, pack
from serving.stores import LocalStore

DAMAGED = f"{'0' * 64}.grass{ENTRY_SUFFIX}"
CUT_SHORT = f".{'1' * 64}.grass{ENTRY_SUFFIX}.partial"
GOOD_SHA256 = "2" * 64


def test_a_damaged_entry_is_set_aside_and_a_cut_short_write_dropped_blocking_no_feedback(
    tmp_path,
):
    directory = tmp_path / "spool"
    directory.mkdir()
    (directory / DAMAGED).write_bytes(b"not an entry")  # the oldest: first in the queue
    (directory / CUT_SHORT).write_bytes(b"never renamed, never answered")
    spool = Spool(directory)
    assert not (directory / CUT_SHORT).exists()
    record = {"photo_sha256": GOOD_SHA256, "label": "dandelion"}
    spool.add(f"{GOOD_SHA256}.dandelion", pack(record, b"the photo"))
    events = Counter()
    store = tmp_path / "store"
    flusher = Flusher(
        spool,
        LocalStore(store),
        on_stored=lambda: events.update(["stored"]),
        on_failure=lambda: events.update(["failed"]),
        on_set_aside=lambda: events.update(["set aside"]),
    )
    assert flusher.flush() is True
    assert events == {"stored": 1, "set aside": 1}
    assert (store / "photos" / GOOD_SHA256).read_bytes() == b"the photo"
    assert spool.depth() == (0, 0)
    # Kept for a person to look at, out of the queue.
    assert (directory / QUARANTINE / DAMAGED).read_bytes() == b"not an entry"
    assert not (directory / DAMAGED).exists()
