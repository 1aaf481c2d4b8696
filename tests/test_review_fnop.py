"""Un-jitted solves of a function (or Jacobian) operator built once and solved
many times: compiled, as a matrix operator's are, once their solves op by op
have taken `_linear_solve._EAGER_BUDGET` seconds (see `_renting`).

Before, every such solve ran op by op (`is_cacheable` was `False` for these
operators): measured here (n = 10, float64, 2-core CPU, min of 100 calls),
7.5 ms a call for CG, 11 ms for GMRES, 8.3 ms for LU, 13 ms for CG of a
Jacobian operator; lineax 0.1.1 (`eqx.filter_jit`), 0.15-0.37 ms; now
0.16-0.24 ms once compiled. The compiled solve is keyed on the identity of the
closure-converted function's jaxpr, with the arrays it closes over as inputs,
so that a NumPy array closed over and mutated in place is read afresh (0.1.1
answered from its old values). An operator made anew on every call (a new
`lambda`) is never compiled: its jaxpr is never seen again. A function with no
closure (reading globals) is traced afresh on every solve, the compiled solve
found again by what the trace computes (`function.retraced`): before, op by op
(CG and LU 7-13 ms a call, n = 10 and 100, float32), now 0.5-1.4 ms (mostly
the trace), 0.1.1 0.15-0.4 ms, reading globals changed since its compile
stale.

Counted, never timed: traces of the compiled solve, solves op by op, entries of
`_COMPILED`. `_EAGER_BUDGET` is set to 0 (compile from the second solve on),
or to infinity, to make the counts deterministic; its default is a time.
"""

# The operators' functions close over NumPy arrays on purpose: `ndarray @ Array`
# is an `Array` at run time (JAX's `__rmatmul__`), an ndarray to pyright (hence
# its `reportReturnType` ignores).

import gc
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import Array, Float

import lineax as lx
import lineax._linear_solve as linear_solve_module


_N = 4
_STRUCT = jax.ShapeDtypeStruct((_N,), jnp.float64)
_CG = lx.CG(rtol=1e-12, atol=1e-12, max_steps=50)
_GMRES = lx.GMRES(rtol=1e-12, atol=1e-12, max_steps=50)
_LU = lx.LU()
_SPD_TAGS = (lx.positive_semidefinite_tag, lx.symmetric_tag)


def _spd(seed: int) -> Float[np.ndarray, "n n"]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((_N, _N))
    return a @ a.T + _N * np.eye(_N)


def _function_operator(
    matrix: Float[np.ndarray, "n n"], **kwargs
) -> lx.FunctionLinearOperator:
    """A new function closing over `matrix` (a NumPy array, not copied)."""

    def fn(v: Float[Array, " n"]) -> Float[Array, " n"]:
        return matrix @ v  # pyright: ignore[reportReturnType]

    return lx.FunctionLinearOperator(fn, _STRUCT, _SPD_TAGS, **kwargs)


def _jacobian_operator(matrix: Float[np.ndarray, "n n"]) -> lx.JacobianLinearOperator:
    def fn(x: Float[Array, " n"], args: None) -> Float[Array, " n"]:
        del args
        return matrix @ x + 0.5 * x  # pyright: ignore[reportReturnType]

    return lx.JacobianLinearOperator(fn, jnp.zeros(_N), None, _SPD_TAGS)


_GLOBAL_MATRIX = _spd(7)


def _closure_free(v: Float[Array, " n"]) -> Float[Array, " n"]:
    # Reads a global: Equinox keeps a function without a closure as it is.
    return _GLOBAL_MATRIX @ v  # pyright: ignore[reportReturnType]


class _Counts:
    """Traces of the compiled solve (one per compile) and solves op by op (of
    the operators the policy keeps op by op: `_solved_op_by_op`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, budget: float):
        self.traces = 0
        self.op_by_op = 0
        module = linear_solve_module
        monkeypatch.setattr(module, "_COMPILED", {})
        # (`raising=False`: so that the counts, not a missing name, fail on the
        # code before the change.)
        monkeypatch.setattr(module, "_EAGER_BUDGET", budget, raising=False)
        monkeypatch.setattr(module, "_EAGER_SPENT", {}, raising=False)
        solve_of_leaves = module._solve_of_leaves
        solved_op_by_op = getattr(module, "_solved_op_by_op", None)

        def counted_solve_of_leaves(*args):
            solve = solve_of_leaves(*args)

            def traced(leaves):
                self.traces += 1
                return solve(leaves)

            return traced

        def counted_op_by_op(*args):
            self.op_by_op += 1
            assert solved_op_by_op is not None
            return solved_op_by_op(*args)

        monkeypatch.setattr(module, "_solve_of_leaves", counted_solve_of_leaves)
        monkeypatch.setattr(module, "_solved_op_by_op", counted_op_by_op, raising=False)

    @property
    def entries(self) -> int:
        return len(linear_solve_module._COMPILED)


@pytest.mark.parametrize(
    "make, solver",
    [
        (_function_operator, _LU),
        (_function_operator, _CG),
        (_function_operator, _GMRES),
        (_jacobian_operator, _CG),
    ],
    ids=["function-LU", "function-CG", "function-GMRES", "jacobian-CG"],
)
def test_operator_built_once_compiles_one_solve_and_reads_its_numpy_closure(
    monkeypatch, make, solver
):
    # The first solve op by op; from the second on one compiled function,
    # traced once; the NumPy array closed over, mutated in place, is read by
    # the compiled solve (an input, not a constant of its trace). On the code
    # before: no trace, every solve op by op.
    counts = _Counts(monkeypatch, budget=0.0)
    matrix = _spd(0)
    shift = 0.5 if make is _jacobian_operator else 0.0
    operator = make(matrix)
    b = np.arange(1.0, _N + 1)
    for call in range(4):
        value = lx.linear_solve(operator, b, solver).value
        expected = np.linalg.solve(matrix + shift * np.eye(_N), b)
        np.testing.assert_allclose(value, expected, rtol=1e-10)
        assert (counts.op_by_op, counts.traces) == (1, min(call, 1)), call
    assert counts.entries == 1
    matrix[:] = _spd(1)
    value = lx.linear_solve(operator, b, solver).value
    expected = np.linalg.solve(matrix + shift * np.eye(_N), b)
    np.testing.assert_allclose(value, expected, rtol=1e-10)
    assert (counts.op_by_op, counts.traces, counts.entries) == (1, 1, 1)


def test_operators_made_anew_are_never_compiled(monkeypatch):
    # A new function per call has a new jaxpr: never sighted again, so solved
    # op by op every time (even with no budget at all), and forgotten with it.
    counts = _Counts(monkeypatch, budget=0.0)
    b = np.ones(_N)
    for seed in range(4):
        matrix = _spd(seed)
        value = lx.linear_solve(_function_operator(matrix), b, _LU).value
        np.testing.assert_allclose(value, np.linalg.solve(matrix, b), rtol=1e-10)
    assert (counts.op_by_op, counts.traces, counts.entries) == (4, 0, 0)


def _scaling(scale: Float[np.ndarray, " n"]) -> lx.FunctionLinearOperator:
    def fn(v: Float[Array, " n"]) -> Float[Array, " n"]:
        return scale * v  # pyright: ignore[reportReturnType]

    return lx.FunctionLinearOperator(fn, _STRUCT, _SPD_TAGS)


def test_fresh_preconditioners_of_one_operator_are_never_compiled(monkeypatch):
    # One operator, a preconditioner made anew for each solve: each key is new,
    # including where a new jaxpr takes the `id` of one freed (its time is not
    # inherited). The record of times stays bounded.
    counts = _Counts(monkeypatch, budget=0.0)
    monkeypatch.setattr(linear_solve_module, "_EAGER_SPENT_MAX", 3, raising=False)
    matrix = _spd(10)
    operator = _function_operator(matrix)
    b = np.ones(_N)
    for k in range(5):
        preconditioner = _scaling(np.full(_N, 1.0 / (k + 1)))
        value = lx.linear_solve(
            operator, b, _CG, options={"preconditioner": preconditioner}
        ).value
        np.testing.assert_allclose(value, np.linalg.solve(matrix, b), rtol=1e-10)
        del preconditioner
        gc.collect()
        assert len(linear_solve_module._EAGER_SPENT) <= 3
    assert (counts.op_by_op, counts.traces, counts.entries) == (5, 0, 0)


def test_solves_are_compiled_once_their_time_op_by_op_reaches_the_budget(
    monkeypatch,
):
    # Per key (operator, solver, ...): the time op by op is summed, and the
    # solve is compiled once it reaches the budget.
    counts = _Counts(monkeypatch, budget=float("inf"))
    matrix = _spd(2)
    operator = _function_operator(matrix)
    b = np.ones(_N)
    for _ in range(3):
        lx.linear_solve(operator, b, _LU)
    assert (counts.op_by_op, counts.traces) == (3, 0)
    (spent,) = linear_solve_module._EAGER_SPENT.values()
    assert spent > 0
    # Another solver is another key, with no time of its own yet.
    lx.linear_solve(operator, b, _CG)
    assert (counts.op_by_op, counts.traces) == (4, 0)
    monkeypatch.setattr(linear_solve_module, "_EAGER_BUDGET", spent)
    value = lx.linear_solve(operator, b, _LU).value
    np.testing.assert_allclose(value, np.linalg.solve(matrix, b), rtol=1e-10)
    assert (counts.op_by_op, counts.traces, counts.entries) == (4, 1, 1)


def test_unconverted_functions_stay_op_by_op(monkeypatch):
    # `closure_convert=False` keeps the user's function, whose closure a
    # compiled solve would bake in: op by op, reading a NumPy array mutated in
    # place on every solve.
    counts = _Counts(monkeypatch, budget=0.0)
    matrix = _spd(3)
    unconverted = _function_operator(matrix, closure_convert=False)
    b = np.ones(_N)
    for _ in range(2):
        for solver in (_LU, _CG):
            value = lx.linear_solve(unconverted, b, solver).value
            np.testing.assert_allclose(value, np.linalg.solve(matrix, b), rtol=1e-10)
        matrix *= 2.0
    assert (counts.traces, counts.entries) == (0, 0)


def _stencil(v: Float[Array, " n"]) -> Float[Array, " n"]:
    # No closure, no array: Equinox keeps it as it is (`_TrivialClosureConvert`).
    return 2.5 * v - jnp.roll(v, 1) - jnp.roll(v, -1)


def _stencil_jacobian(x: Float[Array, " n"], args: None) -> Float[Array, " n"]:
    del args
    return _stencil(x) + _GLOBAL_MATRIX @ x


_STENCIL_MATRIX = (
    2.5 * np.eye(_N) - np.roll(np.eye(_N), 1, 0) - np.roll(np.eye(_N), -1, 0)
)


@pytest.mark.parametrize("jacobian", [False, True], ids=["function", "jacobian"])
def test_closure_free_operator_built_once_compiles_once(monkeypatch, jacobian):
    # A function without a closure, traced afresh on every solve: one compiled
    # solve per solver, found again on each later solve (its jaxpr is the first
    # one traced for that computation). On the code before: op by op, no trace.
    counts = _Counts(monkeypatch, budget=0.0)
    if jacobian:
        operator = lx.JacobianLinearOperator(
            _stencil_jacobian, jnp.zeros(_N), None, _SPD_TAGS
        )
        matrix = _STENCIL_MATRIX + _GLOBAL_MATRIX
    else:
        operator = lx.FunctionLinearOperator(_stencil, _STRUCT, _SPD_TAGS)
        matrix = _STENCIL_MATRIX
    b = np.arange(1.0, _N + 1)
    for _ in range(4):
        for solver in (_LU, _CG):
            value = lx.linear_solve(operator, b, solver).value
            np.testing.assert_allclose(value, np.linalg.solve(matrix, b), rtol=1e-10)
    # Per solver: the first solve op by op, then one trace of the compiled solve.
    assert (counts.op_by_op, counts.traces, counts.entries) == (2, 2, 2)


_G = _spd(10)


def _reads_g(v: Float[Array, " n"]) -> Float[Array, " n"]:
    return _G @ v  # pyright: ignore[reportReturnType]


def test_global_mutated_or_rebound_is_read_afresh_when_compiled(monkeypatch):
    # A global NumPy array mutated in place, then rebound to another NumPy
    # array and to a JAX array of the same shape: each read by the compiled
    # solve (an input, as the current value of the global at each solve's
    # trace of the function), not baked in at its compile (as `jax.jit` and
    # lineax 0.1.1 do). On the code before: right, but op by op (no trace).
    global _G
    counts = _Counts(monkeypatch, budget=0.0)
    operator = lx.FunctionLinearOperator(_reads_g, _STRUCT, _SPD_TAGS)
    b = np.arange(1.0, _N + 1)
    original = _G
    try:
        for change in range(5):
            for solver in (_LU, _CG):
                for _ in range(2):
                    value = lx.linear_solve(operator, b, solver).value
                    expected = np.linalg.solve(np.asarray(_G), b)
                    np.testing.assert_allclose(value, expected, rtol=1e-10)
            if change == 0:
                _G[:] *= 2.0
            elif change == 1:
                _G[0, 0] += 3.0
            elif change == 2:
                _G = _spd(11)
            elif change == 3:
                _G = jnp.asarray(_spd(12))
    finally:
        _G = original
    # One compiled solve per solver, never compiled again.
    assert (counts.op_by_op, counts.traces, counts.entries) == (2, 2, 2)


_D = np.linspace(1.0, 2.0, _N)
_MODE = "diagonal"
_SCALE = 3.0


def _changing(v: Float[Array, " n"]) -> Float[Array, " n"]:
    if _MODE == "diagonal":
        return _D * v  # pyright: ignore[reportReturnType]
    return _SCALE * v + _STENCIL_MATRIX @ v


def test_changed_computation_is_traced_anew(monkeypatch):
    # A global rebound to another shape (broadcast to the same output), a
    # Python branch taken otherwise, a Python scalar changed (a literal of the
    # trace): a new computation each, compiled anew (not the stale one).
    global _D, _MODE, _SCALE
    counts = _Counts(monkeypatch, budget=0.0)
    operator = lx.FunctionLinearOperator(_changing, _STRUCT, _SPD_TAGS)
    b = np.arange(1.0, _N + 1)
    saved = (_D, _MODE, _SCALE)

    def matrix():
        if _MODE == "diagonal":
            return np.diag(np.broadcast_to(_D, (_N,)))
        return _SCALE * np.eye(_N) + _STENCIL_MATRIX

    try:
        for change in range(4):
            for solver in (_LU, _CG):
                for _ in range(2):
                    value = lx.linear_solve(operator, b, solver).value
                    expected = np.linalg.solve(matrix(), b)
                    np.testing.assert_allclose(value, expected, rtol=1e-10)
            if change == 0:
                _D = np.array([4.0])
            elif change == 1:
                _MODE = "stencil"
            elif change == 2:
                _SCALE = 5.0
    finally:
        _D, _MODE, _SCALE = saved
    # Four computations, each solved op by op once then compiled, per solver.
    assert (counts.op_by_op, counts.traces, counts.entries) == (8, 8, 8)


def _check_vector_derivatives(
    operator: lx.AbstractLinearOperator,
    inverse: Float[np.ndarray, "n n"],
    repeats: int,
) -> None:
    """Un-jitted `jax.grad` and `jax.jvp` of LU and CG solves of `operator` with
    respect to the vector, `repeats` times each, against its `inverse`."""
    b = np.arange(1.0, _N + 1)
    w = np.linspace(-1.0, 1.0, _N)
    for solver in (_LU, _CG):

        def weighted(v: Float[Array, " n"], solver=solver) -> Float[Array, ""]:
            return lx.linear_solve(operator, v, solver).value @ w

        def solve(v: Float[Array, " n"], solver=solver) -> Float[Array, " n"]:
            return lx.linear_solve(operator, v, solver).value

        for _ in range(repeats):
            grad = jax.grad(weighted)(jnp.asarray(b))
            np.testing.assert_allclose(grad, inverse.T @ w, rtol=1e-10)
            primal, tangent = jax.jvp(solve, (jnp.asarray(b),), (jnp.asarray(w),))
            np.testing.assert_allclose(primal, inverse @ b, rtol=1e-10)
            np.testing.assert_allclose(tangent, inverse @ w, rtol=1e-10)


def test_gradients_of_a_closure_free_operator(monkeypatch):
    # Un-jitted `jax.grad` and `jax.jvp` with respect to the vector: the
    # function traced afresh (as un-transformed), its solve jitted once per
    # solver (kept as it was, a global rebound was read stale: see
    # `test_transformed_krylov_solves_read_a_rebound_global`).
    counts = _Counts(monkeypatch, budget=0.0)
    operator = lx.FunctionLinearOperator(_stencil, _STRUCT, _SPD_TAGS)
    _check_vector_derivatives(operator, np.linalg.inv(_STENCIL_MATRIX), repeats=2)
    assert counts.traces == 2


def test_gradients_and_jvps_of_a_compiled_solve(monkeypatch):
    # Un-jitted `jax.grad` and `jax.jvp` with respect to the vector take the
    # jitted path (`_run_jitted`), compiled from the second call; with respect
    # to the matrix closed over, the operator is made inside the transformed
    # function (new each call: op by op). All against NumPy.
    counts = _Counts(monkeypatch, budget=0.0)
    matrix = _spd(4)
    operator = _function_operator(matrix)
    b = np.arange(1.0, _N + 1)
    w = np.linspace(-1.0, 1.0, _N)
    inverse = np.linalg.inv(matrix)
    _check_vector_derivatives(operator, inverse, repeats=3)
    # Per solver: the first `grad` op by op, then one jitted solve, traced once
    # (JAX differentiates the trace, under `grad` and `jvp` alike).
    assert (counts.op_by_op, counts.traces) == (2, 2)

    def of_matrix(m: Float[Array, "n n"]) -> Float[Array, " n"]:
        op = lx.FunctionLinearOperator(lambda v: m @ v, _STRUCT, _SPD_TAGS)
        return lx.linear_solve(op, jnp.asarray(b), _CG).value

    dm = np.outer(w, b)
    for _ in range(2):
        _, tangent = jax.jvp(of_matrix, (jnp.asarray(matrix),), (jnp.asarray(dm),))
        np.testing.assert_allclose(
            tangent, -inverse @ dm @ inverse @ b, rtol=1e-9, atol=1e-12
        )
    assert (counts.op_by_op, counts.traces) == (4, 2)


def test_failed_solves_report_as_op_by_op(monkeypatch):
    # A compiled solve that fails is solved again op by op (a function
    # operator's arrays are not all read by its action): the same result code
    # with `throw=False`, the same message with `throw=True`, on every call.
    counts = _Counts(monkeypatch, budget=0.0)
    singular = _spd(5)
    singular[1] = 0.0
    operator = lx.FunctionLinearOperator(lambda v: singular @ v, _STRUCT)
    b = np.ones(_N)
    slow = lx.CG(rtol=1e-14, atol=1e-14, max_steps=1)
    spd_operator = _function_operator(_spd(6))
    cases = (
        (operator, _LU, lx.RESULTS.singular),
        (spd_operator, slow, lx.RESULTS.max_steps_reached),
    )
    for op, solver, code in cases:
        messages = []
        for _ in range(3):
            assert lx.linear_solve(op, b, solver, throw=False).result == code
            with pytest.raises(Exception) as info:  # noqa: PT011
                lx.linear_solve(op, b, solver)
            messages.append(str(info.value))
        assert messages[0] == messages[1] == messages[2], messages
    # (Compiled: the key of `throw=False` and `throw=True` is one, checks on
    # the host.)
    assert counts.traces == 2


def test_concurrent_solves_of_one_operator(monkeypatch):
    # Threads solving one operator at once, sighting it and compiling it
    # concurrently: right answers, one compiled function.
    counts = _Counts(monkeypatch, budget=0.0)
    matrix = _spd(8)
    operator = _function_operator(matrix)
    expected = np.linalg.solve(matrix, np.ones(_N))
    errors = []
    barrier = threading.Barrier(4)

    def worker():
        try:
            barrier.wait()
            for _ in range(3):
                value = lx.linear_solve(operator, np.ones(_N), _LU).value
                np.testing.assert_allclose(value, expected, rtol=1e-10)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(repr(error))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert errors == []
    assert counts.entries == 1
    assert 1 <= counts.traces <= 4


def test_compiled_solve_after_clear_caches(monkeypatch):
    # `jax.clear_caches()` empties the compiled function's own cache: traced
    # again, same answer.
    counts = _Counts(monkeypatch, budget=0.0)
    matrix = _spd(9)
    operator = _function_operator(matrix)
    b = np.ones(_N)
    for _ in range(2):
        lx.linear_solve(operator, b, _LU)
    jax.clear_caches()
    value = lx.linear_solve(operator, b, _LU).value
    np.testing.assert_allclose(value, np.linalg.solve(matrix, b), rtol=1e-10)
    assert (counts.op_by_op, counts.traces, counts.entries) == (1, 2, 1)


_ANGLE_Y = 0.0


def _angle_scaled(v: Float[Array, " n"]) -> Float[Array, " n"]:
    # `_ANGLE_Y` is a literal of the trace: atan2(+0.0, -1) = pi, but
    # atan2(-0.0, -1) = -pi, though -0.0 == 0.0 in Python; NaN is read as 1.
    y = jnp.nan_to_num(_ANGLE_Y, nan=1.0)
    return jnp.arctan2(y, -1.0) * (_STENCIL_MATRIX @ v)


def test_literals_told_apart_by_their_bits(monkeypatch):
    # A global rebound from 0.0 to -0.0 is a new computation (it was keyed as
    # the same one and answered with the opposite sign); a NaN literal is the
    # same computation on every solve (it was keyed anew on each, and never
    # compiled). Op by op was right throughout.
    global _ANGLE_Y
    counts = _Counts(monkeypatch, budget=0.0)
    operator = lx.FunctionLinearOperator(_angle_scaled, _STRUCT)
    b = np.arange(1.0, _N + 1)
    try:
        for y in (0.0, -0.0, float("nan")):
            _ANGLE_Y = y
            matrix = np.arctan2(np.nan_to_num(y, nan=1.0), -1.0) * _STENCIL_MATRIX
            for _ in range(3):
                value = lx.linear_solve(operator, b, _LU).value
                expected = np.linalg.solve(matrix, b)
                np.testing.assert_allclose(value, expected, rtol=1e-10)
    finally:
        _ANGLE_Y = 0.0
    # Three computations, each solved op by op once, then compiled once.
    assert (counts.op_by_op, counts.traces, counts.entries) == (3, 3, 3)


def _solves_inside(v: Float[Array, " n"]) -> Float[Array, " n"]:
    # `custom_linear_solve` without a transpose solve: `None` among the jaxprs
    # of its parameters.
    inner = jax.lax.custom_linear_solve(lambda x: 2.0 * x, v, lambda _, w: w / 2.0)
    return _STENCIL_MATRIX @ v + inner


def test_custom_linear_solve_without_transpose_inside_the_function(monkeypatch):
    # The key of its trace raised AttributeError ('NoneType' object has no
    # attribute 'constvars') out of every un-jitted solve, the first included,
    # whatever the budget; op by op it was right.
    counts = _Counts(monkeypatch, budget=0.0)
    operator = lx.FunctionLinearOperator(_solves_inside, _STRUCT)
    b = np.arange(1.0, _N + 1)
    expected = np.linalg.solve(_STENCIL_MATRIX + 0.5 * np.eye(_N), b)
    for _ in range(3):
        value = lx.linear_solve(operator, b, _LU).value
        np.testing.assert_allclose(value, expected, rtol=1e-10)
    assert (counts.op_by_op, counts.traces, counts.entries) == (1, 1, 1)


_H = _spd(13)


def _reads_h(v: Float[Array, " n"]) -> Float[Array, " n"]:
    return _H @ v  # pyright: ignore[reportReturnType]


@pytest.mark.parametrize("budget", [0.0, float("inf")], ids=["compiled", "op-by-op"])
def test_transformed_krylov_solves_read_a_rebound_global(monkeypatch, budget):
    # Un-jitted `jax.vmap`, `jax.grad` and `jax.jvp` of a CG solve of a function
    # reading a global: the global rebound between them was read stale (the
    # values of the first solve's trace), whatever the budget; `LU` was right.
    global _H
    _Counts(monkeypatch, budget=budget)
    operator = lx.FunctionLinearOperator(_reads_h, _STRUCT, _SPD_TAGS)
    b = np.arange(1.0, _N + 1)
    w = np.linspace(-1.0, 1.0, _N)

    def solve(vector: Float[Array, " n"]) -> Float[Array, " n"]:
        return lx.linear_solve(operator, vector, _CG).value

    original = _H
    try:
        for seed in (13, 14):
            _H = _spd(seed)
            inverse = np.linalg.inv(_H)
            batched = jax.vmap(solve)(jnp.stack([b, w]))
            np.testing.assert_allclose(batched[1], inverse @ w, rtol=1e-8)
            gradient = jax.grad(lambda v: solve(v) @ w)(b)
            np.testing.assert_allclose(gradient, inverse.T @ w, rtol=1e-8)
            value, tangent = jax.jvp(solve, (b,), (w,))
            np.testing.assert_allclose(value, inverse @ b, rtol=1e-8)
            np.testing.assert_allclose(tangent, inverse @ w, rtol=1e-8)
    finally:
        _H = original


def _scaled_operators(
    matrix: Float[np.ndarray, "n n"],
) -> dict[str, tuple[lx.AbstractLinearOperator, np.ndarray]]:
    """Operators scaled by Python numbers, with their matrices."""
    op = lx.MatrixLinearOperator(jnp.asarray(matrix), lx.positive_semidefinite_tag)
    identity = lx.IdentityLinearOperator(_STRUCT)
    eye = np.eye(_N)
    return {
        "2.0*op": (2.0 * op, 2.0 * matrix),
        "3.0*op": (3.0 * op, 3.0 * matrix),
        "2*op": (2 * op, 2.0 * matrix),
        "op/4.0": (op / 4.0, matrix / 4.0),
        "op+0.5*I": (op + 0.5 * identity, matrix + 0.5 * eye),
        "-0.0*op+I": (-0.0 * op + identity, eye),
        "1j*op": (1j * op, 1j * matrix),
    }


@pytest.mark.parametrize("solver", [_LU, _CG], ids=["LU", "CG"])
def test_operators_scaled_by_python_numbers_are_compiled_per_value(monkeypatch, solver):
    # `2.0 * operator` or `operator + 0.5 * identity` holds a Python number,
    # whose sign decides the definiteness tags (CG needs them): so it is static,
    # and the compiled solve is keyed on its type and value. Before, every such
    # solve ran op by op (8.8 ms against 0.2 ms for a matrix operator, n = 10):
    # no trace was ever made. Each value is compiled once, after one solve op
    # by op (budget 0); a value solved again finds its compiled solve, and one
    # value is never answered from another's (2 and 2.0 scale alike, -0.0 and
    # 0.0 are equal but distinct keys).
    counts = _Counts(monkeypatch, budget=0.0)
    matrix = _spd(3)
    b = np.arange(1.0, _N + 1)
    cases = _scaled_operators(matrix)
    if solver is _CG:
        # (CG: those tagged definite; `1j * op` is not, nor `-0.0 * op + I`: a
        # zero scale has no sign.)
        cases = {k: v for k, v in cases.items() if k not in ("1j*op", "-0.0*op+I")}
    for number, (name, (operator, dense)) in enumerate(cases.items()):
        for call in range(3):
            value = lx.linear_solve(operator, b, solver).value
            expected = np.linalg.solve(dense, b)
            np.testing.assert_allclose(value, expected, rtol=1e-9, err_msg=name)
            assert (counts.op_by_op, counts.traces) == (
                number + 1,
                number + min(call, 1),
            ), (name, call)
    assert counts.entries == len(cases)
