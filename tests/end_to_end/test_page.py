"""The web page at GET /, driven in a real headless Chromium (Debian's chromium + chromedriver).

Every expected value comes from the running service itself (its /predict_batch, /predict and
/model-info answers for the same files), never from constants here.
"""

from __future__ import annotations

import re
import shutil
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests
from PIL import Image, ImageStat

from tests.support.browser import headless_chromium, requested_urls
from tests.support.needs import require_tools
from tests.support.service import split_photos

pytestmark = pytest.mark.slow

DESKTOP, PHONE = (1000, 1400), (390, 844)  # window sizes (CSS px)
WAIT_SECONDS = 60  # for any one thing the page shows; the test's own bound

# Hands files to the page as a drag and drop does: a `drop` event carrying them. Selenium can
# only put files into an <input type=file>, so this adds a hidden one, and its `change` turns
# into the drop on the drop zone.
DROP_FILES_SCRIPT = """
const zone = document.getElementById("drop");
const input = document.createElement("input");
input.type = "file";
input.multiple = true;
input.id = "test-drop-source";
input.style.display = "none";
input.addEventListener("change", () => {
  const transfer = new DataTransfer();
  for (const file of input.files) transfer.items.add(file);
  const options = { dataTransfer: transfer, bubbles: true, cancelable: true };
  zone.dispatchEvent(new DragEvent("dragover", options));
  zone.dispatchEvent(new DragEvent("drop", options));
});
document.body.append(input);
"""


@pytest.fixture
def browser(tmp_path):
    driver = headless_chromium(*require_tools("chromium", "chromedriver"), tmp_path / "profile")
    driver.set_window_size(*DESKTOP)
    yield driver
    driver.quit()


def wait_for(browser, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, WAIT_SECONDS).until(condition, message)


# What the page shows for each photo, read in one go (the page redraws its lists whole).
CARDS_SCRIPT = """
const text = (node, selector) => node.querySelector(selector)?.textContent ?? null;
return [...document.querySelectorAll(arguments[0])].map((item) => ({
  filename: item.dataset.filename,
  verdict: text(item, ".verdict"),
  confidence: text(item, ".confidence"),
  bar: item.querySelector(".bar")?.getAttribute("aria-label") ?? null,
  neither: text(item, ".neither"),
  failed: text(item, ".failed"),
  text: item.innerText,
}));
"""


def shown(browser, selector: str) -> list[dict]:
    return browser.execute_script(CARDS_SCRIPT, selector)


def finished_cards(browser, count: int) -> list[dict]:
    """The verdict cards once ``count`` of them have an answer or an error, and the history
    has them too."""

    def done(driver):
        cards = shown(driver, "#verdicts li.card")
        answered = [card for card in cards if card["verdict"] or card["failed"]]
        history = shown(driver, "#history-list li")
        return cards if len(answered) == len(cards) == len(history) == count else False

    return wait_for(browser, done, f"{count} verdicts never appeared")


def thumbnails_loaded(browser, selector: str) -> list[int]:
    """naturalWidth of each image matched, once all have finished loading (0: broken)."""
    script = """
    const images = [...document.querySelectorAll(arguments[0])];
    return images.every((image) => image.complete) && images.map((image) => image.naturalWidth);
    """
    return wait_for(browser, lambda d: d.execute_script(script, selector), "thumbnails not loaded")


def percent(value: float) -> str:
    """``value`` as the page writes a percentage: JavaScript's ``(100 * value).toFixed(1)``
    rounds the product's exact binary value half up, where Python's format rounds half to even
    (an answer's 0.7025 is 70.3% on the page, 70.2% by ``f"{70.25:.1f}"``)."""
    exact = Decimal(100 * value).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)
    return f"{exact}%"


def shown_metric(value: float) -> list[str]:
    """How the page may show a test metric: a percentage, or a score (areas under curves)."""
    return [percent(value), f"{value:.3f}"]


def assert_not_blank(png_path):
    image = Image.open(png_path).convert("RGB")
    grey = ImageStat.Stat(image.convert("L"))
    colours = image.getcolors(maxcolors=1 << 20) or []
    # A blank or single-colour page has no spread; this one has text, two photos and bars.
    assert grey.stddev[0] > 20 and len(colours) > 1000, (grey.stddev, len(colours))


def test_page_needs_no_external_asset(service):
    page = requests.get(f"{service.url}/", timeout=30)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page.text)
    assert not re.search(r"""(@import|url\()\s*["']?(https?:)?//""", page.text)


def test_dropping_two_photos_shows_both_verdicts_the_history_and_the_model_card(
    service, browser, tmp_path
):
    from selenium.webdriver.common.by import By

    # One test-split photo of each class, renamed so that each name says which it is.
    photos = []
    for label in ("dandelion", "grass"):
        source = next(path for label_, path in split_photos(service.workspace) if label_ == label)
        photos.append(Path(shutil.copy(source, tmp_path / f"{label}-{Path(source).name}")))
    names = [path.name for path in photos]
    files = [("images", (path.name, path.read_bytes())) for path in photos]
    answer = requests.post(f"{service.url}/predict_batch", files=files, timeout=60)
    assert answer.status_code == 200, answer.text
    expected = {p["filename"]: p for p in answer.json()["predictions"]}
    info = requests.get(f"{service.url}/model-info", timeout=30).json()

    requested_urls(browser)  # the browser's own start-up (its new-tab page): not the page's
    browser.get(f"{service.url}/")
    browser.execute_script(DROP_FILES_SCRIPT)
    browser.find_element(By.ID, "test-drop-source").send_keys("\n".join(map(str, photos)))
    cards = finished_cards(browser, 2)

    # Both verdicts, each as the service answers for that file, in the order dropped.
    assert [card["filename"] for card in cards] == names
    for card in cards:
        want = expected[card["filename"]]
        assert card["failed"] is None, card
        # A photo of neither class says so first, its label second ("nearer to ...").
        assert card["verdict"] == ("neither" if want["neither"] else want["label"])
        assert percent(want["confidence"]) in card["confidence"]
        assert want["label"] in card["verdict"] + card["confidence"]
        for label, probability in want["probabilities"].items():
            assert f"{label} {percent(probability)}" in card["bar"]
        assert (card["neither"] is not None) == want["neither"]
    assert len({expected[name]["label"] for name in names}) == 2, "one photo of each class"

    # The session's history: both, with thumbnails that decoded.
    entries = shown(browser, "#history-list li")
    assert [entry["filename"] for entry in entries] == names
    for entry in entries:
        want = expected[entry["filename"]]
        assert want["label"] in entry["text"], entry
        assert percent(want["confidence"]) in entry["text"], entry
    widths = thumbnails_loaded(browser, "#history-list img")
    assert len(widths) == 2 and all(width > 0 for width in widths), widths

    # The model card: what /model-info says, metrics included.
    card = wait_for(
        browser,
        lambda d: (
            d.find_element(By.ID, "model-card").get_attribute("data-loaded") == "true"
            and d.find_element(By.ID, "model-card")
        ),
        "the model card never loaded",
    )
    assert info["version"] in card.text and info["model"] in card.text
    metrics = info["test_metrics"]
    for name, value in metrics.items():
        if name.endswith(("_low", "_high")):
            continue
        row = card.find_element(By.CSS_SELECTOR, f'tr[data-metric="{name}"]').text
        assert any(shown in row for shown in shown_metric(value)), (name, value, row)
        if f"{name}_low" in metrics:
            assert percent(metrics[f"{name}_low"]) in row, row
            assert percent(metrics[f"{name}_high"]) in row, row

    # Nothing but this service was asked for anything; the two photos went as one batch.
    urls = requested_urls(browser)
    assert sum(urlsplit(url).path == "/predict_batch" for url in urls) == 1, urls
    assert not any(urlsplit(url).path == "/predict" for url in urls), urls
    outside = [u for u in urls if urlsplit(u).scheme not in ("blob", "data")]
    outside = [u for u in outside if urlsplit(u).hostname != "127.0.0.1"]
    assert f"{service.url}/model-info" in urls, urls
    assert outside == [], outside

    screenshot = tmp_path / "page.png"
    browser.save_screenshot(str(screenshot))
    assert_not_blank(screenshot)


def test_at_phone_width_a_bad_file_and_a_picture_of_neither_class(service, browser, tmp_path):
    """Chosen with the keyboard-reachable file input: the batch is refused for the bad file,
    so the page asks for each alone and shows the service's own error beside the verdict."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    noise = np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    picture = tmp_path / "noise.png"
    Image.fromarray(noise).save(picture)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo\n")
    answers = [
        requests.post(f"{service.url}/predict", files={"image": path.read_bytes()}, timeout=60)
        for path in (picture, notes)
    ]
    unlike, refused = answers[0].json(), answers[1]
    assert answers[0].status_code == 200 and unlike["neither"], answers[0].text
    assert refused.status_code == 415, refused.text

    browser.set_window_size(*PHONE)
    requested_urls(browser)  # the browser's own start-up: not the page's
    browser.get(f"{service.url}/")
    # The file input is the first thing Tab reaches, and it has a label.
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    assert browser.switch_to.active_element.get_attribute("id") == "file"
    assert browser.find_element(By.CSS_SELECTOR, 'label[for="file"]').text
    browser.find_element(By.ID, "file").send_keys(f"{picture}\n{notes}")
    noise_card, notes_card = finished_cards(browser, 2)

    assert noise_card["verdict"] == "neither", noise_card
    assert (
        f"nearer to {unlike['label']} ({percent(unlike['confidence'])})" in noise_card["confidence"]
    )
    assert "neither a dandelion nor grass" in noise_card["neither"], noise_card
    assert refused.json()["error"] in notes_card["failed"], notes_card
    assert not noise_card["failed"] and not notes_card["verdict"]
    noise_entry, notes_entry = shown(browser, "#history-list li")
    assert "neither" in noise_entry["text"] and "not classified" in notes_entry["text"]
    # The batch was refused whole, then each file was sent alone.
    paths = [urlsplit(url).path for url in requested_urls(browser)]
    assert (paths.count("/predict_batch"), paths.count("/predict")) == (1, 2), paths
    # Nothing wider than a phone's screen: no sideways scrolling.
    width, inner = browser.execute_script(
        "return [document.documentElement.scrollWidth, window.innerWidth]"
    )
    assert width <= inner, (width, inner)
    screenshot = tmp_path / "phone.png"
    browser.save_screenshot(str(screenshot))
    assert_not_blank(screenshot)
