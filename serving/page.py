"""The web page: one HTML answer, assembled from the files of serving/page/ when the front
starts, so that the browser loads nothing but the service's own API.

``index.html`` holds a placeholder line where each part goes: the style, then the scripts,
which share one ``<script>`` element (and its globals) in the order listed.
"""

from __future__ import annotations

import json
from pathlib import Path

from serving.settings import API_KEY_HEADER, NEITHER_LABEL

PAGE_DIR = Path(__file__).parent / "page"
PARTS = {
    "/* page.css */\n": ["page.css"],
    "// key.js\n// verdicts.js\n// feedback.js\n// model-card.js\n": [
        "key.js",
        "verdicts.js",
        "feedback.js",
        "model-card.js",
    ],
}
# Names the scripts take from serving/settings.py, written in as JSON strings.
CONSTANTS = {'"{{NEITHER_LABEL}}"': NEITHER_LABEL, '"{{API_KEY_HEADER}}"': API_KEY_HEADER}


def page_html() -> str:
    html = (PAGE_DIR / "index.html").read_text()
    for placeholder, files in PARTS.items():
        if placeholder not in html:
            raise RuntimeError(f"{PAGE_DIR / 'index.html'} lacks the line {placeholder!r}")
        html = html.replace(placeholder, "".join((PAGE_DIR / name).read_text() for name in files))
    for placeholder, value in CONSTANTS.items():
        html = html.replace(placeholder, json.dumps(value))
    return html
