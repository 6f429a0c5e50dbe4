"""Confidence intervals of proportions, the one definition evaluate and the live-evidence gate
share: an accuracy measured on the test split and one measured from feedback are compared with
the same interval."""

from __future__ import annotations

from scipy.stats import binomtest


def wilson(successes: int, trials: int):
    """The 95 % Wilson score interval of ``successes`` in ``trials`` (``.low``, ``.high``)."""
    return binomtest(successes, trials).proportion_ci(method="wilson")
