"""What the multi-device checks share: a worker script (`sharded_worker.py`,
`review_sharded_worker.py`) runs on 8 simulated CPU devices in a subprocess,
since the device count is fixed when JAX starts, and prints one line
`RESULT {json}` per check as soon as it is done, so that the results before a
crash still reach the test; the test module runs it once (`run_worker`) and
reads the results (`worker_result`).

A worker imports this module before JAX, and calls `configure_devices` first.
"""

import json
import os
import pathlib
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any


DEVICES = 8


def configure_devices(collective_timeout: int) -> None:
    """Worker side, before JAX is imported: 8 CPU devices, and a device left
    waiting in a collective aborts the process after `collective_timeout`
    seconds (40 by default), which a check of a failing sharded solve may
    cause."""
    if "jax" in sys.modules:
        return
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        flags += f" --xla_force_host_platform_device_count={DEVICES}"
    if "collective_call_terminate_timeout" not in flags:
        flags += (
            f" --xla_cpu_collective_call_terminate_timeout_seconds={collective_timeout}"
        )
    os.environ["XLA_FLAGS"] = flags.strip()


def emit(name: str, **fields: Any) -> None:
    print("RESULT " + json.dumps({"name": name, **fields}), flush=True)


def run(name: str, check: Callable[[], dict]) -> None:
    """Worker side: run one check and emit its fields (or its error)."""
    start = time.perf_counter()
    fields: dict[str, Any]
    try:
        fields = check()
    except Exception as e:
        fields = {"error": f"{type(e).__name__}: {e}"[:2000]}
        traceback.print_exc()
    fields["seconds"] = round(time.perf_counter() - start, 2)
    emit(name, **fields)


def run_worker(
    worker: pathlib.Path,
    args: Sequence[str],
    added_xla_flags: Sequence[str],
    collective_timeout: int,
    timeout: int,
) -> dict:
    """Test side: run `worker` with `args` on 8 devices, with the test session's
    XLA flags, and return its results by name (`_stderr`: the end of its
    standard error)."""
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = " ".join(
        [
            *added_xla_flags,
            f"--xla_force_host_platform_device_count={DEVICES}",
            f"--xla_cpu_collective_call_terminate_timeout_seconds={collective_timeout}",
        ]
    )
    src = str(worker.parent.parent / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    try:
        proc = subprocess.run(
            [sys.executable, str(worker), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        stdout, stderr = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout or ""
        stdout = stdout if isinstance(stdout, str) else stdout.decode()
        stderr = f"worker timed out after {timeout} s"
    out = {}
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            record = json.loads(line[len("RESULT ") :])
            out[record.pop("name")] = record
    out["_stderr"] = stderr[-3000:]
    return out


def worker_result(results: dict, name: str) -> dict:
    """Test side: the result of check `name`, failing the test if it is missing
    or reports an error."""
    import pytest

    if name not in results:
        pytest.fail(f"no result for {name!r}; worker stderr:\n{results['_stderr']}")
    record = results[name]
    assert "error" not in record, record["error"]
    return record
