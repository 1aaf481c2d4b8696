"""The per-call cost of an un-jitted small solve (issue 15), pinned by what runs
on each call, never by a clock.

Measured (10x10 float32, CPU, interleaved in one process, medians over 1500
rounds; see docs/performance.md): of `lx.linear_solve(lx.MatrixLinearOperator(A),
b)`, the Python around the compiled call is about 15 us (flatten, cache key,
unflatten of the `Solution`); the compiled call is the rest, set by XLA:CPU:
its hand-over of programs it estimates at 1000 flops or more to its thread pool
(a small jitted function: 0.70x `jnp.linalg.solve` at 426 flops, 2.49x at
1252), and a few us per output array (the `Solution` has eight).
This test guards what is already cheap: it passes on the code it was written
against."""

import sys

import jax
import jax.numpy as jnp
import numpy as np

import lineax as lx


def _system(n: int = 10) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((n, n)) + n * np.eye(n)
    return (
        jnp.asarray(matrix, jnp.float32),
        jnp.asarray(rng.standard_normal(n), jnp.float32),
    )


def _calls_of(fn) -> list[tuple[str, str]]:
    """The Python functions that `fn()` calls, as (file, name), in order."""
    calls = []

    def profile(frame, event, arg):
        del arg
        if event == "call":
            calls.append((frame.f_code.co_filename, frame.f_code.co_name))

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def test_warm_unjitted_solve_runs_no_python_dispatch_and_binds_no_method():
    # A warm call runs the cached `jax.jit` through JAX's C++ fast path (no
    # `_run_python_pjit`: a retrace or the Python dispatch, 100s of us), and
    # accesses no bound method of an Equinox module (each builds a new
    # `BoundMethod` module, 45-60 us measured: `operator.in_structure()`).
    matrix, vector = _system()

    def solve():
        return lx.linear_solve(lx.MatrixLinearOperator(matrix), vector)

    expected = np.linalg.solve(np.asarray(matrix), np.asarray(vector))
    np.testing.assert_allclose(solve().value, expected, rtol=1e-4)
    solve()  # the first call compiled; this one fills JAX's C++ cache
    calls = _calls_of(solve)
    names = {name for _, name in calls}
    assert "_run_python_pjit" not in names, sorted(names)
    bound = [c for c in calls if c[0].endswith("_prebuilt.py")]
    assert not bound, bound
    # The lineax functions on the path: the operator's construction (its
    # cached-structure metaclass), the entry, and the cache lookup. A new one
    # here is a per-call cost: measure it against `jnp.linalg.solve`.
    ours = [name for file, name in calls if "/lineax/" in file]
    assert len(ours) <= 9, ours
