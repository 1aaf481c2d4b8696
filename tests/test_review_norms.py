"""An adversarial review of the `norm=` argument and the tolerance and step
arguments of the Krylov solvers, as users pass them.

Reviewed and found right (no test here): `lx.internal.max_norm`/`two_norm`/
`rms_norm` and user lambdas (`jnp.linalg.norm`, `jnp.max(jnp.abs(x))`; also on
PyTree vectors, under `vmap` and `grad`) agree with `numpy.linalg.solve` for CG,
BiCGStab, GMRES, MINRES and LSMR; a complex-valued norm with zero imaginary part;
`rtol`/`atol` negative or NaN (ValueError), a string, None or a tracer under
`jit` (TypeError naming the argument), NumPy and 0-d JAX scalars (accepted), `inf`
(success after a step); `max_steps` float, bool, negative (ValueError), above
2**31 - 1 (ValueError), a NumPy int (accepted), 0 and 1 (`max_steps_reached`,
or `successful` with `rtol = atol = 0`); GMRES `restart`/`stagnation_iters` 0,
negative or float (ValueError), 1 and larger than n (converges).

Each test here failed before the fix it protects. Small sizes, float64.
"""

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import Array, Float

import lineax as lx


_N = 5


def _problem() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    m = rng.standard_normal((_N, _N))
    return m @ m.T + _N * np.eye(_N), rng.standard_normal(_N)


_SOLVERS: dict[str, Callable[[Callable], lx.AbstractLinearSolver]] = {
    "CG": lambda norm: lx.CG(rtol=1e-8, atol=1e-8, norm=norm, max_steps=20),
    "BiCGStab": lambda norm: lx.BiCGStab(rtol=1e-8, atol=1e-8, norm=norm, max_steps=20),
    "GMRES": lambda norm: lx.GMRES(rtol=1e-8, atol=1e-8, norm=norm, max_steps=20),
    "MINRES": lambda norm: lx.MINRES(rtol=1e-8, atol=1e-8, norm=norm, max_steps=20),
    "LSMR": lambda norm: lx.LSMR(rtol=1e-8, atol=1e-8, norm=norm, max_steps=20),
    "FGMRES": lambda norm: lx.FGMRES(rtol=1e-8, atol=1e-8, norm=norm, max_steps=20),
    "PipelinedCG": lambda norm: lx.PipelinedCG(
        rtol=1e-8, atol=1e-8, norm=norm, max_steps=20
    ),
}


def _solve(
    name: str, norm: Callable, b: Float[np.ndarray, " n"] | None = None
) -> lx.Solution:
    a, b_default = _problem()
    op = lx.MatrixLinearOperator(jnp.asarray(a), lx.positive_semidefinite_tag)
    vector = jnp.asarray(b_default if b is None else b)
    return lx.linear_solve(op, vector, _SOLVERS[name](norm), throw=False)


def _zero_norm(x: Array) -> Array:
    return jnp.zeros((), jnp.float64)


@pytest.mark.parametrize("name", list(_SOLVERS))
def test_norm_that_vanishes_on_a_nonzero_b_is_not_successful(name: str) -> None:
    # Before: every method returned x = 0 as `successful` at step 0.
    sol = _solve(name, _zero_norm)
    assert sol.result != lx.RESULTS.successful


def test_norm_that_vanishes_with_a_zero_b_still_succeeds() -> None:
    sol = _solve("GMRES", _zero_norm, np.zeros(_N))
    assert sol.result == lx.RESULTS.successful
    np.testing.assert_array_equal(np.asarray(sol.value), 0.0)


@pytest.mark.parametrize("name", ["GMRES", "LSMR"])
def test_norm_returning_a_python_float_runs(name: str) -> None:
    # Before: AttributeError "'float' object has no attribute 'astype'". A
    # constant norm never meets the tolerance, so the solve is a failure.
    sol = _solve(name, lambda x: 1.0)
    assert sol.result != lx.RESULTS.successful


@pytest.mark.parametrize("name", ["CG", "GMRES"])
def test_norm_returning_a_one_element_array_is_a_clear_error(name: str) -> None:
    # Before: "Cannot stack arrays with different numbers of dimensions".
    with pytest.raises(ValueError, match="`norm` must return a scalar"):
        _solve(name, lambda x: jnp.linalg.norm(x, keepdims=True))


def test_user_norm_matches_numpy() -> None:
    a, b = _problem()
    sol = _solve("GMRES", lambda x: jnp.max(jnp.abs(x)))
    assert sol.result == lx.RESULTS.successful
    np.testing.assert_allclose(
        np.asarray(sol.value), np.linalg.solve(a, b), rtol=1e-7, atol=1e-9
    )


@pytest.mark.parametrize("name", ["CG", "GMRES"])
def test_squared_norm_meets_atol_in_the_users_units(name: str) -> None:
    # `lx.internal.sum_squares` is not homogeneous; before, with `b` of 1e3 the
    # solve reported `successful` at `sum_squares(r)` of 10 for `atol=1e-2`.
    rng = np.random.default_rng(0)
    m = rng.standard_normal((30, 30))
    a = m @ m.T / 30 + 0.05 * np.eye(30)
    b = 1e3 * rng.standard_normal(30)
    op = lx.MatrixLinearOperator(jnp.asarray(a), lx.positive_semidefinite_tag)
    cls = {"CG": lx.CG, "GMRES": lx.GMRES}[name]
    solver = cls(rtol=0.0, atol=1e-2, norm=lx.internal.sum_squares, max_steps=300)
    sol = lx.linear_solve(op, jnp.asarray(b), solver, throw=False)
    assert sol.result == lx.RESULTS.successful
    assert np.sum((b - a @ np.asarray(sol.value)) ** 2) <= 1e-2
