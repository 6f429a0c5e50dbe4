"""Helpers shared by the tests and the benchmarks, one module per concern.

Import each helper from its module (``from tests.support.dvc import dvc``): this package
re-exports nothing. Only ``needs`` (what a test needs, skipped or failed with pytest) and
``stub_service`` (the service's front on a stub engine) are for tests alone.
"""
