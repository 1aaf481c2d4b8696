"""The per-call cost of an un-jitted small solve (issue 15), pinned by what runs
on each call, never by a clock.

Measured (10x10 float32, CPU, interleaved in one process; see
docs/performance.md): of `lx.linear_solve(lx.MatrixLinearOperator(A), b)`, the
Python around the compiled call is about 4 us (the operator's construction, the
cache key, the pending `Solution`); the compiled call is the rest, set by XLA:CPU:
its hand-over of programs it estimates at 1000 flops or more to its thread pool
(a small jitted function: 0.70x `jnp.linalg.solve` at 426 flops, 2.49x at
1252), and 1-2 us per output array (its lean program has two: the value and
the result code, which `throw=True` reads on the host).
The first test guards what is already cheap (it passed on the code it was
written against); the others, which of those programs XLA:CPU runs on the
calling thread, by its own cost analysis."""

import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lineax as lx
import lineax._linear_solve as linear_solve_module


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
    # metaclass), the entry, its flat path (`_run_flat`: no PyTree flatten), the
    # compiled call (`_lean_solution`) and the pending solution. A new one here
    # is a per-call cost, 2-3x what it costs in a loop of its own (the compiled
    # call empties the processor's caches): measure it against
    # `jnp.linalg.solve`.
    ours = [name for file, name in calls if "/lineax/" in file]
    assert len(ours) <= 5, ours
    assert "_run_flat" in names and "_run_compiled" not in names, sorted(names)


# XLA:CPU runs a program whose cost analysis is under 1000 flops on the calling
# thread, and hands any other to its thread pool and back (measured with
# `x * 2.0` on m elements: 999 flops ran on the calling thread, 1000 did not;
# the hand-over costs about 15 us, as much as all of `jnp.linalg.solve` at n =
# 10). Un-jitted LAPACK calls count no flops: the elementwise passes over n x n
# arrays (tests, norms, masks) are what the estimate counts.
_INLINE_FLOPS = 1000


def _eager_program(monkeypatch, operator, vector, solver):
    """The optimised program that `lx.linear_solve(operator, vector, solver)`
    runs when called un-jitted."""
    monkeypatch.setattr(linear_solve_module, "_COMPILED", {})
    lx.linear_solve(operator, vector, solver)
    (compiled,) = linear_solve_module._COMPILED.values()
    leaves = jax.tree_util.tree_leaves((operator, vector, None))
    return compiled.lower(leaves).compile()


def _operators(n: int, dtype):
    matrix, vector = _system(n)
    matrix, vector = matrix.astype(dtype), vector.astype(dtype)
    spd = lx.MatrixLinearOperator(
        matrix @ matrix.T + n * jnp.eye(n, dtype=dtype), lx.positive_semidefinite_tag
    )
    square = lx.MatrixLinearOperator(matrix)
    return vector, [
        (square, lx.LU()),
        (square, lx.QR()),
        (square, lx.SVD()),
        (spd, lx.Cholesky()),
        (square, lx.AutoLinearSolver(well_posed=True)),
    ]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_eager_program_tests_the_matrix_for_nan_once(monkeypatch, dtype):
    # The state returned records `init`'s test of the matrix (`x - x`, summed);
    # the result's test of the matrix is that one, merged by XLA, not a second
    # pass folded into the solution's test (n = 10, LU: 1407 -> 1129 flops).
    vector, cases = _operators(10, dtype)
    for operator, solver in cases:
        text = _eager_program(monkeypatch, operator, vector, solver).as_text()
        tests = re.findall(r"\[10,10\]\{[01,]+\} subtract\((%[\w.\-]+), \1\)", text)
        assert len(tests) == 1, (solver, tests)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_eager_small_programs_run_on_the_calling_thread(monkeypatch, dtype):
    # Under XLA:CPU's threshold: QR at n = 10 (876 flops, 1154 before), LU (and
    # Auto, which picks it) at n = 10 (923; 1122 with the 1-norm of the
    # transpose in its state) and every direct solver at n = 9 (LU 929, 1152
    # before). Cholesky and SVD at n = 10 stay above it (1126-1144): see
    # docs/performance.md.
    n10 = ("QR", "LU", "Auto")
    for n, names in ((10, n10), (9, ("LU", "QR", "SVD", "Cholesky", "Auto"))):
        vector, cases = _operators(n, dtype)
        for operator, solver in cases:
            if type(solver).__name__.removesuffix("LinearSolver") not in names:
                continue
            program = _eager_program(monkeypatch, operator, vector, solver)
            flops = program.cost_analysis()["flops"]
            assert flops < _INLINE_FLOPS, (n, solver, flops)


def _inverse_cases() -> list[tuple[lx.AbstractLinearOperator, lx.AbstractLinearSolver]]:
    rng = np.random.default_rng(1)
    square = rng.standard_normal((4, 4)) + 4 * np.eye(4)
    tall = rng.standard_normal((5, 3))
    pytree_matrix = {
        "x": {"x": jnp.asarray(square[:2, :2]), "y": jnp.asarray(square[:2, 2:])},
        "y": {"x": jnp.asarray(square[2:, :2]), "y": jnp.asarray(square[2:, 2:])},
    }
    in_structure = {
        "x": jax.ShapeDtypeStruct((2,), jnp.float32),
        "y": jax.ShapeDtypeStruct((2,), jnp.float32),
    }
    mixed = lx.PyTreeLinearOperator(
        {
            "r": {
                "r": jnp.asarray(square[:2, :2], jnp.float32),
                "c": jnp.asarray(square[:2, 2:], jnp.complex64),
            },
            "c": {
                "r": jnp.asarray(square[2:, :2], jnp.complex64),
                "c": jnp.asarray(square[2:, 2:], jnp.complex64),
            },
        },
        {
            "r": jax.ShapeDtypeStruct((2,), jnp.float32),
            "c": jax.ShapeDtypeStruct((2,), jnp.complex64),
        },
    )
    return [
        (lx.MatrixLinearOperator(jnp.asarray(square, jnp.float32)), lx.LU()),
        (
            lx.MatrixLinearOperator(jnp.asarray(square + 1j * square.T, jnp.complex64)),
            lx.AutoLinearSolver(well_posed=True),
        ),
        (lx.MatrixLinearOperator(jnp.asarray(tall)), lx.QR()),
        (lx.MatrixLinearOperator(jnp.asarray(tall.T)), lx.SVD()),
        (
            lx.PyTreeLinearOperator(
                jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), pytree_matrix),
                in_structure,
            ),
            lx.AutoLinearSolver(well_posed=None),
        ),
        (mixed, lx.AutoLinearSolver(well_posed=None)),
        (lx.DiagonalLinearOperator(jnp.arange(1.0, 4.0)), lx.Diagonal()),
    ]


@pytest.mark.parametrize("case", range(7))
def test_unjitted_inverse_declares_the_structure_its_trace_has(case):
    # `lx.invert` outside of every trace takes the inverse's output structure
    # from the operator instead of tracing the solve (half of its time, 10x10
    # LU: 13 of 24 ms). The structure must be what the solve returns, and what
    # `lx.invert` built under `jit` (which traces it) has.
    operator, solver = _inverse_cases()[case]
    inverse = lx.invert(operator, solver)
    vector = jax.tree_util.tree_map(
        lambda s: jnp.ones(s.shape, s.dtype), operator.out_structure()
    )
    traced = jax.eval_shape(inverse.mv, vector)
    assert inverse.out_structure() == traced
    under_jit = []

    @jax.jit
    def invert_traced(operator):
        under_jit.append(lx.invert(operator, solver).out_structure())
        return 0

    invert_traced(operator)
    assert under_jit == [inverse.out_structure()]
    value = inverse.mv(vector)
    assert jax.tree_util.tree_structure(value) == jax.tree_util.tree_structure(
        inverse.out_structure()
    )
    for leaf, struct in zip(
        jax.tree_util.tree_leaves(value),
        jax.tree_util.tree_leaves(inverse.out_structure()),
    ):
        assert (leaf.shape, leaf.dtype) == (struct.shape, struct.dtype)


def test_warm_unjitted_invert_traces_nothing():
    # An un-jitted `lx.invert` traced the whole solve (`eqx.filter_eval_shape`
    # of its `mv`, for the output structure) on every call: 24 ms for a 10x10
    # LU, 4x lineax 0.1.1's 6 ms.
    matrix, vector = _system()
    operator = lx.MatrixLinearOperator(matrix)
    lx.invert(operator)
    names = {name for _, name in _calls_of(lambda: lx.invert(operator))}
    assert "trace_to_jaxpr" not in names
    expected = np.linalg.solve(np.asarray(matrix), np.asarray(vector))
    np.testing.assert_allclose(lx.invert(operator).mv(vector), expected, rtol=1e-4)
