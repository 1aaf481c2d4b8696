"""Regression tests from a randomized differential review against lineax 0.1.1
(run as an oracle outside the test suite) and NumPy in float64: a seeded corpus
of 2100 solves (matrix, PyTree, function, Jacobian (`jac=None` and
`"bwd"`), tagged, identity, diagonal and tridiagonal operators, their sums,
products, compositions and negations; every solver of 0.1.1 and
`AutoLinearSolver` with each `well_posed`; float32 to complex128, sizes 1-40,
square, tall and wide, condition numbers up to 1e7, rows and columns scaled by
10^±6, singular and inconsistent systems, zero, tiny and huge right-hand sides,
unreachable tolerances, fixed-iteration solves, `y0` and preconditioners), with
`jvp` and `grad` on 650 of them and `vmap` over the right-hand side on 230;
and 370 hand-built cases of PyTree structures (scalar leaves, dict inputs),
arithmetic on tagged operators, `invert`, 1 x 1, 1 x n and n x 1.

Everything else agreed with NumPy (and with 0.1.1 where it was accurate), or
differed in the documented ways; each test here failed before the fix it
protects. Small sizes, one compiled function per test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lineax as lx


_PSD = lx.positive_semidefinite_tag
_KRYLOV = {
    "CG": (lx.CG, _PSD),
    "MINRES": (lx.MINRES, lx.symmetric_tag),
    "GMRES": (lx.GMRES, ()),
    "BiCGStab": (lx.BiCGStab, ()),
    "LSMR": (lx.LSMR, ()),
}


def _spd(n: int, dtype) -> np.ndarray:
    m = np.random.default_rng(0).standard_normal((n, n))
    return (m @ m.T + n * np.eye(n)).astype(dtype)


@pytest.mark.parametrize("bscale, y0scale", [(1e-20, 1.0), (0.0, 1e30)])
@pytest.mark.parametrize("name", sorted(_KRYLOV))
def test_initial_guess_far_larger_than_the_right_hand_side(name, bscale, y0scale):
    # float32, `y0` of size 1 and `b` of size 1e-20 (a warm start near a root), or
    # `b = 0` and `y0` of 1e30: the residual was scaled by `1 / max|b|` with `b`,
    # its squared norms overflowed, and every Krylov solver reported a
    # `breakdown` at its first step, returning `y0` (residual 4.6 against a
    # target of 1e-5). lineax 0.1.1 succeeded.
    solver_type, tags = _KRYLOV[name]
    matrix = _spd(3, np.float32)
    rng = np.random.default_rng(1)
    b = (bscale * rng.standard_normal(3)).astype(np.float32)
    y0 = (y0scale * rng.standard_normal(3)).astype(np.float32)
    atol = 1e-5 * y0scale  # (a relative residual of 1e-5 or so: reachable)
    solver = solver_type(rtol=1e-5, atol=atol)

    @jax.jit
    def solve(matrix, b, y0):
        operator = lx.MatrixLinearOperator(matrix, tags)
        sol = lx.linear_solve(operator, b, solver, options={"y0": y0}, throw=False)
        return sol.value, sol.result

    x, result = solve(jnp.asarray(matrix), jnp.asarray(b), jnp.asarray(y0))
    assert result == lx.RESULTS.successful, lx.RESULTS[result]
    x64 = np.asarray(x, np.float64)
    residual = b.astype(np.float64) - matrix.astype(np.float64) @ x64
    assert np.max(np.abs(residual)) <= 2 * atol


# Restarted GMRES's default budget was 10 n *steps*, a twentieth of lineax 0.1.1's
# (10 n restart cycles, as SciPy's `gmres` counts `maxiter`): GMRES(20) on a
# symmetric indefinite 25 x 25 of condition 316 needs 420-720 steps, and failed
# with `max_steps_reached` at 250, where 0.1.1 succeeded (residual 2e-7).
@pytest.mark.parametrize("solver", [lx.GMRES, lx.FGMRES])
def test_restarted_gmres_default_budget_counts_cycles(solver):
    n = 25
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    spectrum = np.logspace(-2.5, 0, n - n // 2)
    eigenvalues = np.concatenate([-spectrum[: n // 2], spectrum])
    matrix = (q * eigenvalues) @ q.T
    vector = rng.standard_normal(n)
    sol = lx.linear_solve(
        lx.MatrixLinearOperator(matrix),
        vector,
        solver(rtol=1e-6, atol=1e-6),
        throw=False,
    )
    assert sol.result == lx.RESULTS.successful
    assert int(sol.stats["max_steps"]) == 10 * n * 20
    assert 250 < int(sol.stats["num_steps"]) < 5000
    np.testing.assert_array_less(np.abs(matrix @ sol.value - vector), 1e-5)
