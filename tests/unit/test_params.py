"""params.yaml, read one typed section at a time: every section of the committed file reads,
and a missing, misspelt, mistyped or out-of-range key stops a stage with one line naming it.
The file is laid out as DVC writes it back after `dvc exp run -S`, so that `-S` changes one line."""

from __future__ import annotations

import dataclasses
import difflib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import params
from pipeline.params import (
    DownloadParams,
    LivePromoteParams,
    ParamsError,
    PromoteParams,
    Section,
    SplitParams,
    TrainParams,
    duration_seconds,
)
from tests.support.paths import PARAMS_FILE, REPO_ROOT

# Top-level sections; a nested one (promote.live) is read whole by its parent.
SECTIONS = [section for section in Section.__subclasses__() if "." not in section.name]


def test_every_section_of_params_yaml_is_read_whole_by_its_object():
    committed = yaml.safe_load(PARAMS_FILE.read_text())
    assert {section.name for section in SECTIONS} == set(committed) - {"classes"}
    for section in SECTIONS:
        assert section.load(PARAMS_FILE).to_dict() == committed[section.name]
    assert params.classes(PARAMS_FILE) == committed["classes"]


def test_a_section_is_frozen():
    train = TrainParams.load(PARAMS_FILE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        train.seed = 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sed": 42}, "split.sed is not a parameter (did you mean seed?)"),
        ({"shuffle": True}, "split.shuffle is not a parameter"),
        ({"seed": None}, "split.seed must be int, not None"),
        ({"seed": "42"}, "split.seed must be int, not '42'"),
        ({"val_ratio": True}, "split.val_ratio must be float, not True"),
        ({"val_ratio": 0.6, "test_ratio": 0.5}, "split ratios must be in [0, 1)"),
    ],
)
def test_a_wrong_key_or_value_is_named(change, message):
    values = {**yaml.safe_load(PARAMS_FILE.read_text())["split"], **change}
    with pytest.raises(ParamsError) as raised:
        SplitParams.from_dict(values)
    assert str(raised.value).startswith("params.yaml: ")
    assert message in str(raised.value)


@pytest.mark.parametrize("shard_photos", [0, -5])
def test_a_raw_shard_holds_at_least_one_photo(shard_photos):
    values = {**yaml.safe_load(PARAMS_FILE.read_text())["download"], "shard_photos": shard_photos}
    with pytest.raises(
        ParamsError, match=r"^params.yaml: download.shard_photos must be at least 1"
    ):
        DownloadParams.from_dict(values)


def test_a_missing_key_or_section_is_named():
    values = yaml.safe_load(PARAMS_FILE.read_text())["split"]
    del values["seed"]
    with pytest.raises(ParamsError, match=r"params.yaml: split.seed is missing"):
        SplitParams.from_dict(values)
    with pytest.raises(ParamsError, match="split must be a mapping"):
        SplitParams.from_dict(None)
    assert SplitParams.from_dict({"seed": 1, "val_ratio": 0, "test_ratio": 0}).val_ratio == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"window": "1 day"}, "promote.live.window: '1 day' is not a Prometheus duration"),
        ({"window": "0d"}, "promote.live.window: '0d' is not a Prometheus duration longer than 0"),
        ({"min_answers": 0}, "promote.live.min_answers must be at least 1, not 0"),
        ({"min_agreement": 1.5}, "promote.live.min_agreement is a share: between 0 and 1"),
        ({"error_tolerance": -0.1}, "promote.live.error_tolerance is a share"),
        ({"latency_tolerance": -1}, "promote.live.latency_tolerance must be 0 or more, not -1"),
        ({"production_accuracy": "yes"}, "promote.live.production_accuracy must be bool"),
        ({"windows": "1d"}, "promote.live.windows is not a parameter (did you mean window?)"),
    ],
)
def test_the_live_gate_of_promote_names_a_wrong_key_or_value(change, message):
    promote = yaml.safe_load(PARAMS_FILE.read_text())["promote"]
    values = {**promote, "live": {**promote["live"], **change}}
    with pytest.raises(ParamsError) as raised:
        PromoteParams.from_dict(values)
    assert str(raised.value).startswith(f"params.yaml: {message}"), str(raised.value)


def test_the_live_gate_of_promote_is_required_and_read_as_its_own_object():
    promote = yaml.safe_load(PARAMS_FILE.read_text())["promote"]
    assert isinstance(PromoteParams.load(PARAMS_FILE).live, LivePromoteParams)
    live = promote.pop("live")
    with pytest.raises(ParamsError, match=r"^params.yaml: promote.live is missing$"):
        PromoteParams.from_dict(promote)
    del live["min_feedback"]
    with pytest.raises(ParamsError, match=r"^params.yaml: promote.live.min_feedback is missing$"):
        PromoteParams.from_dict({**promote, "live": live})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1d", 86400), ("12h", 43200), ("1h30m", 5400), ("90s", 90), ("1w", 604800), ("500ms", 0.5)],
)
def test_windows_are_prometheus_durations(text, seconds):
    assert duration_seconds(text) == seconds


def test_no_stage_of_the_pipeline_depends_on_promotes_params():
    """promote is read after `dvc repro`: tuning it must not make the pipeline stale."""
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        for param in stage.get("params", []):
            assert not str(param).startswith("promote"), (name, param)


def test_a_stage_reading_a_misspelt_key_ends_in_one_line(tmp_path):
    committed = yaml.safe_load(PARAMS_FILE.read_text())
    committed["split"]["val_ration"] = committed["split"].pop("val_ratio")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(committed))
    (tmp_path / "raw").mkdir()
    (tmp_path / "catalogue.csv").write_text("label,filename,sha256\n")
    (tmp_path / "reviewed.csv").write_text("label,filename,sha256,source\n")
    result = subprocess.run(
        [
            *(sys.executable, "-m", "stages.split", "raw", "catalogue.csv"),
            *("reviewed.csv", "reviewed", "split.csv"),
        ],
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr == (
        "split failed: params.yaml: split.val_ration is not a parameter (did you mean val_ratio?)\n"
    )
    assert not (tmp_path / "split.csv").exists()


def test_dvcs_round_trip_of_params_yaml_changes_nothing():
    """DVC's YAML round trip (ruamel.yaml), as `dvc exp run -S` reads and writes params files."""
    from dvc.utils.serialize import dumps_yaml, parse_yaml_for_update

    text = PARAMS_FILE.read_text()
    assert dumps_yaml(parse_yaml_for_update(text, str(PARAMS_FILE))) == text


def set_params_as_dvc_does(path, *overrides: str) -> list[str]:
    """What `dvc exp run -S` does to a params file (dvc/repo/experiments/queue/base.py); the
    diff's changed lines."""
    from dvc.utils.hydra import apply_overrides

    before = path.read_text().splitlines()
    apply_overrides(str(path), list(overrides))
    diff = difflib.unified_diff(before, path.read_text().splitlines(), lineterm="", n=0)
    return [line for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---")]


def test_dvcs_set_param_rewrites_params_yaml_by_one_line(tmp_path):
    committed = yaml.safe_load(PARAMS_FILE.read_text())
    path = Path(shutil.copyfile(PARAMS_FILE, tmp_path / "params.yaml"))
    # -S rewrites every value of the file, not just the one set: the same value changes nothing.
    rate = committed["train"]["learning_rate"]
    assert set_params_as_dvc_does(path, f"train.learning_rate={rate}") == []
    changed = set_params_as_dvc_does(path, f"train.learning_rate={rate / 10}")
    assert [line[:1] for line in changed] == ["-", "+"], changed
    assert yaml.safe_load(path.read_text()) == {
        **committed,
        "train": {**committed["train"], "learning_rate": rate / 10},
    }
