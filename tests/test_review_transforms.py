"""An adversarial review, as a user, of JAX's transformations and debugging modes
around `linear_solve`, and of user-defined operators and solvers, against NumPy
and lineax 0.1.1 (run as an oracle outside the test suite). Higher-order
derivatives, `checkpoint`, `linearize` with `linear_transpose`, `eval_shape`,
`export`, `pmap`, `scan`/`cond`/`while_loop` bodies, `vmap` over either argument
and pickling agreed; what broke were `jax_debug_nans` and `jax_debug_infs`, which
report every NaN or infinity a successful solve computed for its own use. Each
test here failed before the fix it protects.

Every expected value comes from NumPy in float64, never from lineax itself.
Small sizes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lineax as lx


_RNG = np.random.default_rng(0)
_N = 3
_A = _RNG.normal(size=(_N, _N)) + _N * np.eye(_N)
_B = _RNG.normal(size=_N)


@pytest.mark.parametrize(
    "solver",
    [lx.LU(), lx.QR(), lx.AutoLinearSolver(well_posed=True)],
    ids=["LU", "QR", "Auto"],
)
def test_debug_nans_accepts_a_successful_direct_solve_under_grad_and_vmap(solver):
    # With `jax_debug_nans` (a user hunting a NaN in their own model), an
    # un-jitted `jax.grad` or `jax.vmap` of a successful, finite solve raised
    # `FloatingPointError: invalid value (nan) encountered in broadcast_in_dim`:
    # the solve's implementation, evaluated op by op there, built an array of NaNs
    # to select from (the marking of zero pivots, and of failed derivative
    # solves), which `jax_debug_nans` checks. lineax 0.1.1 raised nothing.
    operator = lx.MatrixLinearOperator(jnp.asarray(_A))
    b = jnp.asarray(_B)
    x = np.linalg.solve(_A, _B)
    with jax.debug_nans(True):
        grad = jax.grad(
            lambda b: jnp.sum(lx.linear_solve(operator, b, solver, throw=False).value)
        )(b)
        batched = jax.vmap(lambda b: lx.linear_solve(operator, b, solver).value)(
            jnp.stack([b, 2 * b])
        )
    np.testing.assert_allclose(grad, np.linalg.solve(_A.T, np.ones(_N)), rtol=1e-12)
    np.testing.assert_allclose(batched, np.stack([x, 2 * x]), rtol=1e-12)


def _spd_operator() -> tuple[np.ndarray, lx.MatrixLinearOperator]:
    spd = _A @ _A.T
    operator = lx.MatrixLinearOperator(jnp.asarray(spd), lx.positive_semidefinite_tag)
    return spd, operator


def _grad_of_sum(operator, solver, b):
    """The gradient of `sum(A^-1 b)` in `b`, un-jitted (op by op)."""
    return jax.grad(lambda b: jnp.sum(lx.linear_solve(operator, b, solver).value))(b)


@pytest.mark.parametrize(
    "solver",
    [lx.CG(rtol=1e-12, atol=1e-12), lx.GMRES(rtol=1e-12, atol=1e-12)],
    ids=["CG", "GMRES"],
)
def test_debug_nans_accepts_a_successful_krylov_solve(solver):
    # Every Krylov solve returned `stats["residual_history"]` padded with NaN
    # after its last step, so under `jax_debug_nans` an un-jitted `linear_solve`
    # (whose compiled function returns the statistics) raised
    # `FloatingPointError` on success, as did an un-jitted `jax.grad` (where the
    # padding is computed op by op). lineax 0.1.1 raised nothing.
    spd, operator = _spd_operator()
    b = jnp.asarray(_B)
    with jax.debug_nans(True):
        solution = lx.linear_solve(operator, b, solver)
        grad = _grad_of_sum(operator, solver, b)
    np.testing.assert_allclose(solution.value, np.linalg.solve(spd, _B), rtol=1e-10)
    np.testing.assert_allclose(grad, np.linalg.solve(spd, np.ones(_N)), rtol=1e-10)
    steps = int(solution.stats["num_steps"])
    history = np.asarray(solution.stats["residual_history"])
    assert np.all(history[steps:] == 0) and np.all(np.isfinite(history))


@pytest.mark.parametrize(
    "solver",
    [lx.CG(rtol=1e-12, atol=1e-12), lx.LSMR(rtol=1e-12, atol=1e-12)],
    ids=["CG", "LSMR"],
)
def test_debug_infs_accepts_a_successful_krylov_solve_under_grad(solver):
    # CG and LSMR started the references of their second stagnation test at
    # infinity, in the loop's carry: under `jax_debug_infs` an un-jitted
    # `jax.grad` or `jax.vmap` (which evaluates the solve op by op) raised
    # `FloatingPointError: invalid value (inf) encountered in stack` on success.
    # lineax 0.1.1 raised nothing.
    spd, operator = _spd_operator()
    b = jnp.asarray(_B)
    with jax.debug_infs(True):
        grad = _grad_of_sum(operator, solver, b)
    np.testing.assert_allclose(grad, np.linalg.solve(spd, np.ones(_N)), rtol=1e-10)
