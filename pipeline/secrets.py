"""``dandelion secrets``: the stack's credentials, generated where they are missing.

docker-compose.yml refuses to start without its credentials (``${VAR:?...}``); this fills
them in with random values so nobody has to invent (or reuse) one:

- in ``.env`` (mode 0600), the variables compose reads: ``ENV_VARIABLES``;
- in ``.secrets/`` (mode 0700), the files compose mounts: the API keys the service accepts
  (a user's key, then Prometheus's), the key Prometheus sends, and a self-signed TLS
  certificate with its key for the proxy.

It only ever adds: an existing variable and an existing file are kept as they are, so running
it again is safe and a value someone chose is never replaced; an empty value or a well-known
default password is kept too, but named, with what to do. The values are never printed, only
what was written where.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pipeline.stage import StageError

ENV_FILE = Path(".env")
SECRETS_DIR = Path(".secrets")
DEFAULT_HOSTNAME = "localhost"
CLASSIFIER_API_KEYS = "classifier-api-keys"  # API_KEYS_FILE of the service
PROMETHEUS_API_KEY = "prometheus-api-key"  # the one Prometheus sends (also in the file above)
TLS_CERT = Path("tls") / "proxy.crt"
TLS_KEY = Path("tls") / "proxy.key"
CERT_DAYS = 825  # what browsers accept for a server certificate; renew by deleting both files

ENV_MODE = 0o600  # holds every password of the stack: the user's alone
DIR_MODE = 0o700
# Compose bind-mounts these files as they are into containers whose processes run as other
# users (the service's `bentoml`, Prometheus's `nobody`, nginx's workers), so they must be
# world-readable; the 0700 directory keeps other users of this machine out of them.
MOUNTED_MODE = 0o644


def _token() -> str:
    return secrets.token_urlsafe(32)  # 43 characters: also a valid API key (>= 16)


# name -> how its value is made. The user names are not secret; the passwords and keys are.
ENV_VARIABLES = {
    "MINIO_ROOT_USER": lambda: f"minio-{secrets.token_hex(4)}",
    "MINIO_ROOT_PASSWORD": _token,
    "GRAFANA_ADMIN_USER": lambda: "admin",
    "GRAFANA_ADMIN_PASSWORD": _token,
    "MLFLOW_ADMIN_USER": lambda: "admin",
    "MLFLOW_ADMIN_PASSWORD": _token,
    "MLFLOW_FLASK_SERVER_SECRET_KEY": _token,
}

_ASSIGNMENT = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+$")


class SecretsError(StageError):
    """The secrets cannot be written; the message says why."""


@dataclass
class Written:
    """What one run added (names and paths, never values)."""

    variables: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        if not (self.variables or self.files):
            return [*self.notes, "secrets: nothing to add, every variable and file is there"]
        return self.notes + [f"secrets: wrote {what}" for what in (*self.variables, *self.files)]


def env_values(path: Path) -> dict[str, str]:
    """The variables ``path`` (a compose .env file) sets, with their values; SecretsError on a
    line that is neither blank, a comment nor VAR=value (its number only: the line may hold a
    secret)."""
    values = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _ASSIGNMENT.match(line)
        if match is None:
            raise SecretsError(f"{path}, line {number}: not VAR=value; fix or remove the line")
        values[match.group(1)] = line[match.end() :].strip().strip("'\"")
    return values


# Passwords that are no secret: the fallbacks of old docker-compose.yml and .env.example files.
KNOWN_DEFAULTS = frozenset({"minioadmin", "admin", "change-me-please"})


def weak_values(values: dict[str, str]) -> list[str]:
    """What is kept but will not do: an empty value (compose's ``${VAR:?}`` refuses it) and a
    well-known default password."""
    notes = []
    for name in ENV_VARIABLES:
        value = values.get(name)
        if value == "":
            notes.append(
                f"secrets: {name} is empty, which compose refuses: remove its line and run again"
            )
        elif name.endswith(("_PASSWORD", "_KEY")) and value in KNOWN_DEFAULTS:
            notes.append(f"secrets: {name} is a well-known default: remove its line and run again")
    return notes


def fill_env(path: Path, written: Written) -> None:
    """Append the missing ``ENV_VARIABLES`` to ``path`` (created 0600 if missing)."""
    existing = env_values(path) if path.exists() else {}
    written.notes += weak_values(existing)
    missing = [name for name in ENV_VARIABLES if name not in existing]
    if path.exists() and stat.S_IMODE(path.stat().st_mode) & 0o077:
        path.chmod(ENV_MODE)
        written.notes.append(f"secrets: {path} was readable by others: now {ENV_MODE:o}")
    if not missing:
        return
    text = path.read_text() if path.exists() else ""
    lines = [] if not text or text.endswith("\n") else [""]
    lines += ["# Generated by `dandelion secrets`: keep it out of Git."] if not text else []
    lines += [f"{name}={ENV_VARIABLES[name]()}" for name in missing]
    with _open_new_or_append(path, ENV_MODE) as file:
        file.write("\n".join(lines) + "\n")
    written.variables.append(f"{path}: {', '.join(missing)}")


def _open_new_or_append(path: Path, mode: int):
    # Created with its final mode, so the secret is never readable by others, even briefly.
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    return os.fdopen(descriptor, "a")


def write_new(path: Path, content: bytes, written: Written, why: str) -> None:
    """Create ``path`` with ``content`` and MOUNTED_MODE; never replaces an existing file."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, MOUNTED_MODE)
    with os.fdopen(descriptor, "wb") as file:
        file.write(content)
    os.chmod(path, MOUNTED_MODE)  # the umask may have narrowed it
    written.files.append(f"{path} ({why})")


def make_dir(path: Path) -> None:
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    path.chmod(DIR_MODE)


def keys_in(path: Path) -> list[str]:
    """An API key file's keys, read by the service's own rule (serving/auth.py); a file the
    service would refuse stops here with the service's message."""
    from serving.auth import ApiKeyConfigError, read_key_file

    try:
        return [key.decode() for key in read_key_file(path)]
    except ApiKeyConfigError as error:
        raise SecretsError(str(error)) from None


def fill_api_keys(directory: Path, written: Written) -> None:
    """The service's key file (a user's key, then Prometheus's) and Prometheus's own file,
    whichever is missing; Prometheus's key is always one the service accepts."""
    accepted, scraper = directory / CLASSIFIER_API_KEYS, directory / PROMETHEUS_API_KEY
    if scraper.exists():
        prometheus_key = scraper.read_text().strip()
        if not prometheus_key:
            raise SecretsError(f"{scraper} is empty: remove it, and a key is generated")
    else:
        prometheus_key = _token()
        write_new(scraper, f"{prometheus_key}\n".encode(), written, "the key Prometheus sends")
    if not accepted.exists():
        content = (
            "# The API keys the service accepts (API_KEYS_FILE), one a line. Generated by\n"
            "# `dandelion secrets`: a key for you and your clients, then Prometheus's.\n"
            f"{_token()}\n{prometheus_key}\n"
        )
        write_new(accepted, content.encode(), written, "the keys the service accepts")
    elif prometheus_key not in keys_in(accepted):
        separator = "" if accepted.read_text().endswith("\n") else "\n"  # a last line kept whole
        with open(accepted, "a") as file:  # adds a key; the ones there stay valid
            file.write(f"{separator}{prometheus_key}\n")
        written.files.append(f"{accepted} (Prometheus's key added)")


def certificate(hostname: str, days: int = CERT_DAYS) -> tuple[bytes, bytes]:
    """A self-signed server certificate for ``hostname``, localhost and 127.0.0.1, and its
    private key (P-256), both PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for name in _sans(hostname):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks differ a little
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def check_hostname(hostname: str) -> None:
    try:
        ipaddress.ip_address(hostname)
        return
    except ValueError:
        pass
    if not _HOSTNAME.match(hostname):
        raise SecretsError(f"--hostname {hostname!r} is neither a DNS name nor an IP address")


def fill_tls(directory: Path, hostname: str, written: Written) -> None:
    cert_path, key_path = directory / TLS_CERT, directory / TLS_KEY
    if cert_path.exists() and key_path.exists():
        return
    if cert_path.exists() or key_path.exists():
        present, absent = (cert_path, key_path) if cert_path.exists() else (key_path, cert_path)
        raise SecretsError(
            f"{present} exists without {absent}: remove it to generate a new pair, "
            "or put its other half there"
        )
    make_dir(cert_path.parent)
    cert_pem, key_pem = certificate(hostname)
    # The key is as readable as the certificate (MOUNTED_MODE): the proxy's nginx workers
    # read it through the bind mount as an unprivileged user; the 0700 directories around it
    # keep it from the machine's other users.
    write_new(key_path, key_pem, written, "the proxy's TLS key")
    write_new(cert_path, cert_pem, written, f"self-signed, for {', '.join(_sans(hostname))}")


def _sans(hostname: str) -> list[str]:
    return list(dict.fromkeys([hostname, "localhost", "127.0.0.1"]))


def generate(
    env_file: Path = ENV_FILE, secrets_dir: Path = SECRETS_DIR, hostname: str = DEFAULT_HOSTNAME
) -> Written:
    """Add whatever is missing of the stack's secrets; return what was written."""
    check_hostname(hostname)
    written = Written()
    try:
        fill_env(env_file, written)
        make_dir(secrets_dir)
        fill_api_keys(secrets_dir, written)
        fill_tls(secrets_dir, hostname, written)
    except (PermissionError, NotADirectoryError, IsADirectoryError, FileNotFoundError) as error:
        raise SecretsError(f"cannot write {error.filename}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise SecretsError("an existing file is not text: check .env and .secrets/") from None
    return written
