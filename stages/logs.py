"""What a stage prints: its own lines, progress for long steps, and no third-party noise.

- ``start_stage_process()`` (called by ``stages/__init__.py`` in a ``python -m stages.<name>``
  process, before anything imports TensorFlow) drops TensorFlow's known C++ start-up and
  tf.data lines from the process's stderr and notes when the stage started.
- ``Progress``: a line now and then, with counts, for steps that take more than seconds.
- ``summarised``: a stage's ``main()`` returns what it did, and this prints it as the stage's
  last line with how long the stage took, e.g. ``features: 3 splits, 398 photos ->
  data/features in 26.2 s``.

Only the standard library is imported here: this file also runs as the stderr filter process.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable

# Lines TensorFlow's C++ code writes to stderr whatever TF_CPP_MIN_LOG_LEVEL says: since
# TensorFlow 2.21 these come through Abseil logging, which has no environment setting, and the
# first two are written by the static initialisers of its libraries (libtensorflow_framework
# and the profiler plugin each carry a copy), before any Python code can configure anything.
# Each is expected and harmless, so exactly these lines are dropped; every other line passes.
NATIVE_NOISE = re.compile(
    rb"|".join(
        [
            # Abseil's preface to the first message logged before absl::InitializeLog().
            rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written"
            rb" to STDERR$",
            # oneDNN is on for this CPU. Turning it off (TF_ENABLE_ONEDNN_OPTS=0) would silence
            # it too, but changes the features' floating-point results.
            rb"I\d{4} [\d:. ]+ \d+ port\.cc:\d+\] oneDNN custom operations are on\.",
            # Op determinism (stages/backbone.py make_deterministic) makes tf.data rewrite
            # Keras' parallel map into a plain MapDataset, copying an attribute that op does not
            # have; the attribute is ignored. Logged once per traced predict or fit.
            rb"E\d{4} [\d:. ]+ \d+ node_def_util\.cc:\d+\] NodeDef mentions attribute"
            rb" use_unbounded_threadpool which is not in the op definition: Op<name=MapDataset;",
        ]
    )
)

# A long step prints a progress line at most this often (dvc's output is often a log file,
# so lines, not a redrawn bar).
PROGRESS_EVERY_SECONDS = 10.0

# At exit, how long a stage waits for the filter to pass its last lines on. Only a child process
# that outlives the stage and keeps its stderr (a daemon) makes it wait that long.
DRAIN_WAIT_SECONDS = 10.0

_stage_started: float | None = None


def start_stage_process() -> None:
    """In a stage's own process: note the start time, and filter native noise from stderr."""
    global _stage_started
    _stage_started = time.perf_counter()
    drop_native_noise()


def drop_native_noise() -> None:
    """Route this process's stderr (file descriptor 2, which its C++ libraries and child
    processes share) through a filter process that drops ``NATIVE_NOISE`` lines.

    A separate process, not a thread: if the stage dies abruptly (a C++ abort), the filter
    still reads everything written before, so no error message is lost.
    """
    try:
        original = os.dup(2)
        drain = subprocess.Popen(
            [sys.executable, "-I", "-S", __file__],
            stdin=subprocess.PIPE,
            stdout=original,
            stderr=original,
        )
    except OSError:  # no usable stderr: nothing to filter
        return
    sys.stderr.flush()
    pipe = os.fstat(drain.stdin.fileno())
    os.dup2(drain.stdin.fileno(), 2)
    drain.stdin.close()

    def restore() -> None:
        # Give up our end of the pipe so the filter sees the end, and wait for its last lines.
        sys.stderr.flush()
        os.dup2(original, 2)
        # Libraries may hold copies of the pipe: vl-convert's JavaScript runtime (the plots
        # stage) dups stderr for the life of the process, and the filter would never see the
        # end. Point every copy at the real stderr instead, so a late write still shows.
        for fd in copies_of(pipe):
            os.dup2(original, fd)
        try:
            drain.wait(timeout=DRAIN_WAIT_SECONDS)
        except subprocess.TimeoutExpired:  # a child process still holds the pipe open
            pass

    atexit.register(restore)


def copies_of(file: os.stat_result) -> list[int]:
    """This process's file descriptors open on ``file`` (none where the OS cannot list them)."""
    try:
        listed = os.listdir("/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd")
    except OSError:
        return []
    copies = []
    for name in listed:
        try:
            found = os.fstat(int(name))
        except (OSError, ValueError):  # closed meanwhile (listdir's own descriptor)
            continue
        if (found.st_dev, found.st_ino) == (file.st_dev, file.st_ino):
            copies.append(int(name))
    return copies


def pass_through(source, target) -> None:
    """Copy ``source``'s lines to ``target`` (binary streams), except ``NATIVE_NOISE``."""
    for line in source:
        if not NATIVE_NOISE.match(line):
            target.write(line)
            target.flush()


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
        self.log = log or _print
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


def summarised(stage: str) -> Callable[[Callable], Callable]:
    """For a stage's ``main()``, which returns what it did: print ``<stage>: <what it did>
    in <seconds> s`` as its last line. The time counts from the stage process's start (so
    loading TensorFlow counts too), or from the call when ``main()`` is called in-process."""

    def decorate(main: Callable[..., str]) -> Callable[..., str]:
        @functools.wraps(main)
        def wrapped(*args, **kwargs) -> str:
            global _stage_started
            started, _stage_started = _stage_started or time.perf_counter(), None
            done = main(*args, **kwargs)
            _print(f"{stage}: {done} in {time.perf_counter() - started:.1f} s")
            return done

        return wrapped

    return decorate


def _print(line: str) -> None:
    print(line, flush=True)


if __name__ == "__main__":  # the filter process of drop_native_noise
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: drain until the stage has ended
    pass_through(sys.stdin.buffer, sys.stdout.buffer)
