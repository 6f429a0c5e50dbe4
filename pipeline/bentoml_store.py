"""The BentoML internals the pipeline relies on, and nothing else of BentoML's, all in one place.

BentoML has no public API for either: tests/unit/test_bentoml_store.py exercises both on a real
store, so a BentoML upgrade that moves them fails there first.

- Which home (model and bento store) this process uses: BentoML reads ``BENTOML_HOME`` once,
  on first use, and the package stage must build in a throwaway home.
- Which version ``<name>:latest`` means: BentoML moves it to whichever bento was stored last;
  promotion pins it to the champion's.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_home() -> Path:
    """The BentoML home this process uses (resolved on BentoML's first use)."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.bentoml_home.get())


def use_home(home: Path) -> None:
    """Make ``home`` this process's BentoML home, or fail if BentoML already uses another."""
    os.environ["BENTOML_HOME"] = str(home)
    if current_home() != Path(home):
        raise RuntimeError("BentoML was used in this process before: run the stage on its own")


def set_latest(name: str, version: str) -> None:
    """Make ``<name>:latest`` the bento ``<name>:<version>`` of this home's store."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    (Path(BentoMLContainer.bento_store_dir.get()) / name / "latest").write_text(version)
