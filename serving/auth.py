"""The API key (docs/serving.md, *API keys*): who may use the service, when its deployment says.

- ``ApiKeys.from_environ`` reads the keys when the front starts, from API_KEYS or
  API_KEYS_FILE (serving/settings.py); neither set, the service is open (a laptop's default).
  A configuration that is wrong stops the start with a message saying what to fix: it never
  leaves the service open by mistake.
- ``RequireApiKey``, an ASGI middleware around BentoML's whole app (its own routes /metrics,
  /readyz and /api/* included, which it answers before the service's FastAPI app is asked),
  answers 401 to a request without a key, or with a wrong one, on every path but ``OPEN_PATHS``
  (deny by default: a route added later is protected until it is listed here).
- ``with_security`` adds the scheme to an OpenAPI document, so that Swagger UI at /docs shows
  "Authorize" and sends the key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import bentoml
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.api import SWAGGER_ASSETS
from serving.errors import Rejection, rejection_response
from serving.settings import (
    API_KEY_HEADER,
    API_KEYS_ENV,
    API_KEYS_FILE_CHECK_SECONDS,
    API_KEYS_FILE_ENV,
    MIN_API_KEY_CHARS,
)

logger = logging.getLogger("bentoml.service.dandelion")

# What anyone may ask without a key: the probes (Kubernetes and compose have no key), the page
# (it asks for the key itself), Swagger UI and the API's description (how to send the key):
# /schema.json is BentoML's, which its clients read before any call, so that one without a
# token gets the 401 of its call (naming the header), not a failure to start.
OPEN_PATHS = frozenset(
    {"/livez", "/readyz", "/healthz", "/", "/docs", "/openapi.json", "/docs.json", "/schema.json"}
)
# Swagger UI's scripts and styles, which BentoML serves (serving/api.py SWAGGER_ASSETS).
OPEN_PREFIXES = (SWAGGER_ASSETS.removeprefix(".") + "/",)
BEARER = "bearer"
# The OpenAPI security schemes: the header, and the Bearer form BentoML's clients send.
SECURITY_SCHEMES = {
    "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": API_KEY_HEADER},
    "BearerKey": {"type": "http", "scheme": "bearer"},
}


class ApiKeyConfigError(ValueError):
    """The deployment's keys cannot be used: the service must not start."""


def parsed_keys(text: str, source: str, separator: str | None) -> tuple[bytes, ...]:
    """The keys of ``text`` (lines, or ``separator``-separated), each checked."""
    parts = text.split(separator) if separator else text.splitlines()
    keys = []
    for number, part in enumerate(parts, start=1):
        key = part.strip()
        if not key or (separator is None and key.startswith("#")):
            continue
        where = f"line {number}" if separator is None else f"key {number}"
        if len(key) < MIN_API_KEY_CHARS:
            raise ApiKeyConfigError(
                f"{source}: {where} is {len(key)} characters long; an API key needs at least "
                f"{MIN_API_KEY_CHARS} (make one with `dandelion secrets`, or "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            )
        if not key.isascii() or not key.isprintable():
            raise ApiKeyConfigError(
                f"{source}: {where} holds characters an HTTP header cannot carry "
                "(use printable ASCII)"
            )
        keys.append(key.encode())
    if not keys:
        raise ApiKeyConfigError(
            f"{source} holds no key: give at least one, or unset it to serve without keys"
        )
    return tuple(keys)


def read_key_file(path: Path) -> tuple[bytes, ...]:
    source = f"{API_KEYS_FILE_ENV}={path}"
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ApiKeyConfigError(f"{source} cannot be read: {error}") from None
    return parsed_keys(text, source, None)


def file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when the file is replaced or rewritten (a Kubernetes Secret's update
    swaps a symlink: stat follows it)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_mtime_ns, stat.st_ino, stat.st_size


def digests(keys: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """The keys' SHA-256 digests, what a presented key is compared with (``accepts``)."""
    return tuple(hashlib.sha256(key).digest() for key in keys)


@dataclass
class ApiKeys:
    """The keys a request may present, kept as their digests (made once per read, not per
    request); those of a ``path`` are read again when it changes."""

    digests: tuple[bytes, ...]
    path: Path | None = None
    stamp: tuple | None = None
    checked: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> ApiKeys | None:
        """The deployment's keys; None (open) when it names none; ApiKeyConfigError."""
        listed, file = environ.get(API_KEYS_ENV), environ.get(API_KEYS_FILE_ENV)
        if listed is not None and file is not None:
            raise ApiKeyConfigError(
                f"both {API_KEYS_ENV} and {API_KEYS_FILE_ENV} are set: set one of them"
            )
        if file is not None:
            if not file.strip():
                raise ApiKeyConfigError(f"{API_KEYS_FILE_ENV} is set but empty: name a file")
            path = Path(file)
            stamp = file_stamp(path)
            keys = cls(digests(read_key_file(path)), path, stamp)
            logger.info("API keys required: %d from %s", len(keys.digests), path)
            return keys
        if listed is not None:
            keys = cls(digests(parsed_keys(listed, API_KEYS_ENV, ",")))
            logger.info("API keys required: %d from %s", len(keys.digests), API_KEYS_ENV)
            return keys
        logger.warning(
            "no API keys configured (%s or %s): the service is open to anyone who reaches it",
            API_KEYS_ENV,
            API_KEYS_FILE_ENV,
        )
        return None

    def current(self) -> tuple[bytes, ...]:
        """The keys' digests, read again from the file if it changed (looked at every few
        seconds). A file that has become unusable keeps the keys in force, with a warning: a
        Secret half-updated must not open the service, nor lock everyone out."""
        if self.path is None or time.monotonic() - self.checked < API_KEYS_FILE_CHECK_SECONDS:
            return self.digests
        with self.lock:
            self.checked = time.monotonic()
            stamp = file_stamp(self.path)
            if stamp != self.stamp:
                try:
                    self.digests = digests(read_key_file(self.path))
                    self.stamp = stamp
                    logger.info("API keys read again: %d from %s", len(self.digests), self.path)
                except ApiKeyConfigError as error:
                    logger.warning("API keys kept as they were: %s", error)
        return self.digests

    def accepts(self, presented: bytes | None) -> bool:
        """Whether ``presented`` is one of the keys, compared in constant time with every key
        (no early exit: the time says nothing of which key, or how much of one, matched). The
        SHA-256 digests are compared, not the keys: compare_digest returns at once on inputs
        of different lengths, which would tell a key's length."""
        if presented is None:
            return False
        digest = hashlib.sha256(presented).digest()
        matched = False
        for key_digest in self.current():
            matched |= hmac.compare_digest(digest, key_digest)
        return matched


def presented_key(headers: Headers) -> bytes | None:
    """The key a request presents: API_KEY_HEADER, else `Authorization: Bearer <key>`."""
    key = headers.get(API_KEY_HEADER)
    if key is None:
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        if scheme.lower() != BEARER or not credentials.strip():
            return None
        key = credentials
    return key.strip().encode("latin-1")


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def unauthorized(presented: bytes | None) -> Rejection:
    said = "a wrong API key" if presented is not None else "no API key"
    return Rejection(
        "unauthorized",
        f"{said}: send the key in the header '{API_KEY_HEADER}: <key>' "
        "or 'Authorization: Bearer <key>'",
    )


class RequireApiKey:
    """ASGI middleware: where the front has keys (``api_keys``), every path but the open ones
    needs one of them; else 401 ``{"error": ...}``, with ``WWW-Authenticate: Bearer``, counted
    as the rejection ``unauthorized``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        keys: ApiKeys | None = bentoml.get_current_service().api_keys
        presented = presented_key(Headers(scope=scope)) if keys is not None else None
        if keys is None or keys.accepts(presented):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # policy violation
            return
        response = rejection_response(unauthorized(presented))
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


def with_security(document: dict, keys: ApiKeys | None) -> dict:
    """``document`` with the API key's schemes on every protected operation, if keys are
    required (either scheme will do: OpenAPI's list of alternatives)."""
    if keys is None:
        return document
    document.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    for path, operations in document.get("paths", {}).items():
        if is_open(path):
            continue
        for operation in operations.values():
            if isinstance(operation, dict):
                operation["security"] = [{name: []} for name in SECURITY_SCHEMES]
    return document
