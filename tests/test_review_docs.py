"""Regression tests from a review of the documentation, checked by running it:
README.md, docs/*.md, docs/api/*, the examples, and the docstrings of every name
in `lx.__all__` and `lineax.internal` (defaults, stated errors, `RESULTS`
messages, `Solution.stats` keys, `AutoLinearSolver`'s rules, iteration counts,
cost claims counted in operator products), and the public signatures against
the API contract and lineax 0.1.1. Only claims the code did not keep have tests
here; values are compared with NumPy in float64 or with counted products."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lineax as lx


_N = 8
_T = 2 * np.eye(_N) - np.eye(_N, k=1) - np.eye(_N, k=-1)
_SPD = _T + 0.1 * np.eye(_N)
_B = np.random.default_rng(0).normal(size=_N)
_PSD = lx.positive_semidefinite_tag


@pytest.mark.parametrize("y0", [False, True])
@pytest.mark.parametrize("solver", [lx.PipelinedCG, lx.CG], ids=["PipelinedCG", "CG"])
def test_num_mv_counts_every_product(solver, y0):
    # `Solution.stats["num_mv"]` is documented as "the operator applications, the
    # residual recomputations included". PipelinedCG's product `w = A M r0`, made
    # before its first step, was not counted: one less than made, on every solve.
    calls = [0]

    def count(_):
        calls[0] += 1

    def mv(x):
        jax.debug.callback(count, x[0])
        return jnp.asarray(_SPD) @ x

    structure = jax.ShapeDtypeStruct((_N,), jnp.float64)
    operator = lx.FunctionLinearOperator(mv, structure, _PSD)
    options = {"y0": jnp.ones(_N)} if y0 else {}
    sol = lx.linear_solve(
        operator, jnp.asarray(_B), solver(rtol=1e-10, atol=1e-10), options=options
    )
    jax.effects_barrier()
    assert int(sol.stats["num_steps"]) > 0
    assert int(sol.stats["num_mv"]) == calls[0]


def test_max_norm_has_zero_derivative_at_zero():
    # `two_norm` and `rms_norm` document (and lineax 0.1.1's three norms, which
    # Optimistix re-exports as `optx.max_norm` etc., have) a zero derivative at
    # zero. `max_norm`'s was JAX's `abs`'s, 1 at 0: a gradient of `1/size` on every
    # element, and the tangent `max(t)` (so `-1` along `-1`, for a nonnegative
    # function).
    zero = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
    grad = jax.grad(lx.internal.max_norm)(zero)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree_util.tree_leaves(grad))
    direction = jax.tree_util.tree_map(lambda z: -jnp.ones_like(z), zero)
    _, tangent = jax.jvp(lx.internal.max_norm, (zero,), (direction,))
    assert float(tangent) == 0
    # Elsewhere unchanged: the sign of the largest entry.
    x = jnp.array([1.0, -2.0, 0.0])
    np.testing.assert_array_equal(jax.grad(lx.internal.max_norm)(x), [0, -1, 0])


@pytest.mark.parametrize(
    "max_steps, history_length, length",
    [(100, 30, 30), (25_000, None, 10_000), (50, 7, 7), (20, None, 20)],
)
def test_residual_history_has_the_documented_length(max_steps, history_length, length):
    # `history_length`: "the length of `stats["residual_history"]` (default:
    # `max_steps`, at most 10,000)". With every `k = ceil(max_steps /
    # history_length)`-th step recorded, the history had `ceil(max_steps / k)`
    # entries: 25 for `history_length=30, max_steps=100`, 8334 for the default at
    # `max_steps=25_000`, so histories of one `history_length` did not stack.
    operator = lx.MatrixLinearOperator(jnp.asarray(_SPD), _PSD)
    solver = lx.CG(1e-8, 1e-8, max_steps=max_steps, history_length=history_length)
    history = jax.eval_shape(
        lambda b: lx.linear_solve(operator, b, solver).stats["residual_history"],
        jnp.asarray(_B),
    )
    assert history.shape == (length,)


def test_residual_history_records_every_kth_step_and_the_last():
    # Entry `i` is step `k (i + 1)`, or the last step made if that came first;
    # entries after it are zero.
    operator = lx.MatrixLinearOperator(jnp.asarray(_SPD), _PSD)
    full = lx.linear_solve(
        operator, jnp.asarray(_B), lx.CG(1e-12, 0.0, max_steps=30, history_length=30)
    )
    sparse = lx.linear_solve(
        operator, jnp.asarray(_B), lx.CG(1e-12, 0.0, max_steps=30, history_length=12)
    )
    steps = int(full.stats["num_steps"])
    assert steps == int(sparse.stats["num_steps"])
    every = 3  # ceil(30 / 12)
    expected = np.zeros(12)
    recorded = np.asarray(full.stats["residual_history"])
    for i in range(12):
        step = min(every * (i + 1), steps)
        if every * i < steps:
            expected[i] = recorded[step - 1]
    np.testing.assert_allclose(sparse.stats["residual_history"], expected, rtol=1e-12)
