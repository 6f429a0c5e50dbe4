"""An Alertmanager webhook notification, checked, and the repository_dispatch it becomes.

Alertmanager's body (version "4"): ``{"version": "4", "status": ..., "receiver": ...,
"externalURL": ..., "alerts": [{"status": "firing" | "resolved", "labels": {...},
"annotations": {...}, "startsAt": ..., ...}], ...}``. GitHub's ``POST
/repos/{owner}/{repo}/dispatches`` takes ``{"event_type": ..., "client_payload": {...}}``, at most
10 top-level keys in ``client_payload``; the retrain workflow reads ``client_payload.alerts``.
"""

from __future__ import annotations

import json
from typing import Any

EVENT_TYPE = "model-degraded"  # .github/workflows/retrain.yml: repository_dispatch types
WEBHOOK_VERSION = "4"  # the only version Alertmanager has sent so far
# The dispatch stays small whatever Alertmanager groups: the first alerts are named, the
# rest counted (client_payload.alerts_total).
MAX_PAYLOAD_ALERTS = 10
MAX_SUMMARY_CHARS = 300


class BadNotification(ValueError):
    """The body is not an Alertmanager webhook notification (the relay answers 4xx)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def parse_notification(body: bytes) -> dict[str, Any]:
    """The notification in ``body``, checked for what ``dispatch_request`` reads."""
    try:
        notification = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BadNotification(f"the body is not JSON: {error}", status=400) from None
    if not isinstance(notification, dict):
        raise BadNotification("the body is not a JSON object")
    version = notification.get("version")
    if version != WEBHOOK_VERSION:
        raise BadNotification(
            f"webhook version {version!r}: this relay reads Alertmanager's version "
            f"{WEBHOOK_VERSION!r}"
        )
    alerts = notification.get("alerts")
    if not isinstance(alerts, list):
        raise BadNotification("'alerts' must be a list")
    for index, alert in enumerate(alerts):
        where = f"alerts[{index}]"
        if not isinstance(alert, dict):
            raise BadNotification(f"{where} is not an object")
        if alert.get("status") not in {"firing", "resolved"}:
            raise BadNotification(f"{where}.status must be 'firing' or 'resolved'")
        labels = alert.get("labels")
        if not isinstance(labels, dict) or not isinstance(labels.get("alertname"), str):
            raise BadNotification(f"{where}.labels must be an object with an alertname")
        if not isinstance(alert.get("annotations", {}), dict):
            raise BadNotification(f"{where}.annotations must be an object")
    return notification


def firing_alerts(notification: dict[str, Any]) -> list[dict[str, Any]]:
    return [alert for alert in notification["alerts"] if alert["status"] == "firing"]


def describe(alert: dict[str, Any]) -> dict[str, Any]:
    """One alert as the workflow shows it: name, labels (model_version...), start, summary."""
    labels = {key: str(value) for key, value in alert["labels"].items() if key != "alertname"}
    summary = str(alert.get("annotations", {}).get("summary", ""))
    return {
        "name": alert["labels"]["alertname"],
        "labels": labels,
        "startsAt": str(alert.get("startsAt", "")),
        "summary": summary[:MAX_SUMMARY_CHARS],
    }


def dispatch_request(notification: dict[str, Any]) -> dict[str, Any] | None:
    """The body of GitHub's repository_dispatch for ``notification``; None when no alert in it
    is firing (a resolved degradation starts nothing)."""
    firing = firing_alerts(notification)
    if not firing:
        return None
    return {
        "event_type": EVENT_TYPE,
        "client_payload": {
            "alerts": [describe(alert) for alert in firing[:MAX_PAYLOAD_ALERTS]],
            "alerts_total": len(firing),
            "alertmanager": str(notification.get("externalURL", "")),
        },
    }
