"""`dandelion secrets`: the stack's credentials generated where missing, never replaced."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from dotenv import dotenv_values

from pipeline.secrets import (
    CLASSIFIER_API_KEYS,
    ENV_VARIABLES,
    PROMETHEUS_API_KEY,
    TLS_CERT,
    TLS_KEY,
    SecretsError,
    generate,
    keys_in,
)
from serving.auth import read_key_file
from tests.support.processes import dandelion


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(env_file: Path, directory: Path) -> dict[str, bytes]:
    files = [env_file, *(p for p in directory.rglob("*") if p.is_file())]
    return {str(p): p.read_bytes() for p in files}


def test_generates_every_variable_and_file_with_its_mode(tmp_path):
    env_file, directory = tmp_path / ".env", tmp_path / ".secrets"
    written = generate(env_file, directory, "dvg.example.org")
    values = dotenv_values(env_file)  # as compose reads it
    assert list(values) == list(ENV_VARIABLES)
    assert all(values.values())
    passwords = [v for k, v in values.items() if k.endswith(("PASSWORD", "SECRET_KEY"))]
    assert len(set(passwords)) == len(passwords) == 4
    assert all(len(p) >= 32 for p in passwords)
    assert mode(env_file) == 0o600
    assert mode(directory) == mode(directory / "tls") == 0o700
    for name in (CLASSIFIER_API_KEYS, PROMETHEUS_API_KEY, TLS_CERT, TLS_KEY):
        assert mode(directory / name) == 0o644, name
    # Says what it wrote, never a value.
    output = "\n".join(written.lines())
    assert "MINIO_ROOT_PASSWORD" in output and str(directory / TLS_CERT) in output
    secret_values = [*values.values(), *keys_in(directory / CLASSIFIER_API_KEYS)]
    assert not [v for v in secret_values if v not in ("admin",) and v in output]


def test_prometheus_s_key_is_one_the_service_accepts(tmp_path):
    directory = tmp_path / ".secrets"
    generate(tmp_path / ".env", directory)
    keys = keys_in(directory / CLASSIFIER_API_KEYS)
    prometheus_key = (directory / PROMETHEUS_API_KEY).read_text().strip()
    assert len(keys) == 2 and keys[1] == prometheus_key and keys[0] != prometheus_key
    # Read by the service's own rule: a key it would refuse (too short, not printable ASCII)
    # would have raised.
    assert read_key_file(directory / CLASSIFIER_API_KEYS) == tuple(key.encode() for key in keys)


def test_a_rerun_keeps_every_value_and_file(tmp_path):
    env_file, directory = tmp_path / ".env", tmp_path / ".secrets"
    generate(env_file, directory)
    before = snapshot(env_file, directory)
    again = generate(env_file, directory, "another.example.org")
    assert snapshot(env_file, directory) == before
    assert again.lines() == ["secrets: nothing to add, every variable and file is there"]


def test_a_partial_env_keeps_the_user_s_values_and_gets_the_rest(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text(
        "# mine\nMINIO_ROOT_USER=alice\nexport GRAFANA_ADMIN_PASSWORD=my own one\n"
        "MLFLOW_ADMIN_PASSWORD=\nMINIO_ROOT_PASSWORD=minioadmin\nCLASSIFIER_PORT=3005"
    )
    env_file.chmod(0o644)
    written = generate(env_file, tmp_path / ".secrets")
    values = dotenv_values(env_file)
    assert values["MINIO_ROOT_USER"] == "alice"
    assert values["GRAFANA_ADMIN_PASSWORD"] == "my own one"
    assert values["MLFLOW_ADMIN_PASSWORD"] == "" and values["CLASSIFIER_PORT"] == "3005"
    assert set(ENV_VARIABLES) <= set(values)
    assert env_file.read_text().startswith("# mine\nMINIO_ROOT_USER=alice\n")
    assert mode(env_file) == 0o600  # tightened: it now holds passwords
    (added,) = written.variables
    assert "MINIO_ROOT_USER" not in added and "MINIO_ROOT_PASSWORD" not in added
    # Kept (never replaced), but named: compose refuses an empty value, and a default password
    # is no secret.
    assert values["MINIO_ROOT_PASSWORD"] == "minioadmin"
    notes = "\n".join(written.lines())
    assert "MLFLOW_ADMIN_PASSWORD is empty" in notes
    assert "MINIO_ROOT_PASSWORD is a well-known default" in notes
    assert "alice" not in notes and "my own one" not in notes


def test_missing_key_files_are_made_around_the_existing_ones(tmp_path):
    directory = tmp_path / ".secrets"
    directory.mkdir()
    accepted = directory / CLASSIFIER_API_KEYS
    accepted.write_text("my-own-client-key-0001\n")
    generate(tmp_path / ".env", directory)
    prometheus_key = (directory / PROMETHEUS_API_KEY).read_text().strip()
    assert keys_in(accepted) == ["my-own-client-key-0001", prometheus_key]


def test_a_key_file_without_a_last_newline_keeps_its_last_key_whole(tmp_path):
    directory = tmp_path / ".secrets"
    directory.mkdir()
    accepted = directory / CLASSIFIER_API_KEYS
    accepted.write_text("my-own-client-key-0001")  # as an editor may leave it
    generate(tmp_path / ".env", directory)
    prometheus_key = (directory / PROMETHEUS_API_KEY).read_text().strip()
    assert keys_in(accepted) == ["my-own-client-key-0001", prometheus_key]


def test_the_certificate_is_for_the_host_and_matches_its_key(tmp_path):
    directory = tmp_path / ".secrets"
    generate(tmp_path / ".env", directory, "dvg.example.org")
    cert = x509.load_pem_x509_certificate((directory / TLS_CERT).read_bytes())
    key = serialization.load_pem_private_key((directory / TLS_KEY).read_bytes(), None)
    assert cert.public_key() == key.public_key()
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["dvg.example.org", "localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    # A TLS client that trusts this certificate alone gets a verified connection.
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(directory / TLS_CERT, directory / TLS_KEY)
    client_context = ssl.create_default_context(cafile=str(directory / TLS_CERT))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def accept():
            connection, _ = listener.accept()
            with server_context.wrap_socket(connection, server_side=True) as tls:
                tls.sendall(b"ok")

        thread = threading.Thread(target=accept)
        thread.start()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client_context.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.recv(2) == b"ok"
        thread.join(timeout=10)


def test_half_a_tls_pair_is_refused_not_replaced(tmp_path):
    directory = tmp_path / ".secrets"
    (directory / "tls").mkdir(parents=True)
    (directory / TLS_CERT).write_text("mine")
    with pytest.raises(SecretsError, match="proxy.crt exists without .*proxy.key"):
        generate(tmp_path / ".env", directory)
    assert (directory / TLS_CERT).read_text() == "mine"


def test_bad_input_gets_one_clear_line(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("MINIO_ROOT_USER=alice\nhunter2 is my password\n")
    result = dandelion(tmp_path, "secrets", env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert result.stderr == "secrets: .env, line 2: not VAR=value; fix or remove the line\n"
    assert env_file.read_text() == "MINIO_ROOT_USER=alice\nhunter2 is my password\n"

    (tmp_path / "a-file").write_text("")
    result = dandelion(
        tmp_path, "secrets", "--env-file", "ok.env", "--secrets-dir", "a-file/secrets", env={}
    )
    assert result.returncode == 1
    assert result.stderr == "secrets: cannot write a-file/secrets: Not a directory\n"

    result = dandelion(tmp_path, "secrets", "--hostname", "not a host", env={})
    assert result.returncode == 1 and "--hostname 'not a host' is neither" in result.stderr
    assert result.stderr.count("\n") == 1
