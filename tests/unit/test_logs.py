"""Stage logs: no TensorFlow start-up noise, progress lines for long steps, a timed last line,
and one line instead of a traceback for an expected failure."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.catalogue import CatalogueEntry
from pipeline.logs import START_UP_NOISE, Progress
from pipeline.params import DownloadParams, TrainParams
from pipeline.stage import StageError, summarised
from stages.download import download_dataset
from tests.support.http import serve_directory
from tests.support.images import make_image
from tests.support.logs import NOISE_MARKERS, START_UP_MARKERS, TIMED_LAST_LINE
from tests.support.paths import PARAMS_FILE, REPO_ROOT

# As TensorFlow 2.21's libraries write them while they load (timestamps and thread ids vary).
ABSL_PREFACE = (
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
)
ONEDNN = (
    b"I0000 00:00:1795714556.361912    1429 port.cc:153] oneDNN custom operations are on. You"
    b" may see slightly different numerical results due to floating-point round-off errors"
)
# Lines that must still show: a native error, a Python warning raised during the import.
NATIVE_ERROR = b"E0000 00:00:1795714566.553084    1429 cuda_dnn.cc:8310] Could not load library"

# A stand-in for TensorFlow whose import writes, on file descriptor 2 as native code does, the
# two start-up lines (twice, as TensorFlow's two libraries do) between lines that must pass.
FAKE_TENSORFLOW = f"""
import os, warnings
os.write(2, {ABSL_PREFACE!r} + b"\\n" + {ONEDNN!r} + b"\\n")
os.write(2, {NATIVE_ERROR!r} + b"\\n")
os.write(2, {ABSL_PREFACE!r} + b"\\n" + {ONEDNN!r} + b"\\n")
warnings.warn("a Python warning from the import")
LEVEL = os.environ.get("TF_CPP_MIN_LOG_LEVEL")
"""

QUIET_IMPORT = """
import sys
from pipeline.logs import import_tensorflow_quietly
import_tensorflow_quietly()
import tensorflow
print(tensorflow.LEVEL)
sys.stderr.write("after the import\\n")
"""


def run_python(code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    pythonpath = os.pathsep.join([str(cwd), str(REPO_ROOT)])
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": pythonpath, **env},
        capture_output=True,
        timeout=60,
    )


@pytest.fixture
def fake_tensorflow(tmp_path) -> Path:
    (tmp_path / "tensorflow.py").write_text(FAKE_TENSORFLOW)
    return tmp_path


def test_tensorflow_is_imported_without_its_two_start_up_lines(fake_tensorflow, monkeypatch):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    quiet = run_python(QUIET_IMPORT, fake_tensorflow)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == b"3\n"  # native logging at fatal only, set before the import
    lines = quiet.stderr.splitlines()
    assert lines[0] == NATIVE_ERROR, lines
    assert b"a Python warning from the import" in lines[1]
    assert lines[-1] == b"after the import"
    assert not [line for line in lines if START_UP_NOISE.match(line)]

    # The control: the same import, plain, shows both lines twice; a level the user chose stays.
    loud = run_python("import tensorflow", fake_tensorflow)
    assert loud.stderr.count(ABSL_PREFACE) == loud.stderr.count(b"oneDNN custom operations") == 2
    chosen = run_python(QUIET_IMPORT, fake_tensorflow, TF_CPP_MIN_LOG_LEVEL="1")
    assert chosen.stdout == b"1\n"


def test_a_failing_import_still_shows_its_traceback(tmp_path):
    (tmp_path / "tensorflow.py").write_text(
        f"import os\nos.write(2, {ABSL_PREFACE!r} + b'\\n')\nraise ImportError('no libcudart')\n"
    )
    failed = run_python(QUIET_IMPORT, tmp_path)
    assert failed.returncode != 0
    assert b"ImportError: no libcudart" in failed.stderr
    assert ABSL_PREFACE not in failed.stderr


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


def test_an_expected_failure_ends_the_stage_in_one_line_and_others_raise():
    @summarised("features")
    def main(argv=None) -> str:
        raise StageError("put mobilenet.h5 in /tmp/models/")

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == "features failed: put mobilenet.h5 in /tmp/models/"

    @summarised("features")
    def broken(argv=None) -> str:
        raise KeyError("a bug")

    with pytest.raises(KeyError):  # a bug keeps its traceback
        broken()


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
        settings = DownloadParams(
            base_url=url,
            min_per_class=1,
            workers=3,
            timeout_seconds=10,
            retries=0,
            backoff_seconds=0,
            shard_photos=5,
        )
        progress = Progress("download", len(entries), "files", every=0, log=lines.append)
        report = download_dataset(entries, settings, tmp_path / "raw", progress)
    assert report["classes"]["dandelion"]["ok"] == 11
    counts = [re.match(r"download: (\d+)/12 files \((\d+) failed\)", line) for line in lines]
    assert all(counts), lines
    done = [int(match[1]) for match in counts]
    assert done == list(range(2, 13))  # the first file is the probe, fetched alone
    assert [int(match[2]) for match in counts][-1] == 1


def test_training_prints_one_line_per_epoch_with_its_metrics():
    from pipeline.training import EpochLines, fit_head

    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(40, 8)).astype("float32"), np.arange(40) % 2
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())["train"]
    params.update(dropout=0.0, learning_rate=0.01, label_smoothing=0.0, epochs=3, batch_size=8)
    lines: list[str] = []
    _, history = fit_head(
        (features, labels),
        (features[:10], labels[:10]),
        TrainParams(**params),
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

    from pipeline.params import PromoteParams
    from pipeline.promote import promote_if_better

    mlflow.set_experiment("logs")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, activation="sigmoid")])
    with mlflow.start_run() as run:  # as train logs it
        mlflow.keras.log_model(model, name="model", pip_requirements=["keras"])
    capfd.readouterr()
    gate = dataclasses.replace(
        PromoteParams.load(PARAMS_FILE), metric="accuracy", min_improvement=0.0
    )
    version, promoted = promote_if_better(
        mlflow.MlflowClient(), "logs", run.info.run_id, "b1", {"accuracy": 0.9}, "0" * 64, gate, {}
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


# The control: TensorFlow imported plainly before the features stage's main() runs, as any
# script that imports it first would; its start-up lines are then printed, and its native
# level is the default.
RUN_FEATURES_AFTER_A_PLAIN_IMPORT = textwrap.dedent("""
    import sys
    import tensorflow
    from stages.features import main
    main(sys.argv[1:])
""")


@pytest.mark.slow
def test_a_stage_process_keeps_tensorflow_noise_out_and_ends_with_a_timed_line(tmp_path):
    """The features stage imports TensorFlow and runs the backbone under op determinism, which
    without the quiet import prints TensorFlow's start-up noise (absl preface, oneDNN). It
    builds no tf.data pipeline (each batch goes through predict_on_batch), so MapDataset's
    warning is not provoked here; the pipeline run's logs are checked for it too
    (tests/end_to_end/test_quiet_repro.py).

    Full tier: two TensorFlow processes take about 8 s, and the pipeline run's logs are checked
    there too. The fast tier checks the quiet import on a stand-in for TensorFlow."""
    workspace = tiny_workspace(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a new user runs it

    def features(*command: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, *command], cwd=workspace, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip

    # The control shows the noise (else this machine's TensorFlow prints none, and the check
    # below would prove nothing). Both run at once: each spends most of its time loading TF.
    control = features("-c", RUN_FEATURES_AFTER_A_PLAIN_IMPORT, "arrays", "features-control")
    stage = features("-m", "stages.features", "arrays", "features")
    (_, control_err), (out, err) = control.communicate(timeout=300), stage.communicate(timeout=300)
    assert control.returncode == 0, control_err
    assert [m for m in START_UP_MARKERS if m in control_err] == list(START_UP_MARKERS), control_err
    result = subprocess.CompletedProcess(stage.args, stage.returncode, out, err)
    assert result.returncode == 0, result.stderr
    assert not [m for m in NOISE_MARKERS if m in result.stderr + result.stdout], result.stderr
    lines = result.stdout.splitlines()
    assert "features: train: 6 photos x 3 views" in result.stdout
    assert "features: test: 6 photos x 2 views" in result.stdout
    assert re.match(TIMED_LAST_LINE.format(stage="features"), lines[-1]), lines
    assert lines[-1].startswith("features: 3 splits, 18 photos -> features in ")


def test_a_stage_process_still_shows_python_errors(tmp_path):
    """Only the start-up lines are dropped: a failing stage's traceback still arrives."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "stages.preprocess", "missing/split.csv", "raw", "arrays"],
        cwd=tiny_workspace(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert result.stderr.startswith("Traceback"), result.stderr
    assert "FileNotFoundError" in result.stderr and "missing/split.csv" in result.stderr
