"""The cold `dvc repro` of the real pipeline is quiet: no TensorFlow noise, a progress line per
epoch, and a timed last line for every stage."""

from __future__ import annotations

import re

import pytest

from tests.support.dvc import stages_run
from tests.support.logs import NOISE_MARKERS, TIMED_LAST_LINE


@pytest.mark.slow
def test_a_cold_repro_is_quiet_and_says_what_each_stage_did_and_took(reproduced):
    log = reproduced.cold.stdout + reproduced.cold.stderr
    assert not [m for m in NOISE_MARKERS if m in log], log
    ran = stages_run(reproduced.cold.stdout)
    assert {"download", "features", "train", "package"} <= set(ran), ran
    for stage in ran:
        assert re.search(TIMED_LAST_LINE.format(stage=stage), log, re.MULTILINE), stage
    assert re.search(r"^train: epoch 1/\d+: .*val_accuracy", log, re.MULTILINE)
