"""Helpers shared by the tests and the benchmarks, one module per concern (no pytest here).

Import each helper from its module (``from support.dvc import dvc``): this package
re-exports nothing.
"""
