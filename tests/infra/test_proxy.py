"""The reverse proxy (deploy/proxy/) run by Debian's nginx on 127.0.0.1, rendered from its
templates as the official image renders them, in front of the service's real HTTP front (on
the stub model, tests/support/stub_service.py) or, where what reaches the service is the
question, in front of a loopback server that records it."""

from __future__ import annotations

import http.client
import http.server
import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import requests
import yaml

from serving.settings import (
    FEEDBACK_ROUTE,
    MAX_PREDICTIONS_IN_FLIGHT,
    MULTIPART_OVERHEAD_BYTES,
    RETRY_AFTER_SECONDS,
    STALL_SECONDS,
    TRAFFIC_TIMEOUT_SECONDS,
    TYPED_FEEDBACK_ROUTE,
    TYPED_PREDICT_BATCH_ROUTE,
    TYPED_PREDICT_ROUTE,
)
from tests.support.http import in_thread
from tests.support.needs import require_tools
from tests.support.paths import PARAMS_FILE, REPO_ROOT
from tests.support.proxy import (
    TEMPLATES,
    TLS_TEMPLATE,
    render,
    running_proxy,
    self_signed_certificate,
    template_variables,
)
from tests.support.stub_service import photo, stub_served, stub_service

PREDICTION_ROUTES = [
    "/predict",
    "/predict_batch",
    FEEDBACK_ROUTE,
    TYPED_PREDICT_ROUTE,
    TYPED_PREDICT_BATCH_ROUTE,
    TYPED_FEEDBACK_ROUTE,
]


@pytest.fixture(scope="module")
def nginx() -> str:
    nginx, _ = require_tools("nginx", "envsubst")
    return nginx


@pytest.fixture(scope="module")
def stub_front():
    """The service's front on the stub model under uvicorn: its host:port."""
    with stub_served() as url:
        yield urlsplit(url).netloc


@pytest.fixture(scope="module")
def certificate(nginx, tmp_path_factory):
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def proxy(nginx, stub_front, certificate, tmp_path):
    """nginx in front of the service, HTTP and TLS, its limits fresh for each test."""
    with running_proxy(
        stub_front, tmp_path / "nginx", tls_dir=certificate.parent, nginx=nginx
    ) as p:
        yield p


class Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every request with the headers it got, as JSON, after ``delay`` seconds, and
    counts the requests it holds at once."""

    delay = 0.0
    lock = threading.Lock()
    paths: list[str] = []  # the request paths that arrived, in order
    open_now = 0
    most_at_once = 0

    def do_GET(self):  # noqa: N802 - http.server's name
        cls = type(self)
        with cls.lock:
            cls.paths.append(self.path)
            cls.open_now += 1
            cls.most_at_once = max(cls.most_at_once, cls.open_now)
        try:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            time.sleep(cls.delay)
            body = json.dumps(dict(self.headers.items())).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        finally:
            with cls.lock:
                cls.open_now -= 1

    do_POST = do_GET  # noqa: N815

    def log_message(self, format, *args):  # noqa: A002 - keep test output readable
        pass


@pytest.fixture
def recorder_proxy(nginx, tmp_path):
    """nginx in front of a Recorder (a fresh class per test, its delay settable)."""
    recorder = type("TestRecorder", (Recorder,), {"lock": threading.Lock(), "paths": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), recorder, bind_and_activate=False)
    server.request_queue_size = 256  # the burst below connects all at once
    server.daemon_threads = True
    server.server_bind()
    server.server_activate()
    with in_thread(server) as url:
        with running_proxy(urlsplit(url).netloc, tmp_path / "nginx", nginx=nginx) as p:
            yield p, recorder


def send(url: str, method: str, path: str, *, source: str = "127.0.0.1", headers=None, body=b""):
    """One request from the loopback address ``source`` (each its own client to the proxy):
    (status, headers, body), or (None, {}, b"") when the connection is closed unanswered."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(
        parts.hostname, parts.port, timeout=30, source_address=(source, 0)
    )
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.headers), response.read()
    except (ConnectionError, http.client.RemoteDisconnected):
        return None, {}, b""
    finally:
        connection.close()


def assert_json_error(status, headers, body, expected: int) -> dict:
    assert status == expected, (status, body)
    assert headers["Content-Type"] == "application/json"
    answer = json.loads(body)
    assert list(answer) == ["error"] and answer["error"]
    return answer


def test_requests_pass_through_the_proxy(proxy):
    assert requests.get(f"{proxy.url}/livez", timeout=10).status_code == 200
    page = requests.get(f"{proxy.url}/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    answer = requests.post(f"{proxy.url}/predict", files={"image": photo()}, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.json()["label"] == "dandelion"  # the stub's green photo


def service_routes(routes, prefix: str = "") -> list[tuple[str, str]]:
    """(method, path) of every route of the service's app: BentoML's Starlette routes, the
    mounted FastAPI app's, and each file of its static mounts."""
    found = []
    for route in routes:
        if hasattr(route, "original_router"):  # FastAPI's included router (0.165's own class)
            found += service_routes(route.original_router.routes, prefix)
        elif getattr(route, "methods", None):
            method = "POST" if "POST" in route.methods else "GET"
            found.append((method, prefix + route.path))
        elif hasattr(getattr(route, "app", None), "routes"):  # a mounted app: the front's
            found += service_routes(route.app.routes, prefix + route.path)
        else:  # StaticFiles: Swagger UI's assets
            files = sorted({f.name for d in route.app.all_directories for f in d.iterdir()})
            assert files, route.path
            found += [("GET", f"{prefix}{route.path}/{name}") for name in files]
    return found


def test_every_route_of_the_service_passes_the_proxy_and_no_other_path(recorder_proxy):
    proxy, recorder = recorder_proxy
    routes = service_routes(stub_service().app.routes)
    # None takes a path parameter: each is one path the proxy can list.
    assert not [path for _, path in routes if "{" in path], routes
    paths = {path for _, path in routes}
    assert {"/", "/docs", "/openapi.json", "/metrics", "/model-info", *PREDICTION_ROUTES} <= paths
    recorder.paths.clear()  # the proxy's start-up wait asked too
    clients = iter(f"127.0.8.{i}" for i in range(1, 250))  # each its own: no rate limit
    for method, path in routes:
        body = b"x" if method == "POST" else b""
        status, _, body = send(proxy.url, method, path, source=next(clients), body=body)
        assert status == 200, (method, path, body)
    assert recorder.paths == [path for _, path in routes]
    # Another spelling of a route arrives as the route itself: one series per route at most.
    recorder.paths.clear()
    for path in ("//metrics", "/./metrics", "/%6detrics", "/static/../metrics"):
        assert send(proxy.url, "GET", path, source=next(clients))[0] == 200, path
    assert recorder.paths == ["/metrics"] * 4
    # Any other path is nginx's JSON 404, and never reaches the service.
    recorder.paths.clear()
    for method, path in [
        ("GET", "/anon-1"),
        ("GET", "/metrics/"),
        ("POST", "/predict/x"),
        ("GET", "/static_content/anon-1.js"),
    ]:
        assert_json_error(*send(proxy.url, method, path, source=next(clients)), 404)
    assert recorder.paths == []


def test_the_service_is_told_who_asked_and_gets_the_credentials(recorder_proxy):
    proxy, _ = recorder_proxy
    key, token = "k" * 32, "t" * 32
    status, _, body = send(
        proxy.url,
        "POST",
        "/predict",
        source="127.0.0.7",
        headers={
            "X-API-Key": key,
            "Authorization": f"Bearer {token}",
            "X-Forwarded-For": "203.0.113.9",  # a client's own claim: not believed
        },
        body=b"x" * 100,
    )
    assert status == 200
    seen = json.loads(body)
    assert seen["X-API-Key"] == key and seen["Authorization"] == f"Bearer {token}"
    assert seen["X-Forwarded-For"] == "127.0.0.7" and seen["X-Real-IP"] == "127.0.0.7"
    assert seen["X-Forwarded-Proto"] == "http"


def test_a_burst_from_one_client_gets_429_with_retry_after_as_json(proxy):
    answers = [send(proxy.url, "GET", "/livez") for _ in range(40)]
    statuses = [status for status, _, _ in answers]
    assert statuses[:20] == [200] * 20, statuses  # the burst allowance, at once
    refused = [answer for answer in answers if answer[0] == 429]
    assert len(refused) >= 10, statuses
    for status, headers, body in refused:
        assert_json_error(status, headers, body, 429)
        assert headers["Retry-After"] == str(RETRY_AFTER_SECONDS)
    # Another client is not held back by this one.
    assert send(proxy.url, "GET", "/livez", source="127.0.0.2")[0] == 200


def test_one_client_holds_a_bounded_number_of_requests_open(recorder_proxy):
    proxy, recorder = recorder_proxy
    recorder.delay = 2.0
    (limit,) = directive(rendered_routes(), "limit_conn")
    most = int(limit.split()[1])  # per_client_open 16
    # 20 at once: within the burst allowance, so the open-requests limit is what refuses.
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda _: send(proxy.url, "GET", "/model-info"), range(20)))
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200] * most + [429] * (20 - most), statuses
    assert recorder.most_at_once == most
    for status, headers, body in answers:
        if status == 429:
            assert_json_error(status, headers, body, 429)
            assert headers["Retry-After"] == str(RETRY_AFTER_SECONDS)


def predictions_cap() -> int:
    """How many predictions the proxy lets reach the service at once (its upstream's cap)."""
    text = (TEMPLATES / "default.conf.template").read_text()
    (capped,) = re.findall(r"server \S+ max_conns=(\d+)", text)
    return int(capped)


def test_past_the_service_capacity_the_proxy_answers_503_without_asking_it(recorder_proxy):
    proxy, recorder = recorder_proxy
    recorder.delay = 3.0
    cap = predictions_cap()
    clients = cap + 16
    # One request from each of `clients` addresses: no per-client limit is reached.
    sources = [f"127.0.{1 + i // 250}.{1 + i % 250}" for i in range(clients)]
    with ThreadPoolExecutor(max_workers=clients) as pool:
        answers = list(
            pool.map(lambda s: send(proxy.url, "POST", "/predict", source=s, body=b"x"), sources)
        )
    statuses = [status for status, _, _ in answers]
    assert statuses.count(200) == cap, statuses
    assert statuses.count(503) == clients - cap, statuses
    assert recorder.most_at_once == cap
    for status, headers, body in answers:
        if status == 503:
            assert_json_error(status, headers, body, 503)
            assert headers["Retry-After"] == str(RETRY_AFTER_SECONDS)
    # The cap is on predictions only: the rest of the service still answers meanwhile.
    recorder.delay = 0.0
    assert send(proxy.url, "GET", "/metrics", source="127.0.0.3")[0] == 200


def test_a_body_over_the_service_limit_gets_413_before_it_is_sent(proxy):
    limit = largest_request_the_service_reads()
    status, headers, body = send(
        proxy.url,
        "POST",
        "/predict_batch",
        headers={"Content-Length": str(limit + 1), "Content-Type": "multipart/form-data"},
        body=b"",  # only the declared length: nginx must not wait for the body
    )
    assert_json_error(status, headers, body, 413)


def test_an_oversize_header_is_refused_and_a_large_one_passes(proxy):
    status, headers, body = send(proxy.url, "GET", "/livez", headers={"X-Big": "a" * 9000})
    assert_json_error(status, headers, body, 400)
    assert send(proxy.url, "GET", "/livez", headers={"X-Big": "a" * 6000})[0] == 200


def test_a_client_that_stalls_its_body_is_cut_off(proxy):
    parts = urlsplit(proxy.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(
            b"POST /predict HTTP/1.1\r\nHost: proxy\r\nContent-Type: multipart/form-data; "
            b"boundary=b\r\nContent-Length: 100000\r\n\r\n--b\r\n"
        )
        started = time.monotonic()
        answer = sock.recv(65536)  # blocks until nginx closes the connection
        waited = time.monotonic() - started
    assert answer == b""  # closed, unanswered
    assert STALL_SECONDS - 0.5 < waited < STALL_SECONDS + 3


def test_tls_answers_with_the_certificate(proxy, certificate):
    answer = requests.get(f"{proxy.tls_url}/livez", verify=str(certificate), timeout=10)
    assert answer.status_code == 200
    answer = requests.post(
        f"{proxy.tls_url}/predict", files={"image": photo()}, verify=str(certificate), timeout=10
    )
    assert answer.status_code == 200, answer.text
    with pytest.raises(requests.exceptions.SSLError):  # not some other certificate's
        requests.get(f"{proxy.tls_url}/livez", timeout=10)


# --- the numbers the proxy shares with the service ----------------------------------------


def largest_request_the_service_reads() -> int:
    """serving/uploads.py Upload.check_headers: a full batch at the upload limit + overhead."""
    serve = yaml.safe_load(PARAMS_FILE.read_text())["serve"]
    return serve["max_batch_files"] * serve["max_upload_bytes"] + MULTIPART_OVERHEAD_BYTES


def rendered_routes() -> str:
    return render(TEMPLATES / "classifier-routes.template", {})


def directive(text: str, name: str) -> list[str]:
    return re.findall(rf"^\s*{name}\s+([^;]+);", text, re.MULTILINE)


def seconds(value: str) -> float:
    assert value.endswith("s"), value
    return float(value[:-1])


def test_the_proxy_limits_are_the_service_own(nginx):
    routes = rendered_routes()
    default = render(
        TEMPLATES / "default.conf.template",
        {"CLASSIFIER_UPSTREAM": "classifier:3000", "PROXY_HTTP_LISTEN": "8080"},
    )
    assert directive(routes, "client_max_body_size") == [str(largest_request_the_service_reads())]
    (capped,) = re.findall(r"server \S+ max_conns=(\d+)", default)
    # Below the service's own admission: the proxy keeps the queue at the service short.
    assert 0 < int(capped) <= MAX_PREDICTIONS_IN_FLIGHT
    for name in ("client_header_timeout", "client_body_timeout", "send_timeout"):
        assert [seconds(v) for v in directive(routes, name)] == [STALL_SECONDS], name
    for name in ("proxy_read_timeout", "proxy_send_timeout"):
        assert seconds(directive(routes, name)[0]) > TRAFFIC_TIMEOUT_SECONDS, name
    retry_after = re.findall(r"add_header Retry-After (\S+) always;", routes)
    assert retry_after and set(retry_after) == {str(RETRY_AFTER_SECONDS)}
    # Every route that takes one of the service's prediction places is capped; no other.
    (pattern,) = re.findall(
        r"location ~ (\S+) \{\s*proxy_pass http://classifier_predictions\S*;", routes
    )
    assert all(re.fullmatch(pattern, route) for route in PREDICTION_ROUTES)
    assert not any(re.fullmatch(pattern, route) for route in ("/", "/metrics", "/readyz"))


def test_compose_runs_the_templates_as_the_image_renders_them():
    services = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    proxy = services["proxy"]
    assert "ports" not in services["classifier"]  # only the proxy is published
    assert proxy["profiles"] == ["serve"] and proxy["restart"] == "unless-stopped"
    image, _, digest = proxy["image"].partition("@sha256:")
    assert re.fullmatch(r"nginx:\d+\.\d+\.\d+", image) and len(digest) == 64
    assert "./deploy/proxy/templates:/etc/nginx/templates:ro" in proxy["volumes"]
    assert "./.secrets/tls:/etc/nginx/tls:ro" in proxy["volumes"]
    environment = proxy["environment"]
    names = set().union(*(template_variables(t.read_text()) for t in TEMPLATES.glob("*.template")))
    assert set(environment) - {"NGINX_ENVSUBST_FILTER"} == names
    only = re.compile(environment["NGINX_ENVSUBST_FILTER"].replace("$$", "$"))
    assert {
        name for name in [*names, "HOSTNAME", "PATH", "NGINX_VERSION"] if only.search(name)
    } == names
    upstream_host, _, upstream_port = environment["CLASSIFIER_UPSTREAM"].partition(":")
    assert upstream_host in services and upstream_port == "3000"
    published = {port.rsplit(":", 1)[1] for port in proxy["ports"]}
    assert published == {environment["PROXY_HTTP_LISTEN"], environment["PROXY_TLS_LISTEN"]}
    assert (TEMPLATES / TLS_TEMPLATE).exists()
