"""Adversarial review of lineax's caches and process-global state: the compiled
un-jitted solves (`_linear_solve._COMPILED`, `_SOLVER_KEYS`, `_EXPECTED_STATES`),
the primitive's traces (`_primitive._ABSTRACT_EVALS`, `_TRACES`,
`_IMPL_TRACES`) and `MatrixLinearOperator`'s construction cache.

Probed (and found right, so guarded here): the JAX configuration changed
between cached calls (`jax_enable_x64` both ways, with and without `state=`;
checked by hand: `default_device` with two CPU devices, committed and not,
`default_matmul_precision`, `numpy_dtype_promotion`, `numpy_rank_promotion`,
`transfer_guard`, `debug_nans`/`debug_infs`, `disable_jit`, `clear_caches`);
the same structure with other vector dtypes, `throw`, `y0` and singular
matrices, in either order (336 cases, identical); a function operator closing
over a NumPy array mutated in place; threads making and evicting entries
concurrently. Defects fixed: the compiled cache was written without its lock
on the static-output path (`test_every_write_to_the_compiled_cache_holds_its_lock`);
three caches were read as `key in cache` then `cache[key]`, a `KeyError` where
another thread emptied them in between
(`test_cache_lookups_survive_a_concurrent_clear`).
"""

import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_at_default_flags
from helpers import NegatingLU
from jaxtyping import Array, Float

import lineax as lx
import lineax._linear_solve as linear_solve_module
import lineax._primitive as primitive_module


class _LockCheckedDict(dict):
    """A `_COMPILED` that records, at each write, whether its lock was held."""

    def __init__(self):
        super().__init__()
        self.unlocked_writes = 0

    def __setitem__(self, key, value):
        if not linear_solve_module._COMPILED_LOCK.locked():
            self.unlocked_writes += 1
        super().__setitem__(key, value)


def test_every_write_to_the_compiled_cache_holds_its_lock(monkeypatch):
    # `_static_output` stored its compiled function (and `_EAGER`) in `_COMPILED`
    # without `_COMPILED_LOCK`: a solve from another thread evicting entries at
    # that moment (`del _COMPILED[next(iter(_COMPILED))]`) could raise
    # `RuntimeError: dictionary changed size during iteration` out of a user's
    # `linear_solve`, and an entry evicted meanwhile came back above
    # `_COMPILED_MAX`. Every write now holds the lock.
    cache = _LockCheckedDict()
    monkeypatch.setattr(linear_solve_module, "_COMPILED", cache)
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((4, 4)) + 4 * np.eye(4)
    b = rng.standard_normal(4)
    for scale in (1.0, 2.0):
        solution = lx.linear_solve(
            lx.MatrixLinearOperator(jnp.asarray(matrix)),
            jnp.asarray(scale * b),
            NegatingLU(),
        )
        np.testing.assert_allclose(
            solution.value, -np.linalg.solve(matrix, scale * b), rtol=1e-10
        )
    assert len(cache) == 1
    assert cache.unlocked_writes == 0


def test_static_output_entries_respect_the_bound(monkeypatch):
    # With room for one entry, solves alternating between the static-output path
    # and an ordinary one evict each other; the cache never holds more.
    monkeypatch.setattr(linear_solve_module, "_COMPILED", {})
    monkeypatch.setattr(linear_solve_module, "_COMPILED_MAX", 1)
    rng = np.random.default_rng(1)
    matrix = rng.standard_normal((3, 3)) + 3 * np.eye(3)
    op = lx.MatrixLinearOperator(jnp.asarray(matrix))
    b = jnp.asarray(rng.standard_normal(3))
    expected = np.linalg.solve(matrix, b)
    for solver, sign in ((NegatingLU(), -1), (lx.LU(), 1)) * 2:
        np.testing.assert_allclose(
            lx.linear_solve(op, b, solver).value, sign * expected, rtol=1e-10
        )
        assert len(linear_solve_module._COMPILED) <= 1


def test_caches_stay_bounded_and_right_after_eviction(monkeypatch):
    # Many structures (tags) and shapes through small caches: every answer right,
    # evicted entries rebuilt, no cache above its bound.
    monkeypatch.setattr(linear_solve_module, "_COMPILED", {})
    monkeypatch.setattr(linear_solve_module, "_COMPILED_MAX", 2)
    for cache in (
        primitive_module._ABSTRACT_EVALS,
        primitive_module._TRACES,
        primitive_module._IMPL_TRACES,
    ):
        monkeypatch.setattr(cache, "max_size", 3)
    tag_sets = ((), (lx.symmetric_tag,), (lx.unit_diagonal_tag,), (lx.diagonal_tag,))
    rng = np.random.default_rng(2)
    for round_ in range(2):
        for i, tags in enumerate(tag_sets):
            n = 2 + (i + round_) % 3
            matrix = np.diag(rng.uniform(1, 2, n))  # satisfies every tag above
            if lx.unit_diagonal_tag in tags:
                matrix = np.eye(n)
            b = rng.standard_normal(n)
            solution = lx.linear_solve(
                lx.MatrixLinearOperator(jnp.asarray(matrix), tags),
                jnp.asarray(b),
                lx.LU(),
            )
            np.testing.assert_allclose(
                solution.value, np.linalg.solve(matrix, b), rtol=1e-12
            )
            assert len(linear_solve_module._COMPILED) <= 2
            for cache in (primitive_module._ABSTRACT_EVALS, primitive_module._TRACES):
                assert len(cache) <= 3


def test_function_operator_sees_a_mutated_numpy_closure_in_every_solver():
    # A function closing over a NumPy array that is later mutated in place: the
    # operator holds the array (by closure conversion), and every solver, direct
    # or iterative (CG), un-jitted or jitted, reads its current values. (None may
    # answer from a cached trace holding the old ones, as lineax 0.1.1 did: its
    # `LU`, `CG` and `GMRES` returned the solution of the old matrix, its
    # `jax.jit`ted solve that of the new one.)
    n = 4
    matrix = 2.0 * np.eye(n)
    b = np.ones(n)
    struct = jax.ShapeDtypeStruct((n,), jnp.float64)

    def fn(x: Float[Array, " n"]) -> Float[Array, " n"]:
        return jnp.matmul(matrix, x)  # what `matrix @ x` dispatches to

    tags = (lx.positive_semidefinite_tag, lx.diagonal_tag)
    solvers = (
        lx.LU(),
        lx.CG(rtol=1e-10, atol=1e-10, max_steps=20),
        lx.Diagonal(),
    )
    op = lx.FunctionLinearOperator(fn, struct, tags)
    for solver in solvers:
        np.testing.assert_allclose(lx.linear_solve(op, b, solver).value, 0.5)
    matrix[:] = 4.0 * np.eye(n)
    for solver in solvers:
        for operator in (op, lx.FunctionLinearOperator(fn, struct, tags)):
            np.testing.assert_allclose(lx.linear_solve(operator, b, solver).value, 0.25)
        jitted = jax.jit(lambda v, s=solver: lx.linear_solve(op, v, s).value)
        np.testing.assert_allclose(jitted(b), 0.25)


_THREADS = """
import threading, numpy as np, jax, jax.numpy as jnp, lineax as lx
import lineax._linear_solve as ls
ls._COMPILED_MAX = 2  # evictions while other threads insert
# (`helpers.NegatingLU`, written out: importing `helpers` imports `conftest`, which
# would turn on x64 and strict promotion in this process, run at the defaults.)
class NegatingLU(lx.AbstractLinearSolver):
    def init(self, operator, options):
        return lx.LU().init(operator, options), jnp.negative
    def compute(self, state, vector, options):
        state, negate = state
        x, result, stats = lx.LU().compute(state, vector, options)
        return negate(x), result, stats
    def transpose(self, state, options):
        raise NotImplementedError
    def conj(self, state, options):
        raise NotImplementedError
    def assume_full_rank(self):
        return True
rng = np.random.default_rng(0)
systems = []
for n in (3, 4):
    a = rng.standard_normal((n, n)).astype(np.float32)
    systems.append((a @ a.T + n * np.eye(n, dtype=np.float32),
                    rng.standard_normal(n).astype(np.float32)))
solvers = [(lx.LU(), 1), (lx.Cholesky(), 1), (NegatingLU(), -1)]
def solve(i, j, grad):
    a, b = systems[i]
    solver, sign = solvers[j]
    op = lx.MatrixLinearOperator(jnp.asarray(a), lx.positive_semidefinite_tag)
    if grad and sign == 1:
        f = lambda v: jnp.sum(lx.linear_solve(op, v, solver).value)
        want = np.linalg.solve(a.T, np.ones_like(b))
        return np.asarray(jax.grad(f)(jnp.asarray(b))), want
    want = sign * np.linalg.solve(a.astype(np.float64), b)
    return np.asarray(lx.linear_solve(op, jnp.asarray(b), solver).value), want
failures = []
barrier = threading.Barrier(8)
def worker(t):
    try:
        barrier.wait()  # first calls (cache misses) at once
        for k in range(6):
            got, want = solve((k + t) % 2, (k * 2 + t) % 3, (k + t) % 3 == 0)
            if not np.allclose(got, want, rtol=1e-3, atol=1e-4):
                failures.append((t, k, float(np.abs(got - want).max())))
    except BaseException as error:
        failures.append((t, repr(error)))
threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
for thread in threads: thread.start()
for thread in threads: thread.join()
assert len(ls._COMPILED) <= 2, len(ls._COMPILED)
print("FAILURES", failures)
"""


def test_concurrent_solves_from_threads_are_right():
    # Eight threads make, reorder and evict cache entries at once (a cache of
    # two), static-output solves and `jax.grad` included: no exception, no
    # deadlock (the timeout), every answer NumPy's.
    proc = run_at_default_flags(_THREADS, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FAILURES []" in proc.stdout, proc.stdout[-3000:]


_X64_TOGGLE = """
import numpy as np, jax, jax.numpy as jnp, lineax as lx
rng = np.random.default_rng(0)
a = rng.standard_normal((5, 5)); a = a @ a.T + 5 * np.eye(5)
b = rng.standard_normal(5)
want = np.linalg.solve(a, b)
solvers = [lx.AutoLinearSolver(well_posed=True), lx.CG(1e-5, 1e-5, max_steps=50)]
for x64 in (False, True, False):
    jax.config.update("jax_enable_x64", x64)
    for dtype in (jnp.float32, jnp.float64) if x64 else (jnp.float32,):
        psd = lx.positive_semidefinite_tag
        op = lx.MatrixLinearOperator(jnp.asarray(a, dtype), psd)
        for solver in solvers:
            for state in (None, solver.init(op, {})):
                kwargs = {} if state is None else {"state": state}
                x = lx.linear_solve(op, jnp.asarray(b, dtype), solver, **kwargs).value
                assert x.dtype == dtype, (x64, dtype, solver, x.dtype)
                tol = 1e-4 if dtype == jnp.float32 else 1e-5
                x = np.asarray(x, np.float64)
                assert np.allclose(x, want, rtol=tol, atol=tol), (x64, dtype, solver)
        f = lambda v: lx.linear_solve(op, v).value.sum()
        g = jax.grad(f)(jnp.asarray(b, dtype))
        assert g.dtype == dtype
# Arrays made with x64 on, solved after it is turned off: a clear error naming the
# flag (was an internal `TypeError` from `lax.eq`, or an MLIR verifier error).
jax.config.update("jax_enable_x64", True)
a64, b64 = jnp.asarray(a), jnp.asarray(b)
jax.config.update("jax_enable_x64", False)
a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
for solver in solvers:
    for matrix, vector in ((a64, b64), (a64, b32), (a32, b64)):
        op = lx.MatrixLinearOperator(matrix, lx.positive_semidefinite_tag)
        calls = (
            lambda: lx.linear_solve(op, vector, solver),
            lambda: jax.jit(lambda v: lx.linear_solve(op, v, solver).value)(vector),
        )
        for call in calls:
            try:
                call()
            except ValueError as error:
                assert "jax_enable_x64" in str(error), error
                assert "float64" in str(error), error
            else:
                raise AssertionError((solver, matrix.dtype, vector.dtype))
print("OK")
"""


def test_x64_toggled_between_cached_calls():
    # The compiled solves, the traces and the states expected of `state=` are
    # cached per structure and shapes; toggling `jax_enable_x64` between calls
    # (a float32 operator solved in both modes, float64 in between) must give
    # the dtype and the answer of a fresh process each time; and 64-bit arrays
    # kept from x64 mode a clear error after it is turned off.
    proc = run_at_default_flags(_X64_TOGGLE, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout


@pytest.mark.exhaustive
def test_many_shapes_keep_the_caches_bounded():
    # 300 shapes un-jitted: one `_COMPILED` entry (per structure), traces capped.
    for n in range(2, 302):
        matrix = np.eye(n) * 2.0
        solution = lx.linear_solve(
            lx.MatrixLinearOperator(jnp.asarray(matrix)), jnp.ones(n), lx.LU()
        )
        np.testing.assert_allclose(solution.value, 0.5)
        assert len(linear_solve_module._COMPILED) <= linear_solve_module._COMPILED_MAX
        for cache in (
            primitive_module._ABSTRACT_EVALS,
            primitive_module._TRACES,
            primitive_module._IMPL_TRACES,
        ):
            assert len(cache) <= cache.max_size


def test_threads_share_one_entry_per_structure(monkeypatch):
    # In-process: four threads solving the same structure at once make one entry.
    monkeypatch.setattr(linear_solve_module, "_COMPILED", {})
    rng = np.random.default_rng(3)
    matrix = rng.standard_normal((3, 3)) + 3 * np.eye(3)
    b = rng.standard_normal(3)
    expected = np.linalg.solve(matrix, b)
    results: list = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        barrier.wait()
        results.append(
            np.asarray(
                lx.linear_solve(
                    lx.MatrixLinearOperator(jnp.asarray(matrix)), jnp.asarray(b)
                ).value
            )
        )

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 4
    for got in results:
        np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert len(linear_solve_module._COMPILED) == 1


class _EmptiedWhenTested(primitive_module._TraceCache):
    """A cache that another thread empties right after each membership test
    (its `put` of a full cache, or `jax.clear_caches()`): the race, made
    deterministic."""

    def __contains__(self, key: object) -> bool:
        found = super().__contains__(key)
        self.clear()
        return found


def test_cache_lookups_survive_a_concurrent_clear(monkeypatch):
    # The abstract evaluation, the trace of `compute` and the state expected of
    # `state=` were looked up as `key in cache` then `cache[key]`: emptied in
    # between by another thread (a full cache's `put` clears it; so does
    # `jax.clear_caches()`), the lookup raised `KeyError` out of the solve. Now
    # one `get`.
    for name in ("_ABSTRACT_EVALS", "_TRACES"):
        monkeypatch.setattr(primitive_module, name, _EmptiedWhenTested())
    monkeypatch.setattr(linear_solve_module, "_EXPECTED_STATES", _EmptiedWhenTested())
    rng = np.random.default_rng(4)
    matrix = rng.standard_normal((3, 3)) + 3 * np.eye(3)
    b = rng.standard_normal(3)
    # (`* 1.0`: a Python number in the operator, so not the compiled path: the
    # primitive is bound, and abstractly evaluated, on every call.)
    op = lx.MatrixLinearOperator(jnp.asarray(matrix)) * 1.0
    state = lx.LU().init(op, {})
    for _ in range(2):
        cases: tuple[dict[str, Any], ...] = ({}, {"state": state})
        for kwargs in cases:
            solution = lx.linear_solve(op, jnp.asarray(b), lx.LU(), **kwargs)
            np.testing.assert_allclose(
                solution.value, np.linalg.solve(matrix, b), rtol=1e-12
            )
