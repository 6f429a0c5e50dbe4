"""What a stage prints besides its last line: progress for long steps, and no TensorFlow noise.

TensorFlow's native code logs through Abseil, which reads no setting before the libraries load:
importing them prints Abseil's preface and a oneDNN notice whatever TF_CPP_MIN_LOG_LEVEL says.
``import_tensorflow_quietly`` therefore sets the level (3: only fatal native messages; errors
that matter reach Python as exceptions) and holds stderr back during the import, writing back
everything but those two lines. A stage calls it in ``main()``, before anything imports
TensorFlow; TensorFlow's Python warnings and any traceback still show.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

# A long step prints a progress line at most this often (dvc's output is often a log file,
# so lines, not a redrawn bar).
PROGRESS_EVERY_SECONDS = 10.0

# Written while TensorFlow's libraries load (each of two libraries has its own copy), before
# any level applies: Abseil's preface to its first message, and that message.
START_UP_NOISE = re.compile(
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|I\d{4} [\d:. ]+ \d+ port\.cc:\d+\] oneDNN custom operations are on\."
)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with its native logging at fatal only and its start-up lines dropped."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            for line in held:
                if not START_UP_NOISE.match(line):
                    os.write(2, line)


@contextlib.contextmanager
def dropped(logger: str, expected: Callable[[logging.LogRecord], bool]) -> Iterator[None]:
    """While the block runs, drop the records of ``logger`` that ``expected`` matches: a
    library's message known to be harmless there. Its other records still show."""

    def keep(record: logging.LogRecord) -> bool:
        return not expected(record)

    logging.getLogger(logger).addFilter(keep)
    try:
        yield
    finally:
        logging.getLogger(logger).removeFilter(keep)


class Progress:
    """``<label>: <done>/<total> <unit> ... <seconds> s`` lines for a long step, at most one
    every ``every`` seconds (none for a step shorter than that)."""

    def __init__(
        self,
        label: str,
        total: int,
        unit: str,
        every: float = PROGRESS_EVERY_SECONDS,
        log: Callable[[str], None] | None = None,
    ):
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.log = log or (lambda line: print(line, flush=True))
        self.started = self.last_line = time.perf_counter()
        self.done = 0

    def update(self, done: int, detail: str = "") -> None:
        """``done`` of ``total`` are done; ``detail`` says more (e.g. "2 failed")."""
        self.done = done
        now = time.perf_counter()
        if now - self.last_line >= self.every:
            self.last_line = now
            note = f" ({detail})" if detail else ""
            self.log(
                f"{self.label}: {done:,}/{self.total:,} {self.unit}{note}, "
                f"{now - self.started:.1f} s"
            )

    def advance(self, count: int, detail: str = "") -> None:
        """``count`` more are done."""
        self.update(self.done + count, detail)
