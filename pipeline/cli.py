"""The ``dandelion`` command: what is run by hand around ``dvc repro``.

    dandelion promote    register the evaluated model if it beats the champion, and deploy
                         the champion's bento (pipeline/promote.py)

``python -m pipeline.cli promote`` is the same command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.params import pipeline_paths
from pipeline.stage import StageError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="dandelion", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    promote_command = commands.add_parser(
        "promote",
        help="after `dvc repro`: register the model if it beats the champion, deploy the champion",
    )
    promote_command.add_argument(
        "--different-test-set",
        action="store_true",
        help="promote a model tested on another test set than the champion's without comparing "
        "their metrics (recorded on the registered version)",
    )
    args = parser.parse_args(argv)
    if not Path("dvc.yaml").is_file():
        sys.exit(f"{args.command}: no dvc.yaml here: run it from the project's root")
    if args.command == "promote":
        from pipeline.promote import promote  # MLflow, DVC and BentoML: only when promoting

        try:
            print(promote(pipeline_paths(), args.different_test_set))
        except StageError as error:
            sys.exit(f"promote: {error}")


if __name__ == "__main__":
    main()
