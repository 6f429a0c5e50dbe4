"""The pipeline's stages: one module each, run by dvc.yaml as ``python -m stages.<name>``."""

import os
import sys

from stages import logs

# Runs before any stage imports TensorFlow: keep its C++ start-up chatter (info and warning
# lines) out of stage logs; errors still show. TensorFlow's own logging honours it; the lines
# that come through Abseil instead are dropped by stages/logs.py.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Python sets argv[0] to "-m" while it locates the module of `python -m stages.<name>`, which
# imports this package first: a stage's own process, not a test or a notebook importing it.
if sys.argv[:1] == ["-m"]:
    logs.start_stage_process()
