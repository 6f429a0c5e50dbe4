"""The plots stage, and `dvc plots show` / `dvc plots diff` pages drawn offline in real Chromium.

No pipeline run: a temporary DVC project holds this repo's dvc.yaml `vars` and `plots`, its
.dvc/config, the page template as the plots stage writes it, and small plot files generated
for each named plot.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from pipeline.plots import SPECS_FILE, file_name, page_template, plot_specs, render
from tests.support.browser import headless_chromium, sent_requests
from tests.support.git import git
from tests.support.needs import require_tools
from tests.support.paths import PIPELINE_PATHS, REPO_ROOT
from tests.support.processes import python_module

DVC_YAML = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
PLOT_NAMES = [name for entry in DVC_YAML["plots"] for name in entry]
TEMPLATE = PIPELINE_PATHS["plots_template"]
PLOTS_DIR = PIPELINE_PATHS["plots_dir"]
CLASSES = ("dandelion", "grass")
# Data marks are drawn in colour; axes, grid lines and text are grey. A chart counts as drawn
# when it has this many saturated pixels (a drawn chart here has thousands).
MIN_COLOURED_PIXELS = 300
CHART = "svg.marks, canvas.marks"  # what vega-embed draws each chart into


def expand(path: str) -> str:
    """``${train_dir}/plots/...`` -> ``results/train/plots/...``."""
    return re.sub(r"\$\{(\w+)\}", lambda m: PIPELINE_PATHS[m.group(1)], path)


def plot_rows(template: str, x: str, y: str, variant: int) -> list[dict]:
    """Small data for one plot file: labels for the confusion template, a curve otherwise."""
    if template == "confusion":
        counts = {(0, 0): 25, (0, 1): 3 + variant, (1, 0): 2, (1, 1): 28 - variant}
        return [
            {x: CLASSES[actual], y: CLASSES[predicted]}
            for (actual, predicted), count in counts.items()
            for _ in range(count)
        ]
    return [{x: step, y: round(0.9 ** (step + variant), 4)} for step in range(12)]


def write_plot_files(root: Path, variant: int = 0) -> None:
    """A file for every y source of every named plot in dvc.yaml, in the format its suffix says."""
    for entry in DVC_YAML["plots"]:
        ((_, plot),) = entry.items()
        for source, field in plot["y"].items():
            rows = plot_rows(plot["template"], plot["x"], field, variant)
            path = root / expand(source)
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".tsv":
                with open(path, "w", newline="") as handle:
                    writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t")
                    writer.writeheader()
                    writer.writerows(rows)
            else:
                path.write_text(json.dumps(rows))


def run(root: Path, module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module args`` in ``root`` with this interpreter; fails the test on error."""
    result = python_module(module, root, *args, env=dict(os.environ), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def template() -> str:
    """The page template, as the plots stage writes it (bundling takes about 10 s)."""
    return page_template()


@pytest.fixture
def project(tmp_path, template) -> Path:
    """A Git + DVC project with this repo's plot definitions, config and page template."""
    root = tmp_path / "project"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    run(root, "dvc", "init", "-q")
    shutil.copy(REPO_ROOT / ".dvc" / "config", root / ".dvc" / "config")
    plots_only = {"vars": DVC_YAML["vars"], "plots": DVC_YAML["plots"]}
    (root / "dvc.yaml").write_text(yaml.safe_dump(plots_only, sort_keys=False))
    (root / TEMPLATE).parent.mkdir(parents=True, exist_ok=True)
    (root / TEMPLATE).write_text(template, encoding="utf-8")
    write_plot_files(root)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "plots")
    return root


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium with the network off (DevTools offline mode and no name resolution:
    nothing may reach past this machine), requests and console errors logged."""
    driver = headless_chromium(
        *require_tools("chromium", "chromedriver"),
        tmp_path_factory.mktemp("chromium") / "profile",
        "--window-size=1000,1000",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        logs=("performance", "browser"),
    )
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd(
        "Network.emulateNetworkConditions",
        {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
    )
    yield driver
    driver.quit()


def open_page(driver, page: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """Load ``page``; return every request made meanwhile (document URL, URL) and JS errors."""
    driver.get_log("performance"), driver.get_log("browser")  # drop earlier entries
    driver.get(page.as_uri())
    requests = [
        (params.get("documentURL", ""), params["request"]["url"])
        for params in sent_requests(driver)
    ]
    errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return requests, errors


def coloured_pixels(png: bytes) -> int:
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=int)
    return int(((rgb.max(axis=2) - rgb.min(axis=2)) > 60).sum())


def drawn_charts(driver, timeout: float = 30) -> dict[str, int]:
    """Coloured pixels in each plot's chart, by plot div id, once all look drawn (or at
    ``timeout``: vega-embed draws asynchronously after it adds the chart element)."""
    counts: dict[str, int] = {}

    def all_drawn(driver) -> bool:
        counts.clear()
        for div in driver.find_elements(By.CSS_SELECTOR, "body > div[id]"):
            charts = div.find_elements(By.CSS_SELECTOR, CHART)
            counts[div.get_attribute("id")] = (
                coloured_pixels(charts[0].screenshot_as_png) if charts else 0
            )
        return bool(counts) and min(counts.values()) >= MIN_COLOURED_PIXELS

    with contextlib.suppress(TimeoutException):
        WebDriverWait(driver, timeout, poll_frequency=0.5).until(all_drawn)
    return dict(counts)


def plots_page(root: Path, *command: str) -> Path:
    """Run `dvc plots ...` as the docs do; the page it says it wrote."""
    result = run(root, "dvc", "plots", *command)
    (uri,) = re.findall(r"file://\S+", result.stdout)
    page = Path(uri.removeprefix("file://"))
    assert page.is_file()
    return page


@pytest.mark.parametrize("command", [["show"], ["diff", "HEAD"]], ids=["show", "diff"])
def test_the_plots_page_draws_every_chart_offline(project, browser, command, tmp_path):
    if command[0] == "diff":
        write_plot_files(project, variant=2)  # the workspace against HEAD: two revisions
    page = plots_page(project, *command)
    assert "cdn.jsdelivr.net" not in page.read_text()

    requests, errors = open_page(browser, page)
    charts = drawn_charts(browser)
    browser.save_screenshot(str(tmp_path / "page.png"))

    assert [url for _, url in requests if not url.startswith(("file:", "chrome:", "data:"))] == []
    assert [url for doc, url in requests if doc == page.as_uri()] == [page.as_uri()]
    assert errors == []
    assert len(charts) == len(PLOT_NAMES)
    blank = {div: count for div, count in charts.items() if count < MIN_COLOURED_PIXELS}
    assert blank == {}, f"charts without data marks: {blank} (all: {charts})"


def test_dvcs_default_page_is_blank_offline(project, browser):
    """The control: the same check on DVC's own page, which loads Vega from a CDN, fails."""
    run(project, "dvc", "config", "--unset", "plots.html_template")
    page = plots_page(project, "show")

    requests, errors = open_page(browser, page)

    assert any(url.startswith("https://cdn.jsdelivr.net/") for _, url in requests), requests
    assert any("vegaEmbed is not defined" in error for error in errors), errors
    assert browser.find_elements(By.CSS_SELECTOR, CHART) == []


def test_plots_stage_draws_each_named_plot_and_the_same_bytes_again(project, template):
    run(project, "stages.plots", "out/plots", "out/template.html")
    out = project / "out"

    expected = {file_name(name) for name in PLOT_NAMES}
    assert {p.name for p in (out / "plots").iterdir()} == expected | {SPECS_FILE}
    # Same inputs, another process: the same bytes (the PNGs from the specs the stage kept).
    assert (out / "template.html").read_text(encoding="utf-8") == template
    again = render(json.loads((out / "plots" / SPECS_FILE).read_text()))
    assert {name: (out / "plots" / name).read_bytes() for name in expected} == again
    for name in expected:
        with Image.open(out / "plots" / name) as image:
            assert image.format == "PNG" and image.width > 400 and image.height > 300, name
        assert coloured_pixels(again[name]) >= MIN_COLOURED_PIXELS, name


def test_a_missing_plot_file_stops_the_stage_with_its_name(project):
    (_, plot), *_ = DVC_YAML["plots"][0].items()
    missing = expand(next(iter(plot["y"])))
    (project / missing).unlink()
    result = python_module(
        "stages.plots", project, "out/plots", "out/template.html", env=dict(os.environ), timeout=300
    )
    assert result.returncode != 0
    assert (
        "plots failed: dvc could not load every plot" in result.stderr and missing in result.stderr
    )
    assert not (project / "out").exists()


def test_committed_pngs_were_drawn_from_the_current_plots_and_data():
    """DVC cannot take dvc.yaml as a dep, so the plots stage keeps the specs it drew from."""
    shown = run(REPO_ROOT, "dvc", "plots", "show", "--json").stdout
    committed = json.loads((REPO_ROOT / PLOTS_DIR / SPECS_FILE).read_text())
    assert committed == plot_specs(shown), "dvc.yaml's plots changed: run `dvc repro -f -s plots`"
    pngs = {path.name for path in (REPO_ROOT / PLOTS_DIR).glob("*.png")}
    assert pngs == {file_name(name) for name in PLOT_NAMES}


# Hashes the PNG of each committed spec, drawn by the plots stage's own code.
DRAW_COMMITTED = f"""
import hashlib, json
from pipeline.plots import png
specs = json.load(open({str(REPO_ROOT / PLOTS_DIR / SPECS_FILE)!r}))
print(json.dumps({{name: hashlib.sha256(png(spec)).hexdigest() for name, spec in specs.items()}}))
"""


def test_the_pngs_do_not_depend_on_the_machine_s_fonts(tmp_path):
    """vl-convert loads the system's fonts too; with the stage's own font the bytes stay the
    same when they are hidden (a private mount namespace puts an empty directory over them)."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot make a mount namespace here (unshare -m needs root)")
    draw = [sys.executable, "-c", DRAW_COMMITTED]
    with_fonts = subprocess.run(draw, cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    (tmp_path / "empty").mkdir()
    hide = f'mount --bind {tmp_path / "empty"} /usr/share/fonts && exec "$@"'
    without = subprocess.run(
        ["unshare", "-m", "sh", "-c", hide, "sh", *draw],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(with_fonts.stdout) == json.loads(without.stdout)
