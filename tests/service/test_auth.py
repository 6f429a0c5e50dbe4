"""The API key (serving/auth.py) on the service's real front with a stub model
(tests/support/stub_service.py): 401s where keys are configured, the open paths, the start-up
errors, rotation; Swagger UI's Authorize and the page in headless Chromium; BentoML's own
client with token=; and a real Prometheus scraping /metrics with the project's scrape job."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import sys
import time
from urllib.parse import urlsplit

import bentoml
import pytest
import requests
from prometheus_client import REGISTRY

from serving import auth
from serving.auth import ApiKeyConfigError, ApiKeys
from serving.settings import API_KEY_HEADER, API_KEYS_ENV, API_KEYS_FILE_ENV, MIN_API_KEY_CHARS
from tests.support.browser import sent_requests
from tests.support.http import free_port
from tests.support.monitoring import scrape_job, scraping, wait_until
from tests.support.processes import running_server
from tests.support.stub_service import photo, stub_client, stub_served

# BentoML's own server code (its typed endpoints) on pydantic 2.11+.
pytestmark = pytest.mark.filterwarnings("ignore:Accessing the 'model_fields' attribute")
KEY, OTHER_KEY = "k3y-" + "a" * 28, "k3y-" + "b" * 28  # two keys in force: a rotation
WRONG = "k3y-" + "c" * 28
GREEN = (20, 230, 20)


@contextlib.contextmanager
def keys_configured(**environ: str):
    """The service's environment with ``environ`` (API_KEYS...), the other key variable unset."""
    with pytest.MonkeyPatch.context() as patch:
        for name in (API_KEYS_ENV, API_KEYS_FILE_ENV):
            patch.delenv(name, raising=False)
        for name, value in environ.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def keyed():
    """A client on the stub front started with two keys. (The tests that start another front
    come after those that use this one: the front instance served is the one started last.)"""
    with contextlib.ExitStack() as stack:
        with keys_configured(API_KEYS=f"{KEY}, {OTHER_KEY}"):  # read when the front starts
            client = stack.enter_context(stub_client())
        yield client


def unauthorized() -> float:
    return (
        REGISTRY.get_sample_value(
            "classifier_rejected_uploads_total", {"reason": "unauthorized", "status": "401"}
        )
        or 0.0
    )


# Every kind of protected route: the multipart ones, feedback, BentoML's own /metrics and
# typed /api/*, and the service's GET /model-info. (/metrics itself answers only in a process
# of its own: test_prometheus_scrapes_with_the_key_and_is_refused_without.)
PROTECTED = [
    ("POST", "/predict"),
    ("POST", "/predict_batch"),
    ("POST", "/feedback"),
    ("POST", "/api/predict"),
    ("POST", "/api/predict_batch"),
    ("POST", "/api/feedback"),
    ("GET", "/metrics"),
    ("GET", "/model-info"),
    ("GET", "/no-such-path"),  # deny by default
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
@pytest.mark.parametrize(
    ("headers", "said"),
    [
        ({}, "no API key"),
        ({API_KEY_HEADER: WRONG}, "a wrong API key"),
        ({"Authorization": f"Bearer {WRONG}"}, "a wrong API key"),
        ({"Authorization": f"Basic {KEY}"}, "no API key"),  # only Bearer carries the key
        ({API_KEY_HEADER: KEY[:-1]}, "a wrong API key"),
    ],
)
def test_without_the_right_key_every_protected_route_is_401_naming_the_header(
    keyed, method, path, headers, said
):
    before = unauthorized()
    answer = keyed.request(
        method,
        path,
        headers=headers,
        files={"image": ("a.png", photo())} if method == "POST" else None,
    )
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"] == "Bearer"
    error = answer.json()["error"]
    assert error.startswith(said) and f"'{API_KEY_HEADER}: <key>'" in error
    assert "'Authorization: Bearer <key>'" in error
    assert unauthorized() == before + 1


@pytest.mark.parametrize("key", [KEY, OTHER_KEY])
@pytest.mark.parametrize("form", ["header", "bearer"])
def test_either_key_in_either_header_is_let_in(keyed, key, form):
    headers = {API_KEY_HEADER: key} if form == "header" else {"Authorization": f"bearer {key}"}
    predicted = keyed.post("/predict", headers=headers, files={"image": ("a.png", photo(GREEN))})
    assert predicted.status_code == 200 and predicted.json()["label"] == "dandelion"
    typed = keyed.post("/api/predict", headers=headers, files={"image": ("a.png", photo(GREEN))})
    assert typed.status_code == 200 and typed.json()["label"] == "dandelion"
    assert keyed.get("/model-info", headers=headers).status_code == 200


OPEN = [
    "/livez",
    "/readyz",
    "/healthz",
    "/",
    "/docs",
    "/openapi.json",
    "/docs.json",
    "/schema.json",
]


def test_probes_the_page_and_the_api_s_description_need_no_key(keyed):
    for path in OPEN:
        assert keyed.get(path).status_code == 200, path
    assert keyed.get("/static_content/swagger-ui-bundle.js").status_code == 200


@pytest.mark.parametrize("name", ["/openapi.json", "/docs.json"])
def test_the_documents_declare_the_key_on_protected_operations_only(keyed, name):
    document = keyed.get(name).json()
    assert document["components"]["securitySchemes"] == {
        "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": API_KEY_HEADER},
        "BearerKey": {"type": "http", "scheme": "bearer"},
    }
    either = [{"ApiKeyHeader": []}, {"BearerKey": []}]
    paths = document["paths"]
    for path in ("/predict", "/predict_batch", "/feedback"):
        assert paths[path]["post"]["security"] == either, path
        assert "unauthorized" in paths[path]["post"]["responses"]["401"]["description"]
    assert paths["/model-info"]["get"]["security"] == either
    assert "security" not in paths["/"]["get"]
    if name == "/docs.json":  # BentoML's: its own routes too
        assert paths["/api/predict"]["post"]["security"] == either
        assert paths["/metrics"]["get"]["security"] == either
        assert "security" not in paths["/readyz"]["get"]


# Other spellings of protected paths, sent as written (an HTTP client would normalize them):
# the key is asked for whatever path the app sees. A step out of the open static directory is
# StaticFiles' own 404 (it serves nothing outside its directory), so no open prefix opens a
# protected route.
RAW = [
    ("GET", "//metrics", 401),
    ("GET", "/metrics/", 401),
    ("GET", "/%6detrics", 401),
    ("GET", "/./model-info", 401),
    ("POST", "//predict", 401),
    ("HEAD", "/metrics", 401),
    ("OPTIONS", "/predict", 401),
    ("GET", "/static_content/../metrics", 404),
    ("GET", "/static_content/%2e%2e/metrics", 404),
]


def test_a_path_sent_unnormalized_gets_no_further_without_the_key():
    with keys_configured(API_KEYS=KEY), stub_served() as url:
        parts = urlsplit(url)
        for method, path, expected in RAW:
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
            try:
                connection.request(method, path, body=b"x" if method == "POST" else None)
                answer = connection.getresponse()
                body = answer.read()
            finally:
                connection.close()
            assert answer.status == expected, (method, path, answer.status, body)
            if expected == 401 and method != "HEAD":
                assert json.loads(body)["error"].startswith("no API key"), (method, path)


def test_without_keys_configured_everything_is_open():
    with keys_configured(), stub_client() as client:
        assert client.get("/model-info").status_code == 200
        answer = client.post("/predict", files={"image": ("a.png", photo())})
        assert answer.status_code == 200
        document = client.get("/openapi.json").json()
    assert "securitySchemes" not in document["components"]
    assert "security" not in document["paths"]["/predict"]["post"]


def key_file(tmp_path, text: str):
    path = tmp_path / "api-keys"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({API_KEYS_ENV: KEY, API_KEYS_FILE_ENV: "x"}, "both API_KEYS and API_KEYS_FILE are set"),
        ({API_KEYS_FILE_ENV: "/nonexistent/api-keys"}, "cannot be read"),
        ({API_KEYS_FILE_ENV: ""}, "API_KEYS_FILE is set but empty"),
        ({API_KEYS_FILE_ENV: "FILE:\n# only a comment\n\n"}, "holds no key"),
        ({API_KEYS_FILE_ENV: f"FILE:{KEY}\nshort-key\n"}, "line 2 is 9 characters long"),
        ({API_KEYS_ENV: ""}, "API_KEYS holds no key"),
        ({API_KEYS_ENV: f"{KEY},{'x' * (MIN_API_KEY_CHARS - 1)}"}, "key 2 is 15 characters"),
        ({API_KEYS_ENV: f"{KEY[:-1]}\u00e9"}, "printable ASCII"),
    ],
)
def test_a_bad_configuration_stops_the_start_saying_what_to_fix(tmp_path, environ, message):
    environ = {
        name: key_file(tmp_path, value.removeprefix("FILE:"))
        if value.startswith("FILE:")
        else value
        for name, value in environ.items()
    }
    with pytest.raises(ApiKeyConfigError, match=message):
        ApiKeys.from_environ(environ)


def test_the_front_does_not_start_with_a_bad_key():
    with (
        keys_configured(API_KEYS="changeme"),
        pytest.raises(ApiKeyConfigError, match="API_KEYS: key 1 is 8 characters long"),
        stub_client(),
    ):
        pass


def test_keys_from_a_file_and_its_rotation_without_a_restart(tmp_path, monkeypatch):
    path = key_file(tmp_path, f"# the users' key, then Prometheus's\n{KEY}\n\n  {OTHER_KEY}  \n")
    monkeypatch.setattr(auth, "API_KEYS_FILE_CHECK_SECONDS", 0.2)
    with keys_configured(API_KEYS_FILE=path), stub_client() as client:

        def status(key: str) -> int:
            return client.get("/model-info", headers={API_KEY_HEADER: key}).status_code

        assert (status(KEY), status(OTHER_KEY), status(WRONG)) == (200, 200, 401)
        # As a Secret's update: a new file swapped in. Within the check interval, as it was.
        (tmp_path / "new").write_text(f"{WRONG}\n")
        os.replace(tmp_path / "new", path)
        assert status(KEY) == 200
        time.sleep(0.3)
        assert (status(KEY), status(OTHER_KEY), status(WRONG)) == (401, 401, 200)
        # A file that becomes unusable keeps the keys in force: never open, never locked.
        (tmp_path / "new").write_text("# emptied\n")
        os.replace(tmp_path / "new", path)
        time.sleep(0.3)
        assert (status(KEY), status(WRONG)) == (401, 200)
        os.remove(path)
        time.sleep(0.3)
        assert status(WRONG) == 200


@pytest.fixture(scope="module")
def served_with_keys():
    with keys_configured(API_KEYS=f"{KEY},{OTHER_KEY}"), stub_served() as url:
        yield url


def test_bentoml_s_client_sends_its_token_as_the_key(served_with_keys, tmp_path):
    image = tmp_path / "green.png"
    image.write_bytes(photo(GREEN))
    with bentoml.SyncHTTPClient(served_with_keys, token=KEY) as client:
        assert client.predict(image=image)["label"] == "dandelion"
    with bentoml.SyncHTTPClient(served_with_keys) as client:
        with pytest.raises(bentoml.exceptions.BentoMLException) as refused:
            client.predict(image=image)
    assert refused.value.error_code.value == 401
    assert API_KEY_HEADER in str(refused.value)


def test_swagger_ui_s_authorize_sends_the_key(served_with_keys, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.service.test_api_docs import execute, try_out

    wait = WebDriverWait(browser, 30)
    browser.get(f"{served_with_keys}/docs")
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".opblock-summary-path")))
    block = try_out(browser, wait, "operations-default-model_info_model_info_get")
    status, body = execute(block, wait)
    assert status.startswith("401") and API_KEY_HEADER in body

    browser.find_element(By.CSS_SELECTOR, ".auth-wrapper .authorize").click()
    dialog = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".auth-container")))
    dialog.find_element(By.CSS_SELECTOR, "input").send_keys(KEY)  # the first: ApiKeyHeader
    dialog.find_element(By.CSS_SELECTOR, "button.authorize").click()
    browser.find_element(By.CSS_SELECTOR, ".btn-done").click()
    status, body = execute(block, wait)
    assert status.startswith("200"), body
    assert '"max_batch_files"' in body
    sent = [
        params["request"]["headers"]
        for params in sent_requests(browser)
        if params["request"]["url"] == f"{served_with_keys}/model-info"
    ]
    assert [headers.get(API_KEY_HEADER) for headers in sent] == [None, KEY]


# The page's key form and state, read in one go.
PAGE_SCRIPT = """
return {
  asked: !document.getElementById("key-form").hidden,
  message: document.getElementById("key-message").textContent,
  stored: sessionStorage.getItem("dandelion-api-key"),
  model: document.getElementById("model-card").dataset.loaded === "true",
  verdicts: [...document.querySelectorAll("#verdicts li.card .verdict")].map((v) => v.textContent),
};
"""


def test_the_page_asks_for_the_key_on_a_401_and_sends_it_after(served_with_keys, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url = served_with_keys
    wait = WebDriverWait(browser, 30, poll_frequency=0.1)
    green = tmp_path / "green.png"
    green.write_bytes(photo(GREEN))

    def state() -> dict:
        return browser.execute_script(PAGE_SCRIPT)

    def enter(key: str) -> None:
        field = browser.find_element(By.ID, "key")
        assert field.get_attribute("type") == "password"
        field.send_keys(key)
        browser.find_element(By.CSS_SELECTOR, "#key-form button").click()

    browser.get(f"{url}/")
    wait.until(lambda _: state()["asked"])  # /model-info answered 401
    assert "needs an API key" in state()["message"] and not state()["model"]
    enter(WRONG)
    wait.until(lambda _: state()["asked"] and "refused" in state()["message"])
    assert state()["stored"] is None
    enter(OTHER_KEY)
    wait.until(lambda _: state()["model"])
    assert state()["stored"] == OTHER_KEY and not state()["asked"]
    sent_requests(browser)

    browser.find_element(By.ID, "file").send_keys(str(green))
    wait.until(lambda _: state()["verdicts"] == ["dandelion"])
    posts = [p["request"] for p in sent_requests(browser) if p["request"]["method"] == "POST"]
    assert [(r["url"], r["headers"].get(API_KEY_HEADER)) for r in posts] == [
        (f"{url}/predict", OTHER_KEY)
    ]
    # A reload in the same tab keeps the key: nothing asked.
    browser.get(f"{url}/")
    wait.until(lambda _: state()["model"])
    assert not state()["asked"]


def test_prometheus_scrapes_with_the_key_and_is_refused_without(tmp_path):
    """The stub front in a process of its own (its /metrics as `bentoml serve` serves it), and
    Debian's Prometheus with the project's scrape job: up with the key, down (401) without."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    (tmp_path / "multiproc").mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if k not in (API_KEYS_ENV, API_KEYS_FILE_ENV)},
        API_KEYS_FILE_ENV: key_file(tmp_path, f"{KEY}\n{OTHER_KEY}\n"),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "multiproc"),
        "FEEDBACK_DIR": str(tmp_path / "feedback"),
        "PREDICTION_LOG_DIR": str(tmp_path / "predictions"),
    }
    env.pop("FEEDBACK_STORE", None)
    prometheus_key = tmp_path / "prometheus-api-key"
    prometheus_key.write_text(f"{OTHER_KEY}\n")  # as `dandelion secrets` writes it
    job = f'up{{job="{scrape_job()["job_name"]}"}}'
    command = [sys.executable, "-m", "tests.support.stub_service", str(port)]
    with running_server(command, url, tmp_path / "stub.log", env=env, timeout=60):
        assert requests.get(f"{url}/metrics", timeout=10).status_code == 401
        with scraping(url, tmp_path / "keyed", key_file=prometheus_key) as prometheus:
            wait_until(prometheus, f"{job} == 1")
            (info,) = wait_until(prometheus, "classifier_model_info")
            assert info["value"][1] == "1"
        with scraping(url, tmp_path / "unkeyed", ready=False) as prometheus:
            wait_until(prometheus, f"{job} == 0")
            (target,) = requests.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"][
                "activeTargets"
            ]
            assert "401" in target["lastError"], target
