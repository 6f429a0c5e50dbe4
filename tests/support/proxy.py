"""The reverse proxy of deploy/proxy/ run by Debian's nginx on 127.0.0.1, as the official image
runs it: its templates rendered by envsubst (limited to the templates' variables) into a
``conf.d`` beside a main configuration like the image's, every path nginx writes in a
temporary directory, so it runs without privileges and leaves nothing behind."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

from pipeline.secrets import TLS_CERT, TLS_KEY, certificate
from tests.support.http import free_port
from tests.support.paths import REPO_ROOT
from tests.support.processes import stop_process_group

TEMPLATES = REPO_ROOT / "deploy" / "proxy" / "templates"
TLS_TEMPLATE = "tls.conf.template"

# The official image's nginx.conf, with every path under the prefix (nginx -p).
MAIN_CONF = """\
{user}
worker_processes auto;
pid nginx.pid;
error_log error.log notice;
events {{ worker_connections 4096; }}
http {{
    default_type application/octet-stream;
    access_log off;
    client_body_temp_path temp/client_body;
    proxy_temp_path temp/proxy;
    fastcgi_temp_path temp/fastcgi;
    uwsgi_temp_path temp/uwsgi;
    scgi_temp_path temp/scgi;
    include conf.d/*.conf;
}}
"""


def template_variables(text: str) -> set[str]:
    """The ${NAME} variables a template uses (nginx's own are written $name, unbraced)."""
    return set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)\}", text))


def render(template: Path, variables: dict[str, str]) -> str:
    """``template`` through envsubst, limited to its own variables, as the image does."""
    names = template_variables(template.read_text())
    missing = names - variables.keys()
    if missing:
        raise ValueError(f"{template.name} needs {sorted(missing)}")
    shell_format = " ".join(f"${{{name}}}" for name in sorted(names))
    return subprocess.run(
        ["envsubst", shell_format],
        input=template.read_text(),
        env=dict(os.environ, **variables),
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@dataclass(frozen=True)
class Proxy:
    url: str  # http://127.0.0.1:PORT
    tls_url: str | None  # https://127.0.0.1:PORT, when TLS is on
    prefix: Path  # nginx's prefix: its configuration, logs and temp files
    process: subprocess.Popen  # nginx's master

    def error_log(self) -> str:
        return (self.prefix / "error.log").read_text()


def self_signed_certificate(directory: Path, hostname: str = "localhost") -> Path:
    """``directory``/proxy.crt and proxy.key, the self-signed pair `dandelion secrets` makes
    (pipeline/secrets.py): the proxy is tested with what deployments get."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem = certificate(hostname)
    (directory / TLS_KEY.name).write_bytes(key_pem)
    (directory / TLS_CERT.name).write_bytes(cert_pem)
    return directory / TLS_CERT.name


@contextlib.contextmanager
def running_proxy(
    upstream: str,
    prefix: Path,
    *,
    tls_dir: Path | None = None,
    nginx: str = "/usr/sbin/nginx",
    timeout: float = 30,
) -> Iterator[Proxy]:
    """``nginx`` with deploy/proxy/'s templates in front of ``upstream`` (host:port) on free
    127.0.0.1 ports, TLS too when ``tls_dir`` holds proxy.crt and proxy.key; stopped on exit."""
    http_port, tls_port = free_port(), free_port()
    variables = {
        "CLASSIFIER_UPSTREAM": upstream,
        "PROXY_HTTP_LISTEN": f"127.0.0.1:{http_port}",
        "PROXY_TLS_LISTEN": f"127.0.0.1:{tls_port}",
    }
    conf_d = prefix / "conf.d"
    conf_d.mkdir(parents=True)
    (prefix / "temp").mkdir()
    for template in TEMPLATES.glob("*.template"):
        if template.name == TLS_TEMPLATE and tls_dir is None:
            continue  # as a deployment without a certificate leaves it out
        (conf_d / template.name.removesuffix(".template")).write_text(render(template, variables))
    if tls_dir is not None:
        shutil.copytree(tls_dir, prefix / "tls")
    # As root (the build machines), nginx's workers would switch to `nobody`, who cannot
    # read the temporary directory: keep them this user's.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    (prefix / "nginx.conf").write_text(MAIN_CONF.format(user=user))
    command = [nginx, "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf")]
    command += ["-e", str(prefix / "error.log"), "-g", "daemon off;"]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True)
    if checked.returncode != 0:
        raise RuntimeError(f"nginx -t:\n{checked.stderr}")
    url = f"http://127.0.0.1:{http_port}"
    with open(prefix / "stdout.log", "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"nginx exited: {(prefix / 'error.log').read_text()}")
            try:
                requests.get(f"{url}/livez", timeout=2)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        tls_url = f"https://127.0.0.1:{tls_port}" if tls_dir is not None else None
        yield Proxy(url, tls_url, prefix, process)
    finally:
        stop_process_group(process)
