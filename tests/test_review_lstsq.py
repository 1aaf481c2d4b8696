"""An adversarial review of least-squares and minimum-norm solves and of the
derivatives that the rank flags select (`_primitive._linear_solve_jvp`,
`rank_flags`, equations (1)-(4) of the paper), against NumPy in float64
(`pinv`, `lstsq`, central finite differences) and lineax 0.1.1 run as an oracle
outside the test suite.

Reviewed and found to agree (no test here): QR, SVD, LSMR, `Normal(Cholesky)`,
`Normal(CG)` and `AutoLinearSolver(well_posed=False/None)` on tall, wide and
square operators, real and complex: values, `jvp` in the operator, the vector
and both, `grad`, `jvp` of `jvp`, `vmap` of `jvp`, `jacfwd` against `jacrev`;
1 x n, n x 1, 1 x 1, a zero right-hand side, a right-hand side orthogonal to
the range; SVD and LSMR on rank-deficient operators (duplicated columns and
rows) with rank-preserving tangents, and finite values along rank-changing ones;
SVD's cutoff at and around `rcond * max(s)` (its `rank` as `numpy.linalg.lstsq`);
LSMR's `damp` (values, `jvp`/`grad` in `A`, `b` and `damp`, `damp = 0`, `vmap`
over `damp`, complex) and `y0` on rank-deficient operators (`y0 + A^+(b - A y0)`
and its derivative in `y0`); PyTree operators whose input and output structures
differ (function and PyTree operators, every solver above); user-defined solvers
with `assume_full_rank()` True or False (both formulas agree on full-rank
operators); QR and `AutoLinearSolver(well_posed=None)` on rank-deficient
operators: the same values and no error as 0.1.1 (documented), a zero column
reported `singular`; float32 LSMR/`Normal(CG)` derivatives: a tangent solve
that fails is reported by `throw=True` ("A tangent linear solve failed") and is
NaN with `throw=False`.

What is documented and left: `Normal(CG)`/`Normal(Cholesky)` derivatives on
rank-deficient operators; a user solver that passes `y0` to an inner Krylov
solver without declaring it in `option_keys` gets no `y0` term in its derivative.
The test marked `xfail` is a defect found and not fixed.
"""

import jax
import numpy as np
import pytest

import lineax as lx


@jax.jit
def _preconditioned_lsmr_jvp(matrix, vector, t_matrix, scales):
    solver = lx.LSMR(rtol=1e-13, atol=1e-13)
    options = {"preconditioner": lx.DiagonalLinearOperator(scales)}

    def solve(matrix):
        operator = lx.MatrixLinearOperator(matrix)
        return lx.linear_solve(operator, vector, solver, options=options).value

    return jax.jvp(solve, (matrix,), (t_matrix,))


@pytest.mark.xfail(
    strict=True,
    reason="With a right preconditioner N, LSMR returns N (A N)^+ b, which for a "
    "wide or rank-deficient A is not A^+ b (documented); the JVP applies the "
    "pseudoinverse formula (1) to it, whose null-space term for this solution "
    "needs N^{-1}, which lineax does not have for a general preconditioner. "
    "Derivatives in the vector are right; in the operator, right only for full "
    "column rank. Not fixed.",
)
@pytest.mark.parametrize("shape", ["wide", "rank_deficient"])
def test_preconditioned_lsmr_derivative_in_the_operator(shape):
    rng = np.random.default_rng(11)
    if shape == "wide":
        matrix = rng.standard_normal((3, 6))
        t_matrix = rng.standard_normal((3, 6))
    else:
        # (A tangent that keeps the duplicated column: the derivative exists.)
        matrix = rng.standard_normal((6, 4))
        matrix[:, 3] = matrix[:, 0]
        t_matrix = rng.standard_normal((6, 4))
        t_matrix[:, 3] = t_matrix[:, 0]
    m, n = matrix.shape
    vector = rng.standard_normal(m)
    scales = np.linspace(0.5, 3, n)

    def expected(matrix):
        # What LSMR documents it returns: y = N z with z = (A N)^+ b.
        return scales * (np.linalg.pinv(matrix * scales) @ vector)

    value, tangent = _preconditioned_lsmr_jvp(matrix, vector, t_matrix, scales)
    h = 1e-6
    t_expected = (expected(matrix + h * t_matrix) - expected(matrix - h * t_matrix)) / (
        2 * h
    )
    np.testing.assert_allclose(value, expected(matrix), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(tangent, t_expected, rtol=1e-6, atol=1e-8)
