"""Plots stage: dvc.yaml's named plots as PNGs, and the page template that makes
``dvc plots show`` work offline (pipeline/plots.py)."""

from __future__ import annotations

import json

from pipeline.plots import SPECS_FILE, dvc_plots_json, page_template, plot_specs, render
from pipeline.stage import arguments, summarised


@summarised("plots")
def main(argv: list[str] | None = None) -> str:
    args = arguments(argv, __doc__, "out_dir", "template")
    specs = plot_specs(dvc_plots_json("show"))
    images = render(specs)
    template = page_template()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, data in images.items():
        (args.out_dir / name).write_bytes(data)
    (args.out_dir / SPECS_FILE).write_text(json.dumps(specs, indent=1) + "\n")
    args.template.parent.mkdir(parents=True, exist_ok=True)
    args.template.write_text(template, encoding="utf-8")
    return f"{len(images)} PNGs -> {args.out_dir}, page template -> {args.template}"


if __name__ == "__main__":
    main()
