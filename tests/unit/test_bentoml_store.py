"""pipeline/bentoml_store.py on a real BentoML store: the internals it wraps still mean what the
package stage and promotion rely on (a BentoML upgrade that moves them fails here)."""

from __future__ import annotations

import os
import textwrap

from tests.support.paths import REPO_ROOT
from tests.support.processes import python_code

SERVICE = textwrap.dedent("""
    import bentoml

    @bentoml.service
    class Echo:
        @bentoml.api
        def echo(self, text: str) -> str:
            return text
""")

# In a fresh process: BentoML resolves its home once, on first use.
CHECK = textwrap.dedent("""
    import sys
    from pathlib import Path

    from pipeline import bentoml_store

    home = Path(sys.argv[1])
    bentoml_store.use_home(home)
    assert bentoml_store.current_home() == home
    import bentoml

    for version in ("first", "second"):
        bentoml.bentos.build("service:Echo", name="echo", version=version, build_ctx=sys.argv[2])
    assert bentoml.bentos.get("echo:latest").tag.version == "second"  # BentoML's own choice
    bentoml_store.set_latest("echo", "first")
    assert bentoml.bentos.get("echo:latest").tag.version == "first"
    assert [str(b.tag) for b in bentoml.bentos.list("echo")] == ["echo:first", "echo:second"]
    print("ok")
""")


def test_the_home_is_chosen_and_latest_pinned_on_a_real_store(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "service.py").write_text(SERVICE)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), BENTOML_DO_NOT_TRACK="true")
    env.pop("BENTOML_HOME", None)
    result = python_code(CHECK, tmp_path, str(tmp_path / "home"), str(tmp_path / "src"), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "ok"
    assert (tmp_path / "home" / "bentos" / "echo" / "first").is_dir()


def test_a_home_cannot_change_once_bentoml_has_chosen_one(tmp_path):
    switch = textwrap.dedent("""
        import sys
        from pathlib import Path
        from pipeline import bentoml_store
        bentoml_store.use_home(Path(sys.argv[1]))
        try:
            bentoml_store.use_home(Path(sys.argv[2]))
        except RuntimeError as error:
            print(error)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), BENTOML_DO_NOT_TRACK="true")
    result = python_code(switch, tmp_path, str(tmp_path / "a"), str(tmp_path / "b"), env=env)
    assert result.returncode == 0, result.stderr
    assert "BentoML was used in this process before" in result.stdout
