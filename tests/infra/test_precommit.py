"""pre-commit: every hook installs without GitHub, the repo passes them, and they bite.

Runs in a fresh `git clone` of this repo (so: the committed files), with pre-commit's own cache
in a temp dir, so the hook environments are really built from PyPI.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.git import git
from tests.support.paths import REPO_ROOT
from tests.support.processes import python_module, with_interpreter_tools

HOOKS = [
    "ruff-check",
    "ruff-format",
    "check-yaml",
    "check-toml",
    "check-json",
    "check-added-large-files",
    "detect-private-key",
    "detect-secrets",
    "dvc-pre-commit",
]


@pytest.fixture(scope="module")
def hook_env(tmp_path_factory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("pre-commit-home")
    return with_interpreter_tools(dict(os.environ, PRE_COMMIT_HOME=str(cache)))  # dvc hooks


def fresh_clone(dest: Path) -> Path:
    git(dest.parent, "clone", "-q", str(REPO_ROOT), str(dest))
    return dest


def pre_commit(workspace, *args, env) -> subprocess.CompletedProcess:
    return python_module("pre_commit", workspace, *args, env=env, timeout=600)


def hook_ids(config: dict) -> list[str]:
    return [hook["id"] for repo in config["repos"] for hook in repo["hooks"]]


def test_every_hook_is_local():
    config = yaml.safe_load((REPO_ROOT / ".pre-commit-config.yaml").read_text())
    assert {repo["repo"] for repo in config["repos"]} == {"local"}
    assert set(HOOKS) | {"dvc-pre-push", "dvc-post-checkout"} <= set(hook_ids(config))


@pytest.mark.parametrize("tool", ["ruff", "detect-secrets"])
def test_python_tool_hooks_pin_the_version_of_constraints(tool):
    pinned = re.search(rf"^{tool}==(\S+)$", (REPO_ROOT / "constraints.txt").read_text(), re.M)
    config = (REPO_ROOT / ".pre-commit-config.yaml").read_text()
    assert set(re.findall(rf"{tool}==([\w.]+)", config)) == {pinned.group(1)}


@pytest.mark.slow  # builds the hook's environment from PyPI, and scans every tracked file
def test_the_secret_scan_passes_the_repository_and_catches_a_planted_secret(tmp_path, hook_env):
    workspace = fresh_clone(tmp_path / "repo")
    clean = pre_commit(workspace, "run", "detect-secrets", "--all-files", env=hook_env)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert re.search(r"^detect secrets .*Passed$", clean.stdout, re.M), clean.stdout
    # Made here, so this file holds no secret: a key id by its pattern, a password by its
    # keyword, both in a file about to be committed.
    key_id = "AKIA" + secrets.token_hex(8).upper()
    planted = workspace / "deploy" / "settings.py"
    planted.write_text(f'AWS_ACCESS_KEY_ID = "{key_id}"\npassword = "{secrets.token_hex(20)}"\n')
    git(workspace, "add", str(planted))
    caught = pre_commit(workspace, "run", "detect-secrets", env=hook_env)
    assert caught.returncode == 1, caught.stdout + caught.stderr
    assert "deploy/settings.py:1" in caught.stdout and "AWS Access Key" in caught.stdout
    assert "deploy/settings.py:2" in caught.stdout and "Secret Keyword" in caught.stdout
    # DVC's hash files are not scanned (they churn on every repro), all other files are.
    dvc_file = workspace / "data" / "photos.dvc"
    dvc_file.write_text(f"outs:\n- md5: {secrets.token_hex(16)}\n  password: {key_id}\n")
    git(workspace, "rm", "-q", "--cached", str(planted))
    git(workspace, "add", str(dvc_file))
    skipped = pre_commit(workspace, "run", "detect-secrets", env=hook_env)
    assert skipped.returncode == 0 and "(no files to check)Skipped" in skipped.stdout, (
        skipped.stdout
    )


@pytest.mark.slow  # builds every hook's environment from PyPI: network, and ~20 s
def test_all_files_pass_every_hook_in_a_fresh_clone(tmp_path, hook_env):
    workspace = fresh_clone(tmp_path / "repo")
    result = pre_commit(workspace, "run", "--all-files", env=hook_env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("Passed") >= len(HOOKS), result.stdout
    assert "hook id: dvc-pre-commit" in result.stdout  # `dvc status` ran (verbose hook)


@pytest.mark.slow  # builds every hook's environment from PyPI: network, and ~20 s
def test_installed_hooks_refuse_a_bad_commit(tmp_path, hook_env):
    workspace = fresh_clone(tmp_path / "repo")
    head_before = git(workspace, "rev-parse", "HEAD").stdout
    installed = pre_commit(workspace, "install", env=hook_env)
    assert installed.returncode == 0, installed.stderr
    for hook_type in ("pre-commit", "pre-push", "post-checkout"):
        assert (workspace / ".git" / "hooks" / hook_type).is_file(), installed.stdout

    (workspace / "stages" / "sloppy.py").write_text("import os,sys\nx=1\n")
    marker = "OPENSSH PRIVATE KEY-----"  # split, so this file is no key to the hook
    (workspace / "deploy_key").write_text(f"-----BEGIN {marker}\nb3BlbnNzaC1r\n-----END {marker}\n")
    (workspace / "photos.npz").write_bytes(os.urandom(600_000))
    (workspace / "broken.json").write_text('{"accuracy": 0.9,}')
    git(workspace, "add", "-A")
    commit = git(workspace, "commit", "-m", "bad", env=hook_env, check=False)
    assert commit.returncode != 0
    output = commit.stdout + commit.stderr
    failed = re.findall(r"^(.+?)\.+Failed$", output, re.M)
    assert failed == [
        "ruff check",
        "ruff format",
        "check JSON",
        "refuse large files (data and models belong in DVC)",
        "refuse private keys",
        "detect secrets (patterns and entropy; reviewed findings in .secrets.baseline)",
    ], output
    assert git(workspace, "rev-parse", "HEAD").stdout == head_before  # nothing was committed
