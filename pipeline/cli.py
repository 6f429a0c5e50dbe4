"""The ``dandelion`` command: what is run by hand around ``dvc repro``.

    dandelion promote    register the evaluated model if it beats the champion, and deploy
                         the champion's bento (pipeline/promote.py)
    dandelion review     list the feedback waiting for review, draw it as a contact sheet,
                         accept it into data/reviewed (DVC) or reject it (pipeline/review.py)
    dandelion replay     score the photos a prediction log kept again, with a bento or an
                         export, beside the logged answers (pipeline/replay.py)
    dandelion predict-batch
                         the service's answer for every photo of a directory or an
                         s3://bucket/prefix, into a Parquet file; on Ray when RAY_ADDRESS is
                         set (pipeline/batch_predict.py)
    dandelion secrets    generate the stack's missing credentials into .env and .secrets/
                         (pipeline/secrets.py); never replaces one that is there

``python -m pipeline.cli promote`` is the same command.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.params import pipeline_paths
from pipeline.stage import StageError


def review_parser(commands) -> None:
    review = commands.add_parser(
        "review", help="the feedback waiting for review: list, sheet, accept, reject"
    )
    actions = review.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="the pending feedback, one line each")
    sheet = actions.add_parser("sheet", help="a contact sheet (PNG) of the pending feedback")
    sheet.add_argument("out", type=Path, metavar="OUT.png")
    for name, verb in (("accept", "accept into data/reviewed"), ("reject", "reject")):
        action = actions.add_parser(name, help=f"{verb} the feedback of these ids")
        action.add_argument("ids", nargs="*", metavar="ID", help="as `review list` shows it")
        action.add_argument("--all", action="store_true", help="every pending feedback")
        if name == "accept":
            action.add_argument(
                "--as", dest="as_label", metavar="LABEL", help="accept with this class instead"
            )


def review(args: argparse.Namespace) -> str:
    from pipeline import review  # DVC, boto3 and Pillow: only when reviewing

    root = Path.cwd()
    if args.action in ("accept", "reject"):
        review.check_choice(args.ids, args.all)
    feedback = review.open_feedback()
    if args.action == "list":
        lines = review.pending_lines(feedback)
        return "\n".join([*lines, f"review: {len(lines)} pending in {feedback.store}"])
    if args.action == "sheet":
        shown = review.write_sheet(feedback, args.out, root)
        return f"review: {shown} pending in {feedback.store}" + (
            f", drawn in {args.out}" if shown else ": no sheet written"
        )
    keys = review.chosen(feedback, args.ids, args.all)
    if args.action == "reject":
        return "\n".join([*review.reject(feedback, keys), f"review: {len(keys)} rejected"])
    messages, new = review.accept(feedback, keys, args.as_label, root)
    reviewed = review.Reviewed.of(root)
    summary = f"review: {new} accepted into {reviewed.directory}"
    if new:
        summary += f"; to keep them: {reviewed.commit_hint()}"
    return "\n".join([*messages, summary])


def live_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``args.live_source``: where `promote --live` reads its evidence, or None; a usage
    error when the options do not go together."""
    from pipeline.live_evidence import (
        DEFAULT_PROMETHEUS_URL,
        LOG,
        PROMETHEUS,
        PROMETHEUS_URL_ENV,
        LiveSource,
    )

    if args.live != LOG and args.log:
        parser.error("--log DIR_OR_S3 is the source of --live log")
    if args.live != PROMETHEUS and args.prometheus_url:
        parser.error("--prometheus-url is the source of --live prometheus")
    if args.live == LOG and not args.log:
        parser.error("--live log needs --log DIR_OR_S3, the prediction log")
    location = (
        args.log
        if args.live == LOG
        else args.prometheus_url or os.environ.get(PROMETHEUS_URL_ENV) or DEFAULT_PROMETHEUS_URL
    )
    args.live_source = LiveSource(args.live, location) if args.live else None


def replay_parser(commands) -> None:
    replay = commands.add_parser(
        "replay", help="score a prediction log's kept photos again with a bento or an export"
    )
    replay.add_argument("log", metavar="LOG", help="the log's directory, or s3://bucket/prefix")
    replay.add_argument(
        "--with",
        dest="model",
        type=Path,
        required=True,
        metavar="BENTO_OR_EXPORT",
        help="a bento archive (.bento), or an export directory (data/export)",
    )
    replay.add_argument(
        "--out", type=Path, default=Path("replay.csv"), help="one row per logged record (CSV)"
    )
    replay.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="with an export: the params.yaml its decision rule and input size come from",
    )


def replay(args: argparse.Namespace) -> None:
    from pipeline.replay import replay  # an engine and boto3: only when replaying

    try:
        print(replay(args.log, args.model, args.out, args.params))
    except StageError as error:
        sys.exit(f"replay: {error}")


def predict_batch_parser(commands) -> None:
    command = commands.add_parser(
        "predict-batch",
        help="answer every photo of a directory or bucket as POST /predict would (Parquet)",
    )
    command.add_argument("source", metavar="SOURCE", help="a directory, or s3://bucket/prefix")
    command.add_argument(
        "--out",
        required=True,
        metavar="OUT",
        help="the Parquet file to write (a path or s3:// URL); OUT.parts/ holds the finished "
        "chunks until it is written, and a rerun resumes from them",
    )
    command.add_argument(
        "--export",
        type=Path,
        help="the export directory to score with (default: dvc.yaml's export_dir, here)",
    )
    command.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="the params.yaml its decision rule, input size, upload limits and chunk size "
        "come from (default: %(default)s)",
    )


def predict_batch(args: argparse.Namespace) -> None:
    from pipeline.batch_predict import predict_batch  # an engine, pyarrow, fsspec
    from pipeline.cluster import ClusterError, ray_address

    if not args.params.is_file():
        sys.exit(f"predict-batch: no {args.params}: run it in the project's root, or give --params")
    if args.export is None:
        if not Path("dvc.yaml").is_file():
            sys.exit(
                "predict-batch: no dvc.yaml here: run it in the project's root or give --export"
            )
        args.export = Path(pipeline_paths()["export_dir"])
    try:
        print(predict_batch(args.source, args.out, args.export, args.params, ray_address()))
    # A cluster that cannot be used, a store that refuses or fails: said in one line.
    except (StageError, ClusterError, OSError) as error:
        sys.exit(f"predict-batch: {error}")


def secrets_parser(commands) -> None:
    from pipeline.secrets import DEFAULT_HOSTNAME, ENV_FILE, SECRETS_DIR

    command = commands.add_parser(
        "secrets",
        help="fill in the compose stack's missing credentials (.env, .secrets/) with random ones",
    )
    command.add_argument("--env-file", type=Path, default=ENV_FILE, help="default: %(default)s")
    command.add_argument(
        "--secrets-dir", type=Path, default=SECRETS_DIR, help="default: %(default)s"
    )
    command.add_argument(
        "--hostname",
        default=DEFAULT_HOSTNAME,
        help="the name the proxy's self-signed TLS certificate is for, besides localhost and "
        "127.0.0.1 (default: %(default)s)",
    )


def write_secrets(args: argparse.Namespace) -> None:
    from pipeline.secrets import generate

    try:
        print("\n".join(generate(args.env_file, args.secrets_dir, args.hostname).lines()))
    except StageError as error:
        sys.exit(f"secrets: {error}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="dandelion", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # The sources' names, defined with the readers (NumPy, SciPy, requests: no MLflow yet).
    from pipeline.live_evidence import DEFAULT_PROMETHEUS_URL, LOG, PROMETHEUS, PROMETHEUS_URL_ENV

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
    promote_command.add_argument(
        "--live",
        choices=(PROMETHEUS, LOG),
        help="also require live evidence that the model, served as challenger beside the "
        "champion, passes promote.live in params.yaml (docs/pipeline.md, Promotion on live "
        "evidence), read from Prometheus or from the prediction log",
    )
    promote_command.add_argument(
        "--prometheus-url",
        metavar="URL",
        help=f"the Prometheus that scrapes the service (default: ${PROMETHEUS_URL_ENV}, else "
        f"{DEFAULT_PROMETHEUS_URL})",
    )
    promote_command.add_argument(
        "--log",
        metavar="DIR_OR_S3",
        help="the prediction log: its directory, or s3://bucket/prefix (for --live log)",
    )
    review_parser(commands)
    replay_parser(commands)
    predict_batch_parser(commands)
    secrets_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "promote":
        live_options(promote_command, args)
    if args.command == "replay":  # from anywhere: it reads no dvc.yaml
        return replay(args)
    if args.command == "predict-batch":  # from anywhere: its paths are arguments
        return predict_batch(args)
    if args.command == "secrets":  # paths of its own (defaults relative to here)
        return write_secrets(args)
    if not Path("dvc.yaml").is_file():
        sys.exit(f"{args.command}: no dvc.yaml here: run it from the project's root")
    try:
        if args.command == "promote":
            from pipeline.promote import promote  # MLflow, DVC and BentoML: only when promoting

            print(promote(pipeline_paths(), args.different_test_set, args.live_source))
        else:
            print(review(args))
    except StageError as error:
        sys.exit(f"{args.command}: {error}")


if __name__ == "__main__":
    main()
