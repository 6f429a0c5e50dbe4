"""Markdown model report of the workspace against a base revision, for CML to post.

    python .github/scripts/report.py origin/main report/report.md
    cml comment update --watermark-title="model report" report/report.md

Tables come from `dvc metrics diff` and `dvc params diff`; the plots are the named plots of
dvc.yaml as `dvc plots diff` renders them (base and workspace side by side), turned into
PNG files next to the report so CML can upload them (drawn as the plots stage draws the
README's, pipeline/plots.py). On GitHub Actions the script also sets the step output
``metrics_changed`` (true/false) for the retrain workflow.

``--data-source public`` (set by the cml workflow when .github/scripts/pull.sh found no MinIO
secrets) adds a note that nothing came from the team's remote: every stage was rebuilt from
the public data URL.

When the production test set (reviewed photos held out, pipeline/splits.py) changed size, a
note says how many photos it held at the base and now: it grows as photos are accepted, so
its before and after are not on the same photos, while ``test.*`` always are.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from pipeline.catalogue import data_url
from pipeline.params import DownloadParams
from pipeline.plots import PlotsError, file_name, plot_specs, png
from pipeline.splits import PRODUCTION_TEST, TEST

# Named plots of dvc.yaml shown in the report.
PLOTS = ("Confusion matrix", "Learning curves (loss)", "Learning curves (accuracy)")


class ReportError(RuntimeError):
    pass


def dvc(*args: str, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise ReportError(f"dvc {' '.join(args)} failed:\n{result.stderr.strip()}")
    return result.stdout


def metrics_changed(base: str, repo: Path) -> bool:
    changes = json.loads(dvc("metrics", "diff", base, "--json", cwd=repo) or "{}")
    return any(
        entry.get("old") != entry.get("new")
        for metrics in changes.values()
        for entry in metrics.values()
    )


def production_test_note(base: str, repo: Path) -> list[str]:
    """Says, when the production test set changed size, that its metrics compare different
    photos (the set only grows: the same size is the same photos)."""
    changes = json.loads(dvc("metrics", "diff", base, "--all", "--json", cwd=repo) or "{}")
    counts = [
        entry for metrics in changes.values() for key, entry in metrics.items()
        if key == f"{PRODUCTION_TEST}.photos"
    ]  # fmt: skip
    if not counts or counts[0].get("old") == counts[0].get("new"):
        return []
    old, new = (counts[0].get(side) for side in ("old", "new"))
    return [
        f"The `{PRODUCTION_TEST}.*` metrics are on reviewed photos held out from training: "
        f"{old if old is not None else 'none'} at `{base}`, {new if new is not None else 'none'} "
        "here. That set grows as photos are accepted, so its two columns are not on the same "
        f"photos; the `{TEST}.*` metrics are.",
        "",
    ]


def render_plots(base: str, repo: Path, out_dir: Path) -> dict[str, Path]:
    """Each named plot as a PNG, drawn from DVC's own Vega-Lite spec of base vs workspace."""
    specs = plot_specs(dvc("plots", "diff", base, "--json", cwd=repo))
    missing = [name for name in PLOTS if name not in specs]
    if missing:
        raise ReportError(f"plots {missing} are not defined in dvc.yaml (have {sorted(specs)})")
    images = {}
    for name in PLOTS:
        path = out_dir / file_name(name)
        path.write_bytes(png(specs[name]))
        images[name] = path
    return images


def public_rebuild_note(repo: Path) -> list[str]:
    """What a rebuild without the remote used: the data URL the download stage read."""
    base_url = data_url(DownloadParams.load(repo / "params.yaml"))
    return [
        "> **Rebuilt without the DVC remote.** This repository has no MinIO secrets (a fork or",
        "> a fresh copy), so nothing was pulled: `dvc repro` ran every stage, downloading the",
        f"> photos from {base_url} and the ImageNet backbone from Keras' public URL.",
        "",
    ]


def build_report(
    base: str, report: Path, repo: Path = Path("."), data_source: str = "remote"
) -> bool:
    """Write ``report`` (and its images beside it); return whether any metric changed."""
    report.parent.mkdir(parents=True, exist_ok=True)
    changed = metrics_changed(base, repo)
    metrics = dvc("metrics", "diff", base, "--all", "--md", "--precision", "4", cwd=repo)
    params_changed = any(
        json.loads(dvc("params", "diff", base, "--json", cwd=repo) or "{}").values()
    )
    params = dvc("params", "diff", base, "--md", cwd=repo) if params_changed else ""
    images = render_plots(base, repo, report.parent)
    lines = [
        f"## Model report: workspace vs `{base}`",
        "",
        *(public_rebuild_note(repo) if data_source == "public" else []),
        "### Metrics",
        "",
        metrics.strip() or "No metrics found.",
        "",
        *([] if changed else ["No metric changed.", ""]),
        *production_test_note(base, repo),
        "### Params",
        "",
        params.strip() or "No parameter changed.",
        "",
        "### Plots",
        "",
    ]
    for name, path in images.items():
        lines += [f"#### {name}", "", f"![{name}](./{path.name})", ""]
    report.write_text("\n".join(lines))
    return changed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="Git revision to compare with, e.g. origin/main")
    parser.add_argument("report", type=Path, help="Markdown file to write (images go beside it)")
    parser.add_argument(
        "--data-source",
        choices=("remote", "public"),
        default="remote",
        help="where the pipeline's inputs came from (pull.sh's step output): public adds a note",
    )
    args = parser.parse_args(argv)
    try:
        changed = build_report(args.base, args.report, data_source=args.data_source)
    except (ReportError, PlotsError) as error:
        sys.exit(f"report: {error}")
    if github_output := os.environ.get("GITHUB_OUTPUT"):
        with open(github_output, "a") as handle:
            handle.write(f"metrics_changed={str(changed).lower()}\n")
    print(f"report: {args.report} (metrics {'changed' if changed else 'unchanged'})")


if __name__ == "__main__":
    main()
