"""`dandelion predict-batch` (pipeline/batch_predict.py) on a small generated model and photos.

The same answers as the served bento on the real model: tests/end_to_end/test_batch_predict.py;
on a Ray cluster: tests/end_to_end/test_batch_predict_ray.py.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline.batch_predict import MANIFEST_FILE, PART_FILE, PARTS_SUFFIX, predict_batch
from pipeline.export import export_model
from serving.contract import MODEL_FILE, NOVELTY, PROBABILITY, load_image
from tests.support.images import make_image
from tests.support.paths import PARAMS_FILE

IMAGE_SIZE = 32
MAX_UPLOAD_BYTES = 20_000
# The files the service refuses, and why (serving/errors.py REJECTIONS).
REFUSED = {
    "empty.jpg": "empty_file",
    "notes.txt": "not_an_image",
    "tiny.png": "image_too_small",
    "truncated.jpg": "corrupt_image",
    "z/big.bmp": "file_too_large",
}


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    """Two outputs per image, as the real model's: a probability and a novelty."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    pooled = keras.layers.GlobalAveragePooling2D()(x)
    probability = keras.layers.Dense(1, activation="sigmoid")(pooled)
    novelty = keras.layers.Dense(1, activation="softplus")(pooled)
    path = tmp_path_factory.mktemp("model") / MODEL_FILE
    keras.Model(inputs, keras.layers.Concatenate()([probability, novelty])).save(path)
    return path


@pytest.fixture(scope="module")
def export_dir(keras_file, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("export") / "export"
    export_model(keras_file, directory, "openvino")
    return directory


def write_params(path: Path, chunk_photos: int = 2, threshold: float = 0.5) -> Path:
    params = yaml.safe_load(PARAMS_FILE.read_text())
    params["preprocess"]["image_size"] = IMAGE_SIZE
    params["serve"]["max_upload_bytes"] = MAX_UPLOAD_BYTES
    params["evaluate"]["threshold"] = threshold
    params["predict_batch"]["chunk_photos"] = chunk_photos
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture
def params_file(tmp_path) -> Path:
    return write_params(tmp_path / "params.yaml")


def photo(seed: int) -> bytes:
    return make_image(color=(40 * seed % 256, 180, 40), seed=seed)


def write_photos(directory: Path) -> dict[str, bytes]:
    """Six photos (JPEG and PNG, one in a sub-directory) and the REFUSED files."""
    files = {f"{index:02d}.jpg": photo(index) for index in range(4)}
    files["a/04.png"] = make_image(size=(40, 60), fmt="PNG", seed=4)
    files["a/b/05.jpg"] = photo(5)
    noise = np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8)
    big, noisy = io.BytesIO(), io.BytesIO()
    Image.fromarray(noise).save(big, "BMP")
    Image.fromarray(noise).save(noisy, "JPEG")
    files.update(
        {
            "empty.jpg": b"",
            "notes.txt": b"not a photo\n",
            "tiny.png": make_image(size=(10, 10), fmt="PNG"),
            "truncated.jpg": noisy.getvalue()[:1500],  # the header reads, the data ends early
            "z/big.bmp": big.getvalue(),
        }
    )
    for name, data in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    return files


@pytest.fixture
def photos(tmp_path) -> Path:
    directory = tmp_path / "photos"
    write_photos(directory)
    return directory


def test_every_file_gets_the_models_answer_or_the_services_reason(
    photos, export_dir, params_file, keras_file, tmp_path
):
    out = tmp_path / "out" / "predictions.parquet"
    summary = predict_batch(str(photos), str(out), export_dir, params_file)
    rows = pq.read_table(out).to_pylist()
    names = sorted(str(p.relative_to(photos)) for p in photos.rglob("*") if p.is_file())
    assert [row["path"] for row in rows] == names
    refused = {row["path"]: row["error"] for row in rows if row["error"] is not None}
    assert refused == REFUSED
    for row in rows:
        assert (row["error_message"] is None) == (row["error"] is None)
    # The Keras model itself, on the photos decoded as training decodes them: the export
    # answers as it does (OpenVINO in f32: within float rounding).
    model = keras.models.load_model(keras_file)
    answered = [row for row in rows if row["error"] is None]
    images = np.stack([load_image(photos / row["path"], IMAGE_SIZE) for row in answered])
    outputs = model.predict_on_batch(images)
    for row, output in zip(answered, outputs, strict=True):
        expected = "dandelion" if output[PROBABILITY] >= 0.5 else "grass"
        assert row["label"] == expected
        assert row["score"] == pytest.approx(float(output[PROBABILITY]), abs=1e-5)
        assert row["probabilities"]["dandelion"] == round(row["score"], 4)
        assert row["probabilities"]["grass"] == round(1 - round(row["score"], 4), 4)
        assert row["confidence"] == row["probabilities"][row["label"]]
        assert row["novelty"] == pytest.approx(float(output[NOVELTY]), abs=1e-4)
        assert row["neither"] == (output[NOVELTY] > 1)
    assert summary.splitlines()[-1].startswith(
        f"predict-batch: 11 files of {photos}: 6 answered ("
    ), summary
    assert "5 unreadable (corrupt_image 1, empty_file 1, file_too_large 1, " in summary
    assert "  unreadable: notes.txt: not_an_image: the upload is not a JPEG" in summary
    assert not Path(f"{out}{PARTS_SUFFIX}").exists()  # joined into OUT, then removed


def test_the_output_is_the_same_bytes_however_the_work_is_cut(photos, export_dir, tmp_path):
    outs = []
    for chunk_photos in (2, 3, 256):
        params = write_params(tmp_path / f"params-{chunk_photos}.yaml", chunk_photos)
        outs.append(tmp_path / f"predictions-{chunk_photos}.parquet")
        predict_batch(str(photos), str(outs[-1]), export_dir, params)
    first, *others = (out.read_bytes() for out in outs)
    assert all(other == first for other in others)
    metadata = pq.read_schema(outs[0]).metadata[b"dandelion.model"]
    assert b'"engine": "openvino"' in metadata


def test_a_bucket_prefix_is_answered_as_the_same_directory_is(
    photos, export_dir, params_file, s3, monkeypatch, tmp_path
):
    """On moto's S3 server, the endpoint from AWS_ENDPOINT_URL as boto3 and dvc-s3 read it."""
    client = s3.client()
    for path in photos.rglob("*"):
        if path.is_file():
            client.put_object(
                Bucket=s3.bucket, Key=f"photos/{path.relative_to(photos)}", Body=path.read_bytes()
            )
    client.put_object(Bucket=s3.bucket, Key="photos-other/00.jpg", Body=photo(9))  # not under it
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_access_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    out = f"s3://{s3.bucket}/results/predictions.parquet"
    summary = predict_batch(f"s3://{s3.bucket}/photos", out, export_dir, params_file)
    assert f"11 files of s3://{s3.bucket}/photos: 6 answered" in summary
    local = tmp_path / "predictions.parquet"
    predict_batch(str(photos), str(local), export_dir, params_file)
    results = {key: data for key, data in s3.objects().items() if key.startswith("results/")}
    assert results == {"results/predictions.parquet": local.read_bytes()}  # parts removed


def dandelion_predict_batch(source: Path, out: Path, export: Path, params: Path, **options):
    """`dandelion predict-batch` in a process (and process group) of its own, in-process."""
    command = [str(Path(sys.executable).parent / "dandelion"), "predict-batch", str(source)]
    command += ["--out", str(out), "--export", str(export), "--params", str(params)]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **options,
    )


def wait_for(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def open_for_writing(fifo: Path, process: subprocess.Popen) -> int:
    """The FIFO's write end, once ``process`` has opened it to read (it then waits there)."""
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet
            assert process.poll() is None, process.communicate()
            time.sleep(0.05)


def test_a_killed_run_resumes_after_its_last_chunk_and_a_changed_run_is_refused(
    photos, export_dir, params_file, tmp_path
):
    """A FIFO among the photos holds a run at its fourth chunk (of 2 photos) until the test
    writes a photo into it: a real process, killed there with SIGKILL, then run again."""
    fifo = photos / "m-pipe.jpg"  # sorted between empty.jpg and notes.txt: the 8th file
    os.mkfifo(fifo)
    out = tmp_path / "predictions.parquet"
    parts = Path(f"{out}{PARTS_SUFFIX}")
    finished = [parts / PART_FILE.format(index) for index in range(3)]

    first = dandelion_predict_batch(photos, out, export_dir, params_file)
    try:
        wait_for(finished[-1].exists, "third part")
        time.sleep(0.5)
        assert first.poll() is None  # waiting on the FIFO, in the fourth chunk
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate()
    assert sorted(path.name for path in parts.iterdir()) == sorted(
        [MANIFEST_FILE, *(path.name for path in finished)]
    )
    written = [(path.stat().st_ino, path.stat().st_mtime_ns) for path in finished]

    # Another listing, or another model: the parts would mix two runs.
    (photos / "00b.jpg").write_bytes(photo(7))
    refused = dandelion_predict_batch(photos, out, export_dir, params_file)
    _, stderr = refused.communicate(timeout=300)
    assert refused.returncode == 1
    assert stderr.strip().endswith(
        f"predict-batch: {parts} holds the parts of an unfinished run with another listing: "
        f"run again with the photos, model and params it had, or delete {parts} to start over"
    ), stderr
    (photos / "00b.jpg").unlink()
    stricter = write_params(tmp_path / "stricter.yaml", threshold=0.6)
    refused = dandelion_predict_batch(photos, out, export_dir, stricter)
    _, stderr = refused.communicate(timeout=300)
    assert refused.returncode == 1 and "unfinished run with another model:" in stderr, stderr

    again = dandelion_predict_batch(photos, out, export_dir, params_file)
    try:
        writer = open_for_writing(fifo, again)  # it is at the fourth chunk again
        assert [(path.stat().st_ino, path.stat().st_mtime_ns) for path in finished] == written
        assert not (parts / PART_FILE.format(3)).exists()
        with os.fdopen(writer, "wb") as handle:
            os.set_blocking(writer, True)
            handle.write(photo(8))
        stdout, stderr = again.communicate(timeout=300)
    finally:
        if again.poll() is None:
            os.killpg(again.pid, signal.SIGKILL)
            again.communicate()
    assert again.returncode == 0, stderr
    assert "6 chunks, 3 done by an earlier run, the rest scored here" in stdout
    assert not parts.exists()

    # The same bytes as a run never interrupted, on the same files.
    fifo.unlink()
    fifo.write_bytes(photo(8))
    whole = tmp_path / "whole.parquet"
    predict_batch(str(photos), str(whole), export_dir, params_file)
    rows = {row["path"]: row for row in pq.read_table(out).to_pylist()}
    assert rows == {row["path"]: row for row in pq.read_table(whole).to_pylist()}
    assert out.read_bytes() == whole.read_bytes()
    assert len(rows) == 12 and rows["m-pipe.jpg"]["error"] is None


@pytest.mark.slow
def test_on_a_ray_cluster_the_output_is_the_bytes_of_a_run_in_process(
    photos, export_dir, params_file, ray_cluster, tmp_path
):
    """RAY_ADDRESS and the token of a real local cluster: map_batches with an actor per
    worker, as a real cluster would run it."""
    here = tmp_path / "here.parquet"
    predict_batch(str(photos), str(here), export_dir, params_file)
    out = tmp_path / "on-ray.parquet"
    command = [str(Path(sys.executable).parent / "dandelion"), "predict-batch", str(photos)]
    command += ["--out", str(out), "--export", str(export_dir), "--params", str(params_file)]
    env = ray_cluster.client_env(dict(os.environ))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    where = f"the rest scored on Ray at {ray_cluster.address} -> {out}"
    assert f"6 chunks, 0 done by an earlier run, {where}" in result.stdout
    assert out.read_bytes() == here.read_bytes()


def test_the_export_is_dvc_yamls_unless_given_and_outside_the_project_it_must_be(
    photos, tmp_path, monkeypatch
):
    from pipeline.cli import main

    params = tmp_path / "params.yaml"
    params.write_text(PARAMS_FILE.read_text())
    (tmp_path / "dvc.yaml").write_text("vars:\n  - export_dir: somewhere/else\nstages: {}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main(["predict-batch", str(photos), "--out", str(tmp_path / "out.parquet")])
    # The path dvc.yaml declares, not a copy of it.
    assert str(stopped.value) == "predict-batch: somewhere/else: no export directory " + (
        "(`dvc pull` or `dvc repro` makes it)"
    )
    (tmp_path / "dvc.yaml").unlink()
    with pytest.raises(SystemExit) as stopped:
        main(["predict-batch", str(photos), "--out", str(tmp_path / "out.parquet")])
    assert "no dvc.yaml here" in str(stopped.value) and "--export" in str(stopped.value)
