"""The per-test watchdog of `conftest.py` ends a test that hangs (a solver loop that
never returns inside `jit` cannot be interrupted from Python)."""

import os
import subprocess
import sys
import time

import pytest


@pytest.mark.skipif(
    os.environ.get("LINEAX_WATCHDOG_TARGET") != "1",
    reason="the hanging test that `test_watchdog_ends_a_hanging_test` runs",
)
def test_watchdog_target_hangs():
    time.sleep(120)  # (in C, as a stuck XLA loop would be)


def test_watchdog_ends_a_hanging_test():
    env = dict(os.environ, LINEAX_WATCHDOG_TARGET="1", LINEAX_TEST_TIMEOUT="1")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        + ["-o", "addopts=", f"{__file__}::test_watchdog_target_hangs"],
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    )
    # Serially (as here) the process just ends, its stack dump in pytest's
    # captured output; under pytest-xdist (the default run) the worker's crash is
    # reported naming the test.
    assert proc.returncode != 0
    assert "passed" not in proc.stdout, proc.stdout[-2000:]
    assert time.monotonic() - start < 60
