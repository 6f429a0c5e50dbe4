"""Stage logs: no TensorFlow C++ noise, progress lines for long steps, a timed last line."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages.download import CatalogueEntry, DownloadSettings, download_dataset
from stages.logs import DRAIN_WAIT_SECONDS, NATIVE_NOISE, Progress, pass_through, summarised
from tests.support.http import serve_directory
from tests.support.images import make_image
from tests.support.logs import NOISE_MARKERS, TIMED_LAST_LINE
from tests.support.paths import REPO_ROOT

# As TensorFlow 2.21 writes them (timestamps and thread ids vary).
ABSL_PREFACE = (
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
)
ONEDNN = (
    b"I0000 00:00:1795714556.361912    1429 port.cc:153] oneDNN custom operations are on. You"
    b" may see slightly different numerical results due to floating-point round-off errors"
)
MAP_DATASET = (
    b"E0000 00:00:1795714566.553084    1429 node_def_util.cc:682] NodeDef mentions attribute"
    b" use_unbounded_threadpool which is not in the op definition: Op<name=MapDataset;"
    b" signature=input_dataset:variant, other_arguments: -> handle:variant"
)


def test_the_filter_drops_exactly_the_known_native_lines():
    kept = [
        b"E0000 00:00:1795714566.553084    1429 node_def_util.cc:682] NodeDef missing attr 'T'\n",
        b"E0000 00:00:1795714566.553084    1429 cuda_dnn.cc:8310] Could not load library\n",
        b"W0000 00:00:1795714556.361912    1429 port.cc:153] oneDNN is off\n",
        b'  File "stages/train.py", line 12, in main\n',
        b"ValueError: the cached features were not computed by this backbone\n",
        b"features failed: the ImageNet MobileNetV2 weights are not in /tmp/kh/models/\n",
        b"last line without a newline",
    ]
    noise = [line + b"\n" for line in (ABSL_PREFACE, ONEDNN, MAP_DATASET)]
    source = io.BytesIO(b"".join([noise[0], noise[1], kept[0], noise[2], *kept[1:]]))
    target = io.BytesIO()
    pass_through(source, target)
    assert target.getvalue() == b"".join(kept)
    assert all(NATIVE_NOISE.match(line) for line in noise)


def test_progress_prints_counts_at_most_every_interval():
    lines: list[str] = []
    every_step = Progress("features", 3, "photo views", every=0, log=lines.append)
    for done in (1, 2, 3):
        every_step.update(done, "train: plain")
    assert [re.sub(r"[\d.]+ s$", "T s", line) for line in lines] == [
        f"features: {done}/3 photo views (train: plain), T s" for done in (1, 2, 3)
    ]
    lines.clear()
    seldom = Progress("features", 3, "photo views", every=3600, log=lines.append)
    for done in (1, 2, 3):
        seldom.update(done)
    assert lines == []  # a step shorter than the interval stays quiet


def test_summarised_main_ends_with_what_it_did_and_its_time(capsys):
    @summarised("export")
    def main(argv=None) -> str:
        print("export: working")
        return "data/model/classifier.keras -> data/export (openvino)"

    assert main() == "data/model/classifier.keras -> data/export (openvino)"
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "export: working"
    assert re.match(TIMED_LAST_LINE.format(stage="export"), lines[-1]), lines
    assert lines[-1].startswith("export: data/model/classifier.keras -> data/export (openvino)")


def test_download_reports_progress_with_counts(tmp_path):
    mirror = tmp_path / "mirror"
    entries = [CatalogueEntry("dandelion", f"{i:03}.jpg", "") for i in range(12)]
    for entry in entries:
        path = mirror / entry.relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(make_image(seed=int(entry.filename[:3])))
    (mirror / entries[5].relative_path).write_bytes(b"not an image")
    lines: list[str] = []
    with serve_directory(mirror) as url:
        settings = DownloadSettings(base_url=url, min_per_class=1, workers=3, retries=0)
        progress = Progress("download", len(entries), "files", every=0, log=lines.append)
        report = download_dataset(entries, settings, tmp_path / "raw", progress)
    assert report["classes"]["dandelion"]["ok"] == 11
    counts = [re.match(r"download: (\d+)/12 files \((\d+) failed\)", line) for line in lines]
    assert all(counts), lines
    done = [int(match[1]) for match in counts]
    assert done == list(range(2, 13))  # the first file is the probe, fetched alone
    assert [int(match[2]) for match in counts][-1] == 1


def test_training_prints_one_line_per_epoch_with_its_metrics():
    from stages.train import EpochLines, fit_head

    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(40, 8)).astype("float32"), np.arange(40) % 2
    params = {"dropout": 0.0, "learning_rate": 0.01, "label_smoothing": 0.0}
    lines: list[str] = []
    _, history = fit_head(
        (features, labels),
        (features[:10], labels[:10]),
        {**params, "epochs": 3, "batch_size": 8},
        [EpochLines(log=lines.append)],
    )
    assert len(lines) == len(history.epoch) == 3
    for epoch, line in enumerate(lines, 1):
        match = re.fullmatch(
            rf"train: epoch {epoch}/3: accuracy ([\d.]+), loss ([\d.]+), "
            r"val_accuracy [\d.]+, val_loss ([\d.]+) \([\d.]+ s\)",
            line,
        )
        assert match, line
        assert float(match[2]) == pytest.approx(history.history["loss"][epoch - 1], abs=1e-4)


def test_registering_the_trained_model_prints_no_misleading_mlflow_warning(mlflow_store, capfd):
    import keras
    import mlflow

    from stages.promote import promote_if_better

    mlflow.set_experiment("logs")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, activation="sigmoid")])
    with mlflow.start_run() as run:  # as train logs it
        mlflow.keras.log_model(model, name="model", pip_requirements=["keras"])
    capfd.readouterr()
    version, promoted = promote_if_better(
        mlflow.MlflowClient(), "logs", run.info.run_id, "b1", {"accuracy": 0.9}, "accuracy", 0, {}
    )
    assert promoted and version.run_id == run.info.run_id
    err = capfd.readouterr().err
    assert "Created version '1'" in err  # MLflow's own stderr is captured here
    assert "has no artifacts" not in err and "WARNING" not in err, err


def tiny_workspace(root: Path) -> Path:
    """params.yaml (random-init backbone, 32 px) and preprocess-like arrays of 6 photos/split."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["features"].update(weights="none", batch_size=4, augment_copies=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    rng = np.random.default_rng(0)
    arrays = root / "arrays"
    arrays.mkdir()
    for split in ("train", "val", "test"):
        np.savez(
            arrays / f"{split}.npz",
            images=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
            labels=np.arange(6) % 2,
            paths=np.array([f"data/raw/x/{split}{i}.jpg" for i in range(6)]),
        )
    return root


# Runs the features stage's main() as `python -m` would, but from `-c`: stages/__init__.py
# starts its stderr filter only for `python -m stages.<name>`.
RUN_FEATURES_UNFILTERED = """
import runpy, sys
sys.argv = ["stages.features", *sys.argv[1:]]
runpy.run_module("stages.features", run_name="__main__")
"""


@pytest.mark.slow
def test_a_stage_process_keeps_tensorflow_noise_out_and_ends_with_a_timed_line(tmp_path):
    """The features stage imports TensorFlow and runs predict() under op determinism, which
    without the filter prints all three kinds of noise (absl preface, oneDNN, MapDataset).

    Full tier: two TensorFlow processes take about 8 s, and the pipeline run's logs are checked
    there too. The fast tier checks the filter on those exact lines and its process plumbing."""
    workspace = tiny_workspace(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a new user runs it

    def features(*command: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, *command], cwd=workspace, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip

    # The control: the same stage run without `-m` starts no filter, and the noise is there
    # (else this machine's TensorFlow prints none, and the check below would prove nothing).
    # Both run at once: each spends most of its time loading TensorFlow.
    control = features("-c", RUN_FEATURES_UNFILTERED, "arrays", "features-unfiltered")
    stage = features("-m", "stages.features", "arrays", "features")
    (_, control_err), (out, err) = control.communicate(timeout=300), stage.communicate(timeout=300)
    assert control.returncode == 0, control_err
    assert [m for m in NOISE_MARKERS if m in control_err], control_err
    result = subprocess.CompletedProcess(stage.args, stage.returncode, out, err)
    assert result.returncode == 0, result.stderr
    assert not [m for m in NOISE_MARKERS if m in result.stderr + result.stdout], result.stderr
    lines = result.stdout.splitlines()
    assert "features: train: 6 photos x 3 views" in result.stdout
    assert "features: test: 6 photos x 2 views" in result.stdout
    assert re.match(TIMED_LAST_LINE.format(stage="features"), lines[-1]), lines
    assert lines[-1].startswith("features: 3 splits, 18 photos -> features in ")


def test_a_stage_process_still_shows_python_errors(tmp_path):
    """The filter drops only its lines: a failing stage's traceback still arrives."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "stages.preprocess", "missing/split.csv", "arrays"],
        cwd=tiny_workspace(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert result.stderr.startswith("Traceback"), result.stderr
    assert "FileNotFoundError" in result.stderr and "missing/split.csv" in result.stderr


# A library that keeps its own copy of stderr, as vl-convert's JavaScript runtime does in the
# plots stage: a line through the copy while the filter runs, and one from an exit handler that
# runs after the filter has been taken down (atexit runs handlers last registered first).
KEEPS_A_COPY_OF_STDERR = f"""
import atexit, os
atexit.register(lambda: os.write(copy, b"late line\\n"))
from stages import logs
logs.drop_native_noise()
copy = os.dup(2)
os.write(copy, {ABSL_PREFACE!r} + b"\\nown line\\n")
"""


def test_a_library_holding_a_copy_of_stderr_does_not_hold_up_the_stage_s_exit():
    result = subprocess.run(
        [sys.executable, "-c", KEEPS_A_COPY_OF_STDERR],
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        capture_output=True,
        # Not a measure of speed: past this, the stage sat out the filter's whole wait.
        timeout=DRAIN_WAIT_SECONDS / 2,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == b"own line\nlate line\n"
