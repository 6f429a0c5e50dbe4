"""Locust load test of a running service: single photos to /predict, some batches of four.

After `dvc repro` (or `dvc pull`), with the service on port 3000:

    locust -f benchmarks/locustfile.py --host http://127.0.0.1:3000
    locust -f benchmarks/locustfile.py --host http://127.0.0.1:3000 --headless \
        --users 16 --spawn-rate 16 --run-time 60s --csv results-load

The photos are the pipeline's test split (data/split.csv, data/raw). An answer counts as a
failure unless it is a 200 with one prediction per photo sent.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

from locust import HttpUser, between, task

from pipeline.params import pipeline_paths  # the project is installed (pip install -e .)

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_photos() -> list[bytes]:
    split_csv = REPO_ROOT / pipeline_paths(REPO_ROOT / "dvc.yaml")["split_csv"]
    with open(split_csv, newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] == "test"]
    return [(REPO_ROOT / row["path"]).read_bytes() for row in rows]


PHOTOS = test_photos()


class PhotoSender(HttpUser):
    wait_time = between(0, 0.05)

    @task(9)
    def predict(self) -> None:
        photo = random.choice(PHOTOS)
        with self.client.post(
            "/predict", files={"image": ("photo.jpg", photo)}, catch_response=True
        ) as response:
            if response.status_code != 200 or "label" not in response.json():
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")

    @task(1)
    def predict_batch(self) -> None:
        photos = random.sample(PHOTOS, 4)
        files = [("images", (f"photo{i}.jpg", photo)) for i, photo in enumerate(photos)]
        with self.client.post("/predict_batch", files=files, catch_response=True) as response:
            if response.status_code != 200 or len(response.json()["predictions"]) != len(photos):
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
