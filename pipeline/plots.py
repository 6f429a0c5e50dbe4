"""dvc.yaml's named plots as PNG files, and a page template that works offline.

The PNGs (for the README) are drawn from the Vega-Lite specs that ``dvc plots show --json``
fills in from dvc.yaml's ``plots:`` section, so that section stays the one definition of
each chart; .github/scripts/report.py draws the CML report's plots with the same functions.
The specs go beside the PNGs (``specs.json``): DVC cannot take dvc.yaml as a dep, so they
show in Git what each PNG was drawn from, and tests/unit/test_plots.py checks they are current.

The HTML template (``plots.html_template`` in .dvc/config) carries Vega, Vega-Lite and
Vega-Embed inline, as vl-convert-python (pinned in constraints.txt) bundles them: DVC's
default page loads them from a CDN, and offline it stays blank.
"""

from __future__ import annotations

import atexit
import functools
import json
import re
import shutil
import string
import subprocess
import sys
import tempfile
from importlib import resources
from importlib.metadata import version
from io import BytesIO
from pathlib import Path

import vl_convert
from fontTools.ttLib import TTFont

from pipeline.stage import StageError

# DVC's plot templates are Vega-Lite v5 specs: draw them with the newest v5 vl-convert has.
VEGA_LITE = "5.21"
SCALE = 1.5  # PNG pixels per chart pixel: sharp in a README without being heavy
# The one font the charts are drawn with: matplotlib's copy of DejaVu Sans (pinned with
# matplotlib in constraints.txt), under a family name no system has. vl-convert also loads the
# system's fonts, and with whatever font a machine calls sans-serif the PNGs would differ
# byte for byte from one machine to the next.
FONT_FAMILY = "DVC Plots Sans"
SPECS_FILE = "specs.json"  # beside the PNGs: the Vega-Lite specs they were drawn from

# DVC fills these placeholders in the template (dvc_render.html): {plot_divs} is required;
# {scripts} is left out on purpose, since DVC would put its CDN <script> tags there.
PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")

# The page around DVC's {plot_divs}; DVC's own default (dvc_render.html.PAGE_HTML) plus the
# scripts inline.
HEAD = string.Template("""<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>DVC plots</title>
<!-- Written by the plots stage (python -m stages.plots): Vega $vega, Vega-Lite $vega_lite and
     Vega-Embed $embed as bundled by vl-convert-python $vl_convert; no network needed. -->
<script>
""")
TAIL = """
</script>
<style>
table { border-spacing: 15px; }
</style>
</head>
<body>
{plot_divs}
</body>
</html>
"""


class PlotsError(StageError):
    """The plots cannot be drawn; the message says which."""


def page_template() -> str:
    """The HTML template for `dvc plots show` / `dvc plots diff`, scripts inline."""
    bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE)
    # The bundle goes inside a <script> element, and DVC substitutes placeholders anywhere.
    clashes = [text for text in ("</script", *PLACEHOLDERS) if text in bundle]
    if clashes:
        raise PlotsError(f"the vl-convert bundle contains {clashes}: it cannot be inlined")
    head = HEAD.substitute(
        vega=vl_convert.get_vega_version(),
        vega_lite=VEGA_LITE,
        embed=vl_convert.get_vega_embed_version(),
        vl_convert=version("vl-convert-python"),
    )
    return head + bundle + TAIL


def plot_specs(dvc_json: str) -> dict[str, dict]:
    """Each named plot's Vega-Lite spec, from `dvc plots show --json` (or `diff --json`).

    A plot file missing from the workspace is an error; from an older revision of a diff it
    is not (a plot added since has nothing to compare with).
    """
    answer = json.loads(dvc_json)
    missing = [error for error in answer.get("errors", []) if error["rev"] == "workspace"]
    if missing:
        raise PlotsError(f"dvc could not load every plot: {missing}")
    specs = {}
    for name, renders in answer["data"].items():
        (render,) = renders
        if render["type"] != "vega":
            raise PlotsError(f"plot {name!r} is a {render['type']} plot, not a Vega-Lite one")
        specs[name] = render["content"]
    return specs


def file_name(plot: str) -> str:
    """``Learning curves (loss)`` -> ``learning-curves-loss.png``."""
    return re.sub(r"[^a-z0-9]+", "-", plot.lower()).strip("-") + ".png"


@functools.cache
def register_font() -> None:
    """Give vl-convert ``FONT_FAMILY``: DejaVu Sans renamed (its licence asks that a modified
    copy be renamed), in a directory kept for the life of the process."""
    source = resources.files("matplotlib") / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    font = TTFont(BytesIO(source.read_bytes()), recalcTimestamp=False)
    names = {1: FONT_FAMILY, 4: FONT_FAMILY, 6: FONT_FAMILY.replace(" ", ""), 16: FONT_FAMILY}
    for record in font["name"].names:
        if record.nameID in names:
            record.string = names[record.nameID]
    directory = Path(tempfile.mkdtemp(prefix="plots-font-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    font.save(directory / "DVCPlotsSans.ttf")
    vl_convert.register_font_directory(str(directory))


def png(spec: dict) -> bytes:
    register_font()
    spec = {**spec, "config": {**spec.get("config", {}), "font": FONT_FAMILY}}
    return vl_convert.vegalite_to_png(spec, vl_version=VEGA_LITE, scale=SCALE)


def render(specs: dict[str, dict]) -> dict[str, bytes]:
    """PNG bytes per file name, for every named plot."""
    images = {file_name(name): png(spec) for name, spec in specs.items()}
    if len(images) != len(specs):
        raise PlotsError(f"two plots map to one file name: {sorted(specs)}")
    return images


def dvc_plots_json(*args: str) -> str:
    """Output of `dvc plots <args> --json` in the current directory (the repo root)."""
    command = [sys.executable, "-m", "dvc", "plots", *args, "--json"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise PlotsError(f"dvc plots {' '.join(args)} failed:\n{result.stderr.strip()}")
    return result.stdout
