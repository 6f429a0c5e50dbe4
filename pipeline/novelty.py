"""Novelty, the model's "neither" signal: how far a photo's mid-level backbone activations
(``features.novelty_layers``, pooled) lie from the training photos'.

It is the squared Mahalanobis distance (Ledoit-Wolf covariance) in units of a threshold that
keeps ``train.neither_quantile`` of the val photos below it, so above 1 means "probably neither
class" (serving/contract.py NOVELTY). The saved model computes it beside the probability.
"""

from __future__ import annotations

import keras
import numpy as np
from sklearn.covariance import LedoitWolf

from pipeline.backbone import features_and_probes
from pipeline.params import ParamsError


def novelty_projection(
    train_features: np.ndarray, val_features: np.ndarray, quantile: float
) -> tuple[np.ndarray, np.ndarray]:
    """``(W, b)`` with ``||f @ W + b||^2`` = squared Mahalanobis distance of features ``f``
    from the training features, divided by the ``quantile`` of the val photos' distances."""
    if not 0.0 < quantile < 1.0:
        raise ParamsError(f"train.neither_quantile must be between 0 and 1, not {quantile}")
    train_features = train_features.astype(np.float64)
    mean = train_features.mean(axis=0)
    # Shrunk towards a scaled identity: about as many features as photos, so the sample
    # covariance alone is (nearly) singular.
    values, vectors = np.linalg.eigh(LedoitWolf().fit(train_features).covariance_)
    whitening = vectors / np.sqrt(values)
    distances = np.square((val_features - mean) @ whitening).sum(axis=1)
    whitening /= np.sqrt(np.quantile(distances, quantile))
    return whitening.astype(np.float32), (-mean @ whitening).astype(np.float32)


def with_novelty(
    backbone: keras.Model, head: keras.Model, projection, novelty_layers: list[str]
) -> keras.Model:
    """Pixels -> (N, 2): the head's probability and the photo's novelty (serving/contract.py)."""
    inputs = keras.Input(backbone.input_shape[1:])
    features, probes = features_and_probes(inputs, backbone, novelty_layers)
    whiten = keras.layers.Dense(probes.shape[-1], name="novelty_whitening")
    whitened = whiten(probes)
    whiten.set_weights(list(projection))
    squares = keras.layers.Multiply()([whitened, whitened])
    total = keras.layers.Dense(1, use_bias=False, name="novelty")
    novelty = total(squares)
    total.set_weights([np.ones((probes.shape[-1], 1), dtype=np.float32)])
    outputs = keras.layers.Concatenate()([head(features), novelty])
    return keras.Model(inputs, outputs, name="dandelion_vs_grass")
