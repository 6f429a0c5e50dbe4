"""Every error the service answers is JSON, ``{"error": "..."}``.

- ``Rejection``: a request answered without a prediction, for one of the ``REJECTIONS``
  reasons, which fixes its HTTP status; ``rejection_response`` answers it and counts it on
  /metrics by reason and status, whichever route it came from.
- FastAPI's exception handlers (``handle_errors``) answer rejections and FastAPI's own errors
  (405 on the service's routes) in that form.
- ``JsonErrors``, an ASGI middleware, does the same for the plain-text 404 and 405 that
  BentoML's router answers before the service's app is asked.
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.metrics import model_metrics
from serving.settings import RETRY_AFTER_SECONDS

# Why a feedback (POST /feedback) is refused, beside the upload's reasons. A 5xx is the
# service's failure, not the feedback's: the spool is full while the store is down (503, try
# later), or the feedback could not be written to the spool's disk (500).
FEEDBACK_REJECTIONS = {
    "unknown_field": 422,
    "bad_label": 422,
    "bad_answer_id": 422,
    "comment_too_long": 422,
    "model_version_too_long": 422,
    "feedback_spool_full": 503,
    "feedback_not_stored": 500,
}
# Why a request is refused -> the HTTP status it is answered with. The reasons are
# the `reason` label of classifier_rejected_uploads_total: a short, fixed set (the message,
# which names sizes and fields, would make a label of unbounded cardinality).
REJECTIONS = {
    "not_multipart": 415,
    "no_content_length": 411,
    "bad_content_length": 400,
    "request_too_large": 413,
    "malformed_multipart": 400,
    "too_many_files": 400,
    "truncated_multipart": 400,
    "missing_file": 422,
    "not_a_file": 422,
    "empty_file": 400,
    "file_too_large": 413,
    "too_many_pixels": 413,
    "not_an_image": 415,
    "image_too_small": 422,
    "corrupt_image": 422,
    "slow_upload": 408,
    "overloaded": 503,
    "shutting_down": 503,
    "model_unavailable": 503,
    # No API key, or a wrong one, where keys are configured (serving/auth.py).
    "unauthorized": 401,
    **FEEDBACK_REJECTIONS,
}
# The reasons a feedback is never refused for (the OpenAPI documents): it takes no place among
# the predictions and calls no model.
PREDICTION_ONLY = ("overloaded", "model_unavailable")


class Rejection(Exception):
    """A request answered with ``REJECTIONS[reason]`` and ``{"error": message}``."""

    def __init__(self, reason: str, message: str, retry_after: int = RETRY_AFTER_SECONDS):
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after
        self.status = REJECTIONS[reason]
        self.message = message

    @property
    def headers(self) -> dict[str, str]:
        if self.status == 503:  # busy, stopping or its store down: say when to come back
            return {"Retry-After": str(self.retry_after)}
        if self.status == 408:  # the rest of the body may still come: do not reuse the line
            return {"Connection": "close"}
        return {}


def rejection_response(rejection: Rejection) -> JSONResponse:
    """The answer to a rejected request, counted (classifier_rejected_uploads_total)."""
    model_metrics().count_rejection(rejection.reason, rejection.status)
    return JSONResponse(
        {"error": rejection.message}, status_code=rejection.status, headers=rejection.headers
    )


def error_message(status: int, request_method: str, path: str, detail: str | None = None) -> str:
    return f"{detail or HTTPStatus(status).phrase}: {request_method} {path}"


def handle_errors(app: FastAPI) -> None:
    """Answer rejections, and FastAPI's own errors (405 and the like), as JSON."""

    @app.exception_handler(Rejection)
    async def rejected(request: Request, rejection: Rejection) -> JSONResponse:
        return rejection_response(rejection)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = error_message(error.status_code, request.method, request.url.path, error.detail)
        return JSONResponse(
            {"error": message}, status_code=error.status_code, headers=error.headers
        )


class JsonErrors:
    """ASGI middleware: BentoML's own router answers an unknown path (404), and a wrong method
    on its own routes (405), in plain text before the service's app is asked; this rewrites
    exactly those plain-text 404 and 405 answers as ``{"error": ...}``. Any other answer passes
    through untouched, as it streams."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held: Message | None = None  # the start of a plain-text 404 or 405, not yet sent

        async def rewrite(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and is_plain_404_or_405(message):
                held = message
                return
            if held is None:
                await send(message)
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                status = held["status"]
                body = JSONResponse(
                    {"error": error_message(status, scope["method"], scope["path"])}
                ).body
                headers = MutableHeaders(raw=list(held["headers"]))
                headers["content-type"] = "application/json"
                headers["content-length"] = str(len(body))
                await send({**held, "headers": headers.raw})
                await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)


def is_plain_404_or_405(start: Message) -> bool:
    content_type = MutableHeaders(raw=start["headers"]).get("content-type", "")
    return start["status"] in (404, 405) and content_type.startswith("text/plain")
