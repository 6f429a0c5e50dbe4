"""The API's description: /openapi.json and /docs.json, and Swagger UI at /docs in a real
headless Chromium (Debian's chromium + chromedriver), on the service's real HTTP front with a
stub model (tests/support/stub_service.py) served by uvicorn on 127.0.0.1."""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from tests.support.browser import requested_urls
from tests.support.stub_service import CARD, photo, stub_served


@pytest.fixture(scope="module")
def documents(client) -> dict[str, dict]:
    return {path: client.get(path).json() for path in ("/openapi.json", "/docs.json")}


def upload_schema(document: dict, path: str) -> dict:
    (media_type,) = document["paths"][path]["post"]["requestBody"]["content"].items()
    assert media_type[0] == "multipart/form-data"
    return media_type[1]["schema"]


@pytest.mark.parametrize("name", ["/openapi.json", "/docs.json"])
def test_both_documents_describe_the_uploads_and_the_project(documents, name):
    document = documents[name]
    assert document["info"]["title"] == "Dandelion vs grass"
    assert document["info"]["contact"] == {"name": "Dandelion vs grass maintainers"}
    assert document["info"]["version"] == CARD.version
    assert 100 < len(document["info"]["description"]) < 500  # a few lines, not the README
    assert "BentoML" not in str(document["info"])
    assert upload_schema(document, "/predict") == {
        "type": "object",
        "required": ["image"],
        "properties": {"image": {"type": "string", "format": "binary", "description": ANY}},
    }
    batch = upload_schema(document, "/predict_batch")
    assert batch["required"] == ["images"] and list(batch["properties"]) == ["images"]
    images = batch["properties"]["images"]
    assert images["type"] == "array" and images["items"] == {"type": "string", "format": "binary"}
    assert images["minItems"] == 1 and images["maxItems"] == CARD.serve["max_batch_files"]
    assert f"at most {CARD.serve['max_upload_bytes']} bytes" in images["description"]


class Anything:
    def __eq__(self, other):
        return True


ANY = Anything()


def test_the_schema_s_field_names_are_the_ones_the_handlers_read(client, documents):
    document = documents["/openapi.json"]
    (field,) = upload_schema(document, "/predict")["required"]
    (batch_field,) = upload_schema(document, "/predict_batch")["required"]
    assert client.post("/predict", files={field: ("a.png", photo())}).status_code == 200
    most = upload_schema(document, "/predict_batch")["properties"][batch_field]["maxItems"]
    files = [(batch_field, (f"{i}.png", photo())) for i in range(most)]
    answer = client.post("/predict_batch", files=files)
    assert answer.status_code == 200 and len(answer.json()["predictions"]) == most
    too_many = client.post("/predict_batch", files=[*files, files[0]])
    assert too_many.status_code == 400 and f"at most {most}" in too_many.json()["error"]
    for route, name in (("/predict", field), ("/predict_batch", batch_field)):
        other = client.post(route, files={f"{name}_x": ("a.png", photo())})
        assert other.status_code == 422
        assert f"no file in the multipart field '{name}'" in other.json()["error"]


def test_the_documented_answers_are_the_ones_given(documents):
    document = documents["/openapi.json"]
    schemas = document["components"]["schemas"]
    assert set(schemas["Prediction"]["required"]) == {
        *("label", "confidence", "probabilities", "neither", "novelty", "model_version"),
        "answer_id",
    }
    assert set(schemas["FilePrediction"]["required"]) == {
        *schemas["Prediction"]["required"],
        "filename",
    }
    assert schemas["ErrorAnswer"]["required"] == ["error"]
    info = schemas["ModelInfo"]["properties"]
    assert info["git_dirty"]["anyOf"] == [{"type": "boolean"}, {"type": "null"}]
    assert info["image_size"]["type"] == "integer" and info["threshold"]["type"] == "number"


@pytest.mark.parametrize("name", ["/openapi.json", "/docs.json"])
def test_the_feedback_form_and_its_errors_are_documented(documents, name):
    form = upload_schema(documents[name], "/feedback")
    assert form["required"] == ["image", "label"]
    assert set(form["properties"]) == {"image", "label", "answer_id", "model_version", "comment"}
    assert form["properties"]["label"]["enum"] == [*CARD.classes, "neither"]
    answers = documents[name]["paths"]["/feedback"]["post"]["responses"]
    assert "feedback_spool_full" in answers["503"]["description"]
    assert "overloaded" not in answers["503"]["description"] and "500" in answers
    predict = documents[name]["paths"]["/predict"]["post"]["responses"]
    assert "500" not in predict and "bad_label" not in str(predict)


def test_docs_page_uses_only_assets_the_service_serves(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert not re.search(r"(https?:)?//", page.text)  # no CDN, no absolute URL at all
    assets = re.findall(r"""(?:src|href|url)\s*[=:]\s*["'](\./[^"']+)["']""", page.text)
    assert len(assets) == 4  # the script, the stylesheet, the icon, the document
    for asset in assets:
        assert client.get(asset[1:]).status_code == 200, asset


@pytest.fixture(scope="module")
def served(stub) -> Iterator[str]:
    with stub_served() as url:
        yield url


def try_out(browser, wait, operation: str):
    """Swagger UI's block of ``operation``, opened, with "Try it out" pressed."""
    from selenium.webdriver.common.by import By

    block = browser.find_element(By.ID, operation)
    block.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait.until(lambda _: block.find_elements(By.CSS_SELECTOR, ".try-out__btn"))
    block.find_element(By.CSS_SELECTOR, ".try-out__btn").click()
    return block


def execute(block, wait) -> tuple[str, str]:
    """Press Execute in ``block``: the answer's status cell and body, as the page shows them."""
    from selenium.webdriver.common.by import By

    block.find_element(By.CSS_SELECTOR, ".execute").click()
    status = wait.until(
        lambda _: block.find_elements(
            By.CSS_SELECTOR, ".live-responses-table tbody .response-col_status"
        )
    )
    body = block.find_element(By.CSS_SELECTOR, ".live-responses-table .microlight").text
    return status[0].text, body


def test_swagger_ui_lists_the_operations_and_tries_one_offline(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(f"{served}/docs")
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".opblock-summary-path")))
    paths = {
        element.text.replace("\u200b", "")  # Swagger UI breaks paths with zero-width spaces
        for element in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
    }
    assert paths == {"/", "/model-info", "/predict", "/predict_batch", "/feedback"}
    assert "Dandelion vs grass" in browser.find_element(By.CSS_SELECTOR, ".info .title").text

    # Try /predict with a photo, as a user would: the schema's file field, then Execute.
    image = tmp_path / "green.png"
    image.write_bytes(photo((20, 230, 20)))
    block = try_out(browser, wait, "operations-default-predict_predict_post")
    wait.until(lambda _: block.find_elements(By.CSS_SELECTOR, "input[type=file]"))
    block.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(image))
    status, body = execute(block, wait)
    browser.save_screenshot(str(tmp_path / "docs.png"))
    assert status.startswith("200"), body
    assert '"label": "dandelion"' in body and f'"model_version": "{CARD.version}"' in body

    # And /predict_batch with two photos: the array of files, one input per item.
    grassy = tmp_path / "grassy.png"
    grassy.write_bytes(photo((120, 60, 40)))
    block = try_out(browser, wait, "operations-default-predict_batch_predict_batch_post")
    for path in (image, grassy):
        inputs = len(block.find_elements(By.CSS_SELECTOR, "input[type=file]"))
        block.find_element(
            By.XPATH, ".//button[contains(., 'Add') and contains(., 'item')]"
        ).click()
        wait.until(
            lambda _, n=inputs: len(block.find_elements(By.CSS_SELECTOR, "input[type=file]")) > n
        )
        block.find_elements(By.CSS_SELECTOR, "input[type=file]")[-1].send_keys(str(path))
    status, body = execute(block, wait)
    browser.save_screenshot(str(tmp_path / "docs-batch.png"))
    assert status.startswith("200"), body
    assert body.index('"filename": "green.png"') < body.index('"filename": "grassy.png"')
    assert body.count('"label": "dandelion"') == 1 and body.count('"label": "grass"') == 1

    urls = requested_urls(browser)
    assert f"{served}/openapi.json" in urls and f"{served}/predict" in urls
    assert f"{served}/predict_batch" in urls
    # Every request that could leave the machine stays on 127.0.0.1 (the others are inline
    # data, the stylesheet's icons, and Chromium's own chrome:// pages).
    network = [url for url in urls if urlsplit(url).scheme in ("http", "https", "ws", "wss")]
    assert [url for url in network if not url.startswith(f"{served}/")] == []
