"""What a test needs beyond the development install: ../shared, or Debian-packaged tools.

Where CI runs (``CI`` set) a missing need fails the test; on a contributor's machine it skips.
"""

from __future__ import annotations

import os
import shutil

import pytest


def require_shared(path):
    """The shared mirror exists in CI; on a user's machine without it, skip instead."""
    if path.exists():
        return
    if os.environ.get("CI"):
        pytest.fail(f"{path} is missing: CI must have ../shared beside the checkout")
    pytest.skip(f"{path} not present (it ships beside the repo on build machines only)")


def require_tools(*names: str) -> list[str]:
    """Paths of Debian-packaged tools the test needs: .ci/run installs them; elsewhere, skip."""
    found = {name: shutil.which(name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing} missing: .ci/run installs them (apt-get)")
        pytest.skip(f"not installed (Debian packages): {missing}")
    return list(found.values())
