"""Importing any module of the project does nothing but define things: no process or thread
started, no logging filter or handler, signal handler, warnings filter or environment variable
set, no file descriptor redirected. What a module needs configured, its functions configure."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import venv

from tests.support.paths import REPO_ROOT
from tests.support.processes import python_code

PACKAGES = ("stages", "pipeline", "serving", "alert_relay")  # tests/unit/test_dependencies.py

# Runs in a fresh interpreter: every third-party module the project's modules import at their
# top level is imported first, so that only what the project's own code does is compared.
CHECK = textwrap.dedent("""
    import ast, importlib, json, logging, os, signal, sys, threading, warnings
    from pathlib import Path

    import psutil

    root, packages = Path(sys.argv[1]), sys.argv[2:]
    modules = sorted(
        ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        for package in packages
        for path in (root / package).rglob("*.py")
    )
    third_party = set()
    for module in modules:
        path = root / (module.replace(".", "/") + ".py")
        if not path.exists():
            path = root / module.replace(".", "/") / "__init__.py"
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                third_party.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                third_party.add(node.module)
    for name in sorted(third_party):
        if name.split(".")[0] not in packages:
            importlib.import_module(name)

    def state():
        loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        return {
            "threads": sorted(thread.name for thread in threading.enumerate()),
            "children": sorted(child.pid for child in psutil.Process().children(recursive=True)),
            "logging": sorted(
                (getattr(logger, "name", "?"), len(logger.filters), len(logger.handlers))
                for logger in loggers
                if isinstance(logger, logging.Logger) and (logger.filters or logger.handlers)
            ),
            "signals": [
                repr(signal.getsignal(number))
                for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
            ],
            "warnings": len(warnings.filters),
            "environment": sorted(os.environ.items()),
            "stderr": tuple(os.fstat(2))[:2],
        }

    changed = {}
    before = state()
    for module in modules:
        importlib.import_module(module)
        after = state()
        differences = [key for key in before if after[key] != before[key]]
        if differences:
            changed[module] = differences
        before = after
    print(json.dumps({"modules": modules, "changed": changed}))
""")


def test_importing_any_module_of_the_project_changes_nothing(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}
    env.update(BENTOML_HOME=str(tmp_path / "bentoml"), BENTOML_DO_NOT_TRACK="true")
    result = python_code(CHECK, REPO_ROOT, str(REPO_ROOT), *PACKAGES, env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert {"stages.features", "pipeline.logs", "serving.service"} <= set(report["modules"])
    assert report["changed"] == {}
    # No store was read either: an empty BentoML home stays empty.
    assert not (tmp_path / "bentoml").exists() or not any((tmp_path / "bentoml").iterdir())


def test_the_service_settings_import_in_a_fresh_venv_with_no_bentoml_store_or_model(tmp_path):
    """serving/settings.py is the standard library only: deployment checks read it anywhere."""
    venv.create(tmp_path / "venv", with_pip=False)
    result = subprocess.run(
        [str(tmp_path / "venv" / "bin" / "python"), "-c", "import serving.settings as s; print(s)"],
        cwd=REPO_ROOT,  # the checkout's serving/, and nothing installed beside Python itself
        env={"PATH": "/usr/bin:/bin", "BENTOML_HOME": str(tmp_path / "no-store")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "serving/settings.py" in result.stdout
    assert not (tmp_path / "no-store").exists()
