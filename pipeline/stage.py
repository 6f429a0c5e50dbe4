"""What every stage's ``main()`` shares: its command line, its one-line failures, its last line.

A stage's ``main()`` returns what it did, and ``summarised`` prints it as the stage's last line
with how long it took: ``<stage>: <what it did> in <seconds> s``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path


class StageError(Exception):
    """An expected failure (bad params, missing weights, no network...): the stage ends with
    one line that says what to do, not a traceback."""


def arguments(argv: list[str] | None, description: str | None, *paths: str) -> argparse.Namespace:
    """The stage's command line: the paths dvc.yaml gives it, named in order."""
    parser = argparse.ArgumentParser(description=description)
    for name in paths:
        parser.add_argument(name, type=Path)
    return parser.parse_args(argv)


def summarised(stage: str) -> Callable[[Callable[..., str]], Callable[..., str]]:
    """For a stage's ``main()``, which returns what it did: print ``<stage>: <what it did> in
    <seconds> s`` as its last line, or exit with ``<stage> failed: <reason>`` on a StageError.

    The time counts from the call: the stages import TensorFlow inside ``main()``, so loading
    it counts too."""

    def decorate(main: Callable[..., str]) -> Callable[..., str]:
        @functools.wraps(main)
        def wrapped(*args, **kwargs) -> str:
            started = time.perf_counter()
            try:
                done = main(*args, **kwargs)
            except StageError as error:
                sys.exit(f"{stage} failed: {error}")
            print(f"{stage}: {done} in {time.perf_counter() - started:.1f} s", flush=True)
            return done

        return wrapped

    return decorate
