"""The fixtures of the service's tests: the stub front, and a client on its app."""

from __future__ import annotations

import pytest

from tests.support.stub_service import stub_client, stub_service


@pytest.fixture(scope="module")
def stub():
    """The front on a stub engine (its app and current instance)."""
    return stub_service()


@pytest.fixture(scope="module")
def client():
    """A TestClient on the stub front's app (a new front instance per module)."""
    with stub_client() as client:
        yield client
