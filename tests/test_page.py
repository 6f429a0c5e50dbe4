"""The web page at GET /, driven in a real headless Chromium (Debian's chromium + chromedriver)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import requests
from conftest import require_tools
from PIL import Image
from support.paths import DATASET_MIRROR

pytestmark = pytest.mark.slow

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
    "--window-size=900,900",
]


@pytest.fixture
def browser(tmp_path):
    chromium, chromedriver = require_tools("chromium", "chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_page_needs_no_external_asset(service):
    page = requests.get(f"{service.url}/", timeout=30)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page.text)


def test_choosing_a_photo_shows_the_verdict(service, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    photo = DATASET_MIRROR / "data" / "dandelion" / "00000000.jpg"
    with open(photo, "rb") as handle:
        expected = requests.post(f"{service.url}/predict", files={"image": handle}, timeout=60)
    expected = expected.json()

    browser.get(f"{service.url}/")
    browser.find_element(By.ID, "file").send_keys(str(photo))
    verdict = WebDriverWait(browser, 60).until(
        expected_conditions.presence_of_element_located((By.ID, "verdict"))
    )
    confidence = browser.find_element(By.ID, "confidence").text
    browser.save_screenshot(str(tmp_path / "page.png"))

    assert verdict.text == expected["label"]
    assert f"{100 * expected['confidence']:.1f}% confident" in confidence
    assert not expected["neither"] and browser.find_elements(By.ID, "neither") == []
    WebDriverWait(browser, 30).until(
        lambda driver: "test accuracy" in driver.find_element(By.ID, "model").text
    )


def test_a_picture_of_neither_class_says_so(service, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    picture = tmp_path / "noise.png"
    Image.fromarray(noise).save(picture)

    browser.get(f"{service.url}/")
    browser.find_element(By.ID, "file").send_keys(str(picture))
    neither = WebDriverWait(browser, 60).until(
        expected_conditions.presence_of_element_located((By.ID, "neither"))
    )
    assert "neither a dandelion nor grass" in neither.text
