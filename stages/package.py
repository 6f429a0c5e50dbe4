"""Package stage: build the evaluated model and the service into a bento, reproducibly.

What the bento holds, and how its archive comes out the same bytes for the same inputs:
pipeline/bento.py. This stage changes no state outside Git and DVC: BentoML works in a
throwaway home, and only the exported archive is kept. Registering the model and deploying
the bento is a separate, explicit step after ``dvc repro``: ``dandelion promote``.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from pipeline.bento import build_bento, included_files, model_card
from pipeline.stage import arguments, summarised


@summarised("package")
def main(argv: list[str] | None = None) -> str:
    args = arguments(argv, __doc__, "model_dir", "export_dir", "metrics_json", "bento_archive")
    test_metrics = json.loads(args.metrics_json.read_text())["test"]
    card = model_card(args.model_dir, args.export_dir, test_metrics, included_files())
    with tempfile.TemporaryDirectory(prefix="bentoml-home-") as home:
        tag = build_bento(args.export_dir, card, args.bento_archive, Path(home))
    print("package: register and deploy the bento with `dandelion promote`")
    return (
        f"bento {tag} (threshold {card.threshold}, test accuracy "
        f"{card.test_metrics['accuracy']:.3f}) -> {args.bento_archive}"
    )


if __name__ == "__main__":
    main()
