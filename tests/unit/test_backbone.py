"""The backbone's weights: without them and without internet, a stage ends in one line."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys

import numpy as np

from pipeline.splits import SPLITS
from pipeline.weights import IMAGENET_WEIGHTS_FILE
from tests.support.paths import REPO_ROOT


def test_missing_weights_offline_end_the_stage_in_one_line_naming_where_to_put_them(tmp_path):
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
    with socket.socket() as closed:  # a port nothing listens on: the proxy, so no internet
        closed.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{closed.getsockname()[1]}"
    keras_home = tmp_path / "keras-home"  # empty: no cached weights
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "KERAS_HOME": str(keras_home),
        "HTTPS_PROXY": proxy,
        "HTTP_PROXY": proxy,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": str(REPO_ROOT),
    }
    result = subprocess.run(
        [sys.executable, "-m", "stages.features", str(arrays), str(tmp_path / "features")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("features failed: the ImageNet MobileNetV2 weights are not in ")
    assert f"{keras_home / 'models'}/" in last_line and IMAGENET_WEIGHTS_FILE in last_line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "features").exists()
