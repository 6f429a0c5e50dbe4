"""The label-noise report: photos whose out-of-fold score confidently contradicts their label,
as a CSV and a contact sheet to review. Nothing is dropped automatically: a reviewed exclusion
goes into the catalogue, in Git, with its reason (pipeline/catalogue.py)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

THUMBNAIL = 200  # px, each side of a photo on the contact sheet
CAPTION_LINE = 16  # px a line of Pillow's default font takes, with its spacing


def caption_height(lines: int) -> int:
    """px under each thumbnail for captions of ``lines`` lines."""
    return lines * CAPTION_LINE + 2


def confident_contradictions(
    labels: np.ndarray, scores: np.ndarray, confidence: float
) -> np.ndarray:
    """Rows whose out-of-fold score gives the other class at least ``confidence``."""
    other_class_probability = np.where(labels == 1, 1 - scores, scores)
    rows = np.flatnonzero(other_class_probability >= confidence)
    return rows[np.argsort(-other_class_probability[rows], kind="stable")]


def contact_sheet(
    images: list[np.ndarray], captions: list[str], columns: int = 4, lines: int = 2
) -> Image.Image:
    """Thumbnails in a grid, each with its caption of at most ``lines`` lines underneath."""
    rows = max(1, -(-len(images) // columns))
    cell_height = THUMBNAIL + caption_height(lines)
    sheet = Image.new("RGB", (columns * THUMBNAIL, rows * cell_height), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (pixels, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = (index % columns) * THUMBNAIL, (index // columns) * cell_height
        sheet.paste(Image.fromarray(pixels).resize((THUMBNAIL, THUMBNAIL)), (x, y))
        draw.multiline_text((x + 4, y + THUMBNAIL + 2), caption, fill="black", spacing=2)
    return sheet


def write_noise_report(
    out_dir: Path, photos: dict, images: np.ndarray, rows: np.ndarray, scores, classes, recipe
) -> None:
    """``label_noise.csv`` and ``label_noise.png`` in ``out_dir`` for the photos ``rows``."""
    fields = ["path", "label", "recipe", "score", "other_class_probability"]
    with open(out_dir / "label_noise.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            label = int(photos["labels"][row])
            writer.writerow(
                {
                    "path": str(photos["paths"][row]),
                    "label": classes[label],
                    "recipe": recipe,
                    "score": f"{scores[row]:.4f}",
                    "other_class_probability": f"{(1 - scores[row] if label else scores[row]):.4f}",
                }
            )
    captions = [
        f"{Path(str(photos['paths'][row])).name}: {classes[int(photos['labels'][row])]}\n"
        f"P({classes[1]}) {scores[row]:.3f}"
        for row in rows
    ]
    contact_sheet([images[row] for row in rows], captions).save(
        out_dir / "label_noise.png", optimize=False
    )
