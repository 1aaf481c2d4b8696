"""Timing helpers: compile time and run time, measured side by side.

Both sides of a comparison are always measured in the same process and their
repetitions are interleaved (ours, JAX's, ours, JAX's, ...), so that slow drift
in the machine's load (other processes compiling, CPU frequency changes) hits
both equally. Every reported number is a median.
"""

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax


def _fresh(fn: Callable) -> Callable:
    # A new function object each time, so that JAX's tracing cache (keyed on
    # the function's identity) cannot serve a previous trace.
    def wrapper(*args):
        return fn(*args)

    return wrapper


def jit_fresh(fn: Callable) -> Callable:
    """`jax.jit` of a fresh wrapper of `fn` (compiled on its first call)."""
    return jax.jit(_fresh(fn))


def compile_once(fn: Callable, args: Sequence[Any]) -> tuple[Any, float, float]:
    """Returns `(compiled, lower_seconds, compile_seconds)`.

    `lower_seconds` is tracing + lowering to StableHLO (Python-side cost, where
    a library adds its overhead); `compile_seconds` is XLA's compilation.
    """
    t0 = time.perf_counter()
    lowered = jax.jit(_fresh(fn)).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, t1 - t0, t2 - t1


def _block(out):
    return jax.block_until_ready(out)


def _one_sample(compiled, args, inner: int) -> float:
    t0 = time.perf_counter()
    for _ in range(inner):
        out = compiled(*args)
    _block(out)
    return (time.perf_counter() - t0) / inner


def compare_compile(
    fns: dict[str, Callable], args: dict[str, Sequence[Any]], reps: int
) -> dict[str, dict[str, Any]]:
    """Compiles each function `1 + reps` times, interleaved between sides.

    The first compile of each side is a warm-up (it pays one-off costs such as
    JAX populating the caches of its own internal `jit`s); the reported value
    is the median of the following `reps` compiles, or the first one when
    `reps == 0`. Returns, per side, the compiled executable and the timings.
    """
    results: dict[str, dict[str, Any]] = {}
    for name, fn in fns.items():
        compiled, lower_s, comp_s = compile_once(fn, args[name])
        results[name] = dict(
            compiled=compiled, first_s=lower_s + comp_s, lower=[lower_s], comp=[comp_s]
        )
    # When a single compile is slow (large GPU problems), fewer repetitions.
    slowest = max(r["first_s"] for r in results.values())
    if slowest > 5.0:
        reps = min(reps, 1)
    if reps > 0:
        for r in results.values():
            r["lower"].clear()
            r["comp"].clear()
        for _ in range(reps):
            for name, fn in fns.items():
                _, lower_s, comp_s = compile_once(fn, args[name])
                results[name]["lower"].append(lower_s)
                results[name]["comp"].append(comp_s)
    for r in results.values():
        totals = [a + b for a, b in zip(r["lower"], r["comp"])]
        r["compile_s"] = statistics.median(totals)
        r["lower_s"] = statistics.median(r["lower"])
        r["xla_compile_s"] = statistics.median(r["comp"])
        del r["lower"], r["comp"]
    return results


def compare_run(
    compiled: dict[str, Any],
    args: dict[str, Sequence[Any]],
    target_s: float,
    min_samples: int,
    max_samples: int,
) -> dict[str, dict[str, float]]:
    """Median run time of each jitted/compiled function, samples interleaved.

    Each sample times `inner` back-to-back calls (enough for ~1 ms, so the
    timer's resolution does not matter) and blocks on the last result. The
    number of samples adapts so each side takes about `target_s` in total.
    """
    # Warm-up call (first call may allocate buffers), then an estimate: the
    # fastest of a few calls, as one call stalled by a busy machine would give
    # `inner = 1`, and a side whose calls are not pipelined back to back pays
    # the dispatch latency in every sample (a 100x100 solve measured 4x slower).
    est = {}
    for name, c in compiled.items():
        _block(c(*args[name]))
        est[name] = max(min(_one_sample(c, args[name], 1) for _ in range(5)), 1e-7)
    inner = {name: max(1, int(1e-3 / t)) for name, t in est.items()}
    slowest_sample = max(est[n] * inner[n] for n in compiled)
    samples = int(target_s / slowest_sample)
    samples = max(min_samples, min(max_samples, samples))
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(samples):
        for name, c in compiled.items():
            times[name].append(_one_sample(c, args[name], inner[name]))
    return {
        name: dict(
            run_s=statistics.median(ts),
            samples=len(ts),
            inner=inner[name],
            run_min_s=min(ts),
        )
        for name, ts in times.items()
    }


def compare_python_calls(
    fns: dict[str, Callable], warmup: int, calls: int
) -> dict[str, dict[str, float]]:
    """Median wall time of un-jitted Python calls, interleaved call by call."""
    for fn in fns.values():
        for _ in range(warmup):
            _block(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(calls):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            _block(fn())
            times[name].append(time.perf_counter() - t0)
    return {
        name: dict(
            run_s=statistics.median(ts), samples=len(ts), inner=1, run_min_s=min(ts)
        )
        for name, ts in times.items()
    }
