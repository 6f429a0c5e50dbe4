"""What dvc.yaml runs: one module per stage, each ``python -m stages.<name> <paths>``.

A stage module is a thin ``main()``: its paths from the command line (declared once, in
dvc.yaml), its parameters from params.yaml, the work done by a pure function, its one-line
summary. What stages share lives in the library package ``pipeline``.
"""
