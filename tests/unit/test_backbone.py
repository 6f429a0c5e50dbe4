"""The backbone's weights: a missing, wrong or unreadable file ends a stage in one line that
names the cause, and the README's offline section gives the file's source and sha256."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from pipeline import weights
from pipeline.hashing import sha256_of
from pipeline.splits import SPLITS
from pipeline.weights import (
    IMAGENET_WEIGHTS_FILE,
    IMAGENET_WEIGHTS_SHA256,
    IMAGENET_WEIGHTS_URL,
    BackboneUnavailable,
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


NOT_THE_WEIGHTS = b"not the weights"


def not_the_weights(path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(NOT_THE_WEIGHTS)


def a_directory(path) -> None:
    path.mkdir(parents=True)


def test_missing_weights_offline_end_the_stage_in_one_line_saying_where_they_go(tmp_path):
    keras_home = tmp_path / "keras-home"  # empty: nothing cached, and no internet
    path = keras_home / "models" / IMAGENET_WEIGHTS_FILE
    result = run_features_stage(tmp_path, keras_home)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == (
        f"features failed: the ImageNet backbone weights are missing: no {path}, and "
        f"downloading {IMAGENET_WEIGHTS_URL} failed (ConnectionRefusedError: Connection "
        f"refused); put that file there, sha256 {IMAGENET_WEIGHTS_SHA256} (README: Running "
        "offline or from a local mirror)"
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "features").exists()


@pytest.mark.parametrize(
    ("put", "words"),
    [
        (
            not_the_weights,
            "the ImageNet backbone weights {path} are not the expected file: sha256 "
            f"{sha256_of(NOT_THE_WEIGHTS)}, expected {IMAGENET_WEIGHTS_SHA256}; replace it "
            "(README: Running offline or from a local mirror)",
        ),
        (
            a_directory,
            "the ImageNet backbone weights {path} are unreadable (IsADirectoryError: Is a "
            "directory); replace the file (README: Running offline or from a local mirror)",
        ),
    ],
    ids=["wrong-sha256", "unreadable"],
)
def test_a_wrong_or_unreadable_weights_file_is_named_before_keras_reads_it(
    tmp_path, monkeypatch, put, words
):
    """The same one-line failure (a StageError: pipeline/stage.py) as a missing file's."""
    from pipeline.backbone import build_backbone

    path = tmp_path / "models" / IMAGENET_WEIGHTS_FILE
    put(path)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(BackboneUnavailable) as raised:
        build_backbone(32, "imagenet")
    assert str(raised.value) == words.format(path=path)


def test_weights_with_the_right_sha256_that_keras_cannot_read_are_named_unreadable(
    tmp_path, monkeypatch
):
    """The hash check and the read are two steps: a corrupt file given the pinned sha256
    (only here) reaches the read, which must fail as "unreadable" too."""
    from pipeline.backbone import build_backbone

    path = tmp_path / "models" / IMAGENET_WEIGHTS_FILE
    path.parent.mkdir()
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 500)  # an HDF5 signature, then nothing
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(weights, "IMAGENET_WEIGHTS_SHA256", weights.file_sha256(path))
    with pytest.raises(BackboneUnavailable) as raised:
        build_backbone(32, "imagenet")
    message = str(raised.value)
    assert message.startswith(f"the ImageNet backbone weights {path} are unreadable (")
    assert "\n" not in message


def test_a_missing_file_is_downloaded_into_keras_cache_and_checked(tmp_path, monkeypatch):
    """Online, as offline: the file goes where Keras looks, and its sha256 is checked (here of
    a stand-in served on loopback)."""
    from pipeline import backbone

    origin = tmp_path / "origin"
    origin.mkdir()
    (origin / IMAGENET_WEIGHTS_FILE).write_bytes(NOT_THE_WEIGHTS)
    keras_home = tmp_path / "keras-home"  # not there yet: Keras alone would fall back to /tmp
    monkeypatch.setenv("KERAS_HOME", str(keras_home))
    with serve_directory(origin) as url:
        monkeypatch.setattr(backbone, "IMAGENET_WEIGHTS_URL", f"{url}/{IMAGENET_WEIGHTS_FILE}")
        with pytest.raises(BackboneUnavailable, match="are not the expected file: sha256 "):
            backbone.imagenet_weights()
        monkeypatch.setattr(weights, "IMAGENET_WEIGHTS_SHA256", sha256_of(NOT_THE_WEIGHTS))
        path = backbone.imagenet_weights()
    assert path == keras_home / "models" / IMAGENET_WEIGHTS_FILE
    assert path.read_bytes() == NOT_THE_WEIGHTS


def test_the_readme_gives_the_weights_source_and_sha256():
    """The README's offline section is a copy of pipeline/weights.py's URL and sha256 (rendered
    Markdown has no place to say so): this test keeps the two in step."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("## Running offline or from a local mirror") :]
    assert re.findall(r"https://storage\.googleapis\.com/\S+\.h5", section) == [
        IMAGENET_WEIGHTS_URL
    ]
    assert re.findall(r"\b[0-9a-f]{64}\b", section) == [IMAGENET_WEIGHTS_SHA256]
