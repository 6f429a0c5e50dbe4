"""The backbone's weights: a missing, unreadable or wrong file ends a stage in one line that
names the cause, and the README's offline section gives the file's source and tensor digest."""

from __future__ import annotations

import hashlib
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import weights
from pipeline.hashing import file_sha256
from pipeline.splits import SPLITS
from pipeline.weights import (
    IMAGENET_WEIGHTS_DIGEST,
    IMAGENET_WEIGHTS_FILE,
    IMAGENET_WEIGHTS_URL,
    BackboneUnavailable,
    weights_digest,
)
from tests.support.http import serve_directory
from tests.support.paths import REPO_ROOT


def run_features_stage(tmp_path, keras_home) -> subprocess.CompletedProcess:
    """The features stage on tiny arrays, offline (its proxy is a port nothing listens on)."""
    arrays = tmp_path / "arrays"
    arrays.mkdir()
    for split in SPLITS:
        np.savez(
            arrays / f"{split}.npz",
            images=np.zeros((2, 32, 32, 3), np.uint8),
            labels=np.zeros(2, np.int64),
            paths=np.array(["a.jpg", "b.jpg"]),
        )
    shutil.copyfile(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{closed.getsockname()[1]}"
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "KERAS_HOME": str(keras_home),
        "HTTPS_PROXY": proxy,
        "HTTP_PROXY": proxy,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": str(REPO_ROOT),
    }
    return subprocess.run(
        [sys.executable, "-m", "stages.features", str(arrays), str(tmp_path / "features")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_missing_weights_offline_end_the_stage_in_one_line_saying_where_they_go(tmp_path):
    keras_home = tmp_path / "keras-home"  # empty: nothing cached, and no internet
    path = keras_home / "models" / IMAGENET_WEIGHTS_FILE
    result = run_features_stage(tmp_path, keras_home)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == (
        f"features failed: the ImageNet backbone weights are missing: no {path}, and "
        f"downloading {IMAGENET_WEIGHTS_URL} failed (ConnectionRefusedError: Connection "
        "refused); put that file there (README: Running offline or from a local mirror)"
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "features").exists()


def save_legacy_h5(model, path: Path) -> Path:
    """``model``'s weights in Keras' legacy HDF5 weights format, the ImageNet file's format
    (Keras 3's ``save_weights`` only writes its own ``.weights.h5``)."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, model)
    return path


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Weights files shaped like the ImageNet one (alpha 1.0, no top), each with the digest of
    the model it was saved from: two random initialisations, and an alpha-0.5 backbone."""
    import keras

    folder = tmp_path_factory.mktemp("weights")
    files = {}
    for name, seed, alpha in [("one", 1, 1.0), ("another", 2, 1.0), ("alpha-0.5", 1, 0.5)]:
        keras.utils.set_random_seed(seed)
        model = keras.applications.MobileNetV2(
            input_shape=(32, 32, 3), include_top=False, weights=None, alpha=alpha
        )
        path = save_legacy_h5(model, folder / f"{name}.h5")
        files[name] = (path, weights_digest(w.numpy() for w in model.weights))
    return files


def put_weights(keras_home: Path, source: Path) -> Path:
    path = keras_home / "models" / IMAGENET_WEIGHTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, path)
    return path


def test_the_pinned_weights_load_and_pass_at_any_image_size(tmp_path, monkeypatch, stand_ins):
    """The check is on the loaded tensors, which do not depend on the input size."""
    from pipeline.backbone import build_backbone

    source, digest = stand_ins["one"]
    put_weights(tmp_path, source)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(weights, "IMAGENET_WEIGHTS_DIGEST", digest)
    for image_size in (32, 64):
        backbone = build_backbone(image_size, "imagenet")
        assert weights_digest(w.numpy() for w in backbone.weights) == digest


def test_other_weights_are_named_with_both_digests_and_the_files_sha256(
    tmp_path, monkeypatch, stand_ins
):
    from pipeline.backbone import build_backbone

    path = put_weights(tmp_path, stand_ins["another"][0])
    found, expected = stand_ins["another"][1], stand_ins["one"][1]
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(weights, "IMAGENET_WEIGHTS_DIGEST", expected)
    with pytest.raises(BackboneUnavailable) as raised:
        build_backbone(32, "imagenet")
    assert str(raised.value) == (
        f"the ImageNet backbone weights {path} are not the expected weights: tensor digest "
        f"{found[:16]}..., expected {expected[:16]}... (file sha256 {file_sha256(path)}); "
        "replace the file (README: Running offline or from a local mirror)"
    )


def truncated(path: Path, stand_ins) -> None:
    data = stand_ins["one"][0].read_bytes()
    path.write_bytes(data[: len(data) // 2])


def not_hdf5(path: Path, stand_ins) -> None:
    path.write_bytes(b"not the weights")


def another_architecture(path: Path, stand_ins) -> None:
    shutil.copyfile(stand_ins["alpha-0.5"][0], path)


def a_directory(path: Path, stand_ins) -> None:
    path.mkdir()


@pytest.mark.parametrize(
    ("put", "cause"),
    [
        (truncated, "OSError: Unable to synchronously open file (truncated file: eof = "),
        (not_hdf5, "OSError: Unable to synchronously open file (file signature not found)"),
        (another_architecture, "ValueError: Shape mismatch in layer #0 (named Conv1)"),
        (a_directory, "IsADirectoryError: Is a directory"),
    ],
    ids=["truncated", "not-hdf5", "alpha-0.5", "directory"],
)
def test_weights_keras_cannot_load_are_named_unreadable_with_the_root_cause(
    tmp_path, monkeypatch, stand_ins, put, cause
):
    """The same one-line failure (a StageError: pipeline/stage.py) as a missing file's."""
    from pipeline.backbone import build_backbone

    path = tmp_path / "models" / IMAGENET_WEIGHTS_FILE
    path.parent.mkdir()
    put(path, stand_ins)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(BackboneUnavailable) as raised:
        build_backbone(32, "imagenet")
    message = str(raised.value)
    assert message.startswith(f"the ImageNet backbone weights {path} are unreadable ({cause}")
    assert message.endswith("); replace the file (README: Running offline or from a local mirror)")
    assert "\n" not in message


def test_the_digest_is_shapes_and_little_endian_float32_values_in_order():
    """As pipeline/weights.py documents it, so it can be recomputed without this code."""
    tensors = [np.arange(6, dtype=">f8").reshape(2, 3), np.ones(1, np.float32)]
    expected = hashlib.sha256(
        b"(2, 3)" + np.arange(6, dtype="<f4").tobytes() + b"(1,)" + np.ones(1, "<f4").tobytes()
    ).hexdigest()
    assert weights_digest(tensors) == expected
    assert weights_digest(tensors[::-1]) != expected


def test_a_missing_file_is_downloaded_into_keras_cache_and_checked(
    tmp_path, monkeypatch, stand_ins
):
    """Online, as offline: the file goes where Keras looks, and its tensors are checked (here of
    a stand-in served on loopback)."""
    from pipeline import backbone

    source, digest = stand_ins["one"]
    origin = tmp_path / "origin"
    origin.mkdir()
    shutil.copyfile(source, origin / IMAGENET_WEIGHTS_FILE)
    keras_home = tmp_path / "keras-home"  # not there yet: Keras alone would fall back to /tmp
    monkeypatch.setenv("KERAS_HOME", str(keras_home))
    with serve_directory(origin) as url:
        monkeypatch.setattr(backbone, "IMAGENET_WEIGHTS_URL", f"{url}/{IMAGENET_WEIGHTS_FILE}")
        with pytest.raises(BackboneUnavailable, match="are not the expected weights: tensor "):
            backbone.build_backbone(32, "imagenet")
    monkeypatch.setattr(weights, "IMAGENET_WEIGHTS_DIGEST", digest)
    backbone.build_backbone(32, "imagenet")  # the downloaded copy, now the pinned weights
    path = keras_home / "models" / IMAGENET_WEIGHTS_FILE
    assert path.read_bytes() == source.read_bytes()


def test_the_readme_gives_the_weights_source_and_tensor_digest():
    """The README's offline section is a copy of pipeline/weights.py's URL and digest (rendered
    Markdown has no place to say so): this test keeps the two in step. The other sha256 there is
    the offline copy's file sha256, information only."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## Running offline or from a local mirror") :]
    assert re.findall(r"https://storage\.googleapis\.com/\S+\.h5", section) == [
        IMAGENET_WEIGHTS_URL
    ]
    assert re.findall(r"tensor digest\s+`([0-9a-f]{64})`", section) == [IMAGENET_WEIGHTS_DIGEST]
