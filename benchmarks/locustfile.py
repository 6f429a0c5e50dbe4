"""Locust load test of a running service: single photos to /predict, some batches of four.

After `dvc repro` (or `dvc pull`), with the service on port 3000:

    locust -f benchmarks/locustfile.py --host http://127.0.0.1:3000
    locust -f benchmarks/locustfile.py --host http://127.0.0.1:3000 --headless \
        --users 16 --spawn-rate 16 --run-time 60s --csv results-load

The photos are the pipeline's test split (data/split.csv, data/raw). An answer counts as a
failure unless it is a 200 with one prediction per photo sent.
"""

from __future__ import annotations

import random
from pathlib import Path

from locust import HttpUser, between, task

# The project is installed (pip install -e .).
from pipeline.params import pipeline_paths
from pipeline.shards import SplitPhotos
from pipeline.splits import TEST, read_split

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_photos() -> list[bytes]:
    """The test split's photos, read as the stages read them (data/raw's tar shards)."""
    paths = pipeline_paths(REPO_ROOT / "dvc.yaml")
    photos = SplitPhotos(paths["raw_dir"], REPO_ROOT)
    rows = read_split(REPO_ROOT / paths["split_csv"])
    return [photos.read(row.path) for row in rows if row.split == TEST]


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
