"""The pipeline's library: what the stages of dvc.yaml share, and the `dandelion` command.

Each module is named for what it holds (params, catalogue, hashing, backbone, novelty, Keras
I/O, tracking, logs, the bento...). Importing any of them starts nothing and changes nothing:
TensorFlow, MLflow and BentoML are configured by the functions that use them.
"""
