"""Prediction logs for the live-evidence tests, written by the service's own writer."""

from __future__ import annotations

from pathlib import Path

from serving.prediction_log import PredictionLog
from serving.settings import PREDICTION_LOG_DIR_ENV


def write_prediction_log(directory: Path, records: list[dict]) -> None:
    """``records`` logged in ``directory`` as the service logs its answers (files sink)."""
    log = PredictionLog.from_environ({PREDICTION_LOG_DIR_ENV: str(directory)})
    log.start()
    for record in records:
        log.record(record)
    log.stop(within=30)
