"""serving/page.py: the page, assembled from serving/page/ with serving/settings.py's names."""

from __future__ import annotations

import json

from serving import page
from serving.settings import NEITHER_LABEL


def test_the_page_holds_every_script_and_style_and_the_settings_names():
    html = page.page_html()
    for files in page.PARTS.values():
        for name in files:
            text = (page.PAGE_DIR / name).read_text()
            for placeholder, value in page.CONSTANTS.items():
                text = text.replace(placeholder, json.dumps(value))
            assert text in html
    assert "{{" not in html  # every name written in
    assert f"const NEITHER_LABEL = {json.dumps(NEITHER_LABEL)};" in html
