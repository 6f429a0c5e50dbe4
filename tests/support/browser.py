"""Headless Chromium (Debian's, through selenium) for the tests of pages: the service's own
page, its Swagger UI and DVC's plots page."""

from __future__ import annotations

import json
from pathlib import Path

# As the machine's own browser probe: no background traffic on a closed network.
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_SECONDS = 60  # page loads and scripts


def headless_chromium(
    chromium: str, chromedriver: str, profile: Path, *flags: str, logs=("performance",)
):
    """A Chromium driver with its own profile that records ``logs`` (DevTools' network events
    by default, so tests can check where the page's requests go)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, *flags, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", dict.fromkeys(logs, "ALL"))
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_page_load_timeout(TIMEOUT_SECONDS)
    driver.set_script_timeout(TIMEOUT_SECONDS)
    return driver


def sent_requests(driver) -> list[dict]:
    """DevTools' ``Network.requestWillBeSent`` params of every request since the last call."""
    events = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
    return [event["params"] for event in events if event["method"] == "Network.requestWillBeSent"]


def requested_urls(driver) -> list[str]:
    """The URL of every request the page has made since the last call."""
    return [params["request"]["url"] for params in sent_requests(driver)]
