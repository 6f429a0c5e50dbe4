"""The framework's floor, a row of the load benchmark: a BentoML service that does only what
every /predict must, read the multipart upload, and answers a constant.

A FastAPI app mounted on a BentoML service, as serving/service.py mounts the front's routes:
one worker, the same traffic settings, BentoML's own /readyz and middleware. What the real
service spends per request beyond this and beyond inference is its own request path.

    bentoml serve benchmarks.bare_service:BareService
"""

from __future__ import annotations

import bentoml
from fastapi import FastAPI, UploadFile  # module level: FastAPI resolves the annotations

from serving.settings import TRAFFIC

app = FastAPI()


@app.post("/predict")
async def predict(image: UploadFile) -> dict:
    await image.read()
    return {"label": "dandelion"}


@bentoml.service(workers=1, traffic=TRAFFIC)
@bentoml.asgi_app(app, path="/")
class BareService:
    pass
