"""The fixtures of the service's tests: the stub front, a client on its app, and where
feedback goes (a directory, or an S3 bucket behind a switch)."""

from __future__ import annotations

import pytest

from tests.support.browser import headless_chromium
from tests.support.needs import require_tools
from tests.support.s3 import StoreSwitch, fresh_moto_account, moto_s3_server
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


@pytest.fixture
def feedback_dir(tmp_path, monkeypatch):
    """The service's FEEDBACK_DIR, with no store configured: the store is its `store/`."""
    monkeypatch.setenv("FEEDBACK_DIR", str(tmp_path))
    monkeypatch.delenv("FEEDBACK_STORE", raising=False)
    return tmp_path


@pytest.fixture
def s3(feedback_dir, monkeypatch):
    """A bucket on moto's server, and the service configured to store feedback in it under a
    prefix, through a switch that stops and starts the store (off until a test turns it on)."""
    with moto_s3_server() as url:
        endpoint = fresh_moto_account(url, "feedback-bucket")
        store = StoreSwitch(url)
        store.on()
        store.off()  # its port is now the store's
        monkeypatch.setenv("FEEDBACK_STORE", "s3://feedback-bucket/reviews/2024")
        monkeypatch.setenv("FEEDBACK_S3_ENDPOINT_URL", store.url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", endpoint.access_key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", endpoint.secret_access_key)
        try:
            yield store, endpoint
        finally:
            store.off()


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium (Swagger UI, the page), closed after the test."""
    tools = require_tools("chromium", "chromedriver")
    driver = headless_chromium(*tools, tmp_path / "profile", "--window-size=1200,1000")
    yield driver
    driver.quit()
