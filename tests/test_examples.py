"""Every script in examples/ runs to completion (exit code 0)."""

import os
import pathlib
import subprocess
import sys

import pytest


_ROOT = pathlib.Path(__file__).resolve().parent.parent
_EXAMPLES = sorted((_ROOT / "examples").glob("*.py"))


def test_examples_found():
    assert len(_EXAMPLES) >= 8, _EXAMPLES


@pytest.mark.parametrize("script", _EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(script, tmp_path):
    import lineax

    env = dict(os.environ)
    # The examples import the same lineax as this test run: the source tree, or
    # the installed wheel when the tests run against that.
    lineax_parent = str(pathlib.Path(lineax.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(
        [lineax_parent, *filter(None, [env.get("PYTHONPATH")])]
    )
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONWARNINGS"] = "default"
    # The working directory is a temporary one so that files written by the
    # examples (e.g. a PNG) do not land in the repository.
    completed = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, (
        f"{script.name} failed with exit code {completed.returncode}\n"
        f"--- stdout ---\n{completed.stdout}\n--- stderr ---\n{completed.stderr}"
    )
    assert completed.stdout.strip(), f"{script.name} printed nothing"
