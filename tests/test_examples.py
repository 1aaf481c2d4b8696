"""Every script in examples/ runs to completion as `__main__` and prints something.

The scripts run one after the other in a subprocess (this file, run as a script),
so that JAX is imported once rather than once per example: `classical_solve.py` at
XLA's default flags (all of them with LINEAX_EXHAUSTIVE=1), the others at the
tests' (see `example_reports`), in two processes. Each simulates 8 CPU devices
for `sharded_poisson.py` (the device count is fixed when JAX starts); the scripts
that leave float64 off run before those that turn it on.
"""

import contextlib
import io
import json
import os
import pathlib
import runpy
import subprocess
import sys
import traceback

import pytest


_ROOT = pathlib.Path(__file__).resolve().parent.parent
_EXAMPLES = sorted((_ROOT / "examples").glob("*.py"))


def _enables_x64(script: pathlib.Path) -> bool:
    return '"jax_enable_x64", True' in script.read_text()


def _run_all(scripts: list[str]) -> None:
    """Run each script as `__main__` in this process; print a JSON report."""
    report = {}
    for script in scripts:
        out = io.StringIO()
        argv = sys.argv
        sys.argv = [script]
        try:
            with contextlib.redirect_stdout(out):
                runpy.run_path(script, run_name="__main__")
            error = None
        except SystemExit as e:
            error = None if e.code in (None, 0) else f"SystemExit({e.code!r})"
        except BaseException:
            error = traceback.format_exc()
        finally:
            sys.argv = argv
        report[pathlib.Path(script).stem] = {"stdout": out.getvalue(), "error": error}
    print(json.dumps(report))


@pytest.fixture(scope="module")
def example_reports(tmp_path_factory) -> dict:
    # Imported here: this file also runs as the examples' script, without conftest.
    from conftest import EXHAUSTIVE

    # One example (all with LINEAX_EXHAUSTIVE=1) runs at XLA's defaults, as users
    # run it: with `run_at_default_flags`'s tests, the place in the default run
    # whose kernels LLVM optimises fully and XLA's fusion emitters generate (see
    # `ADDED_XLA_FLAGS` in conftest.py). An example costs about twice the CPU
    # time there (6-16 s against 3-9 s, each in its own process); this one
    # solves with LU, QR, SVD, GMRES and BiCGStab, under `vmap`, `invert` and
    # `throw=False`. The others run at the tests' flags.
    at_default_flags = [
        s for s in _EXAMPLES if EXHAUSTIVE or s.stem == "classical_solve"
    ]
    reports = {}
    for default_flags in (True, False):
        scripts = [s for s in _EXAMPLES if (s in at_default_flags) == default_flags]
        if scripts:
            reports.update(_run(scripts, default_flags, tmp_path_factory))
    return reports


def _run(scripts: list, default_flags: bool, tmp_path_factory) -> dict:
    """Run `scripts` in one subprocess (at XLA's default flags, or at the tests'
    flags); their reports."""
    from conftest import ADDED_XLA_FLAGS

    import lineax

    env = dict(os.environ)
    # The examples import the same lineax as this test run: the source tree, or
    # the installed wheel when the tests run against that.
    lineax_parent = str(pathlib.Path(lineax.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(
        [lineax_parent, *filter(None, [env.get("PYTHONPATH")])]
    )
    env.setdefault("JAX_PLATFORMS", "cpu")
    flags = env.get("XLA_FLAGS", "").split()
    if default_flags:
        flags = [f for f in flags if f not in ADDED_XLA_FLAGS]
    env["XLA_FLAGS"] = " ".join([*flags, "--xla_force_host_platform_device_count=8"])
    env["PYTHONWARNINGS"] = "default"
    # The working directory is a temporary one so that files written by the
    # examples (e.g. a PNG) do not land in the repository.
    completed = subprocess.run(
        [sys.executable, __file__, *map(str, sorted(scripts, key=_enables_x64))],
        cwd=tmp_path_factory.mktemp("examples"),
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_examples_found():
    assert len(_EXAMPLES) >= 8, _EXAMPLES


@pytest.mark.parametrize("script", _EXAMPLES, ids=lambda p: p.stem)
def test_example_runs(script, example_reports):
    report = example_reports[script.stem]
    assert report["error"] is None, (
        f"{script.name} failed\n--- stdout ---\n{report['stdout']}\n"
        f"--- error ---\n{report['error']}"
    )
    assert report["stdout"].strip(), f"{script.name} printed nothing"


if __name__ == "__main__":
    _run_all(sys.argv[1:])
