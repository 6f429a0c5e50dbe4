"""The pipeline's stages: one module each, run by dvc.yaml as ``python -m stages.<name>``."""

import os

# Runs before any stage imports TensorFlow: keep its C++ start-up chatter out of stage logs
# (warnings and errors still show).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
