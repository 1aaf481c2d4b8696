"""An adversarial review of the accuracy of the direct solvers and of their
derivatives on hard but ordinary matrices, against LAPACK through NumPy/SciPy.

Reviewed and found to agree (no test here): LU, QR, SVD, Cholesky, Triangular,
Tridiagonal, Kronecker and BlockDiagonal on row/column-graded matrices (scaled
by up to 1e±12), Hilbert, Kahan, cond 1e15 (float64) / 1e7 (float32),
1e-300 and 1e300 scales, n = 1/2, real and complex; the backward error
`|Ax - b| / (|A| |x| + |b|)` in float32/complex64 within a small factor of
SciPy's LAPACK in the same precision (Wilkinson's growth matrix included:
LU loses as much as `sgetrf`); SVD against `pinv`/`lstsq` at a matched cutoff
on exactly rank-deficient square, tall and wide matrices; JVPs and VJPs
against the Golub-Pereyra derivative of the pseudoinverse (real and complex);
`vmap` over batches mixing singular and nonsingular members, and their
gradients, member by member against the unbatched solves.

Each test here failed before the fix it protects. Small sizes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lineax as lx


def _rank_one_update(diagonal, u):
    k = jax.ShapeDtypeStruct((1,), diagonal.dtype)
    return lx.LowRankUpdateLinearOperator(
        lx.DiagonalLinearOperator(diagonal),
        lx.MatrixLinearOperator(u[:, None]),
        lx.IdentityLinearOperator(k),
        lx.MatrixLinearOperator(u[None, :]),
    )


@jax.jit
def _woodbury_solve_and_transposed_solve(diagonal, u, b):
    operator = _rank_one_update(diagonal, u)
    solve = lambda b: lx.linear_solve(operator, b, lx.AutoLinearSolver(True)).value
    x = solve(b)
    # The transposed solve (reverse mode's) of `sum(x * b)` is `M⁻ᵀ b`.
    return x, jax.grad(lambda b: jnp.sum(solve(b) * jax.lax.stop_gradient(b)))(b)


@pytest.mark.parametrize(
    "dtype, small, tol", [(np.float64, 1e-10, 1e-11), (np.float32, 1e-2, 2e-7)]
)
def test_woodbury_accurate_for_an_ill_conditioned_base(dtype, small, tol):
    """`M = diag(small, 1, ..., 1) + u uᵀ` is well-conditioned (cond < 1000), its
    `A` is not. `AutoLinearSolver` picks `Woodbury`, whose identity
    `A⁻¹ b − A⁻¹ u (...)` cancels terms of size `1/small`: relative error 2e-7
    in float64 (LU of `M`: 3e-17) and 4e-6 in float32 (LU: 4e-8), before the
    refinement step. The transposed solve (reverse mode) likewise."""
    rng = np.random.default_rng(6)
    n = 6
    diagonal = np.ones(n)
    diagonal[0] = small
    u = rng.normal(size=n)
    b = rng.normal(size=n)
    matrix = np.diag(diagonal) + np.outer(u, u)
    assert np.linalg.cond(matrix) < 1000
    expected = np.linalg.solve(matrix, b)
    x, x_transposed = _woodbury_solve_and_transposed_solve(
        *(jnp.asarray(a, dtype) for a in (diagonal, u, b))
    )
    for value in (x, x_transposed):
        error = np.linalg.norm(np.asarray(value, np.float64) - expected)
        assert error / np.linalg.norm(expected) < tol


@jax.jit
def _schur_solve_and_transposed_solve(diagonal, upper, b):
    operator = lx.BlockLinearOperator(
        [
            [lx.DiagonalLinearOperator(diagonal), lx.MatrixLinearOperator(upper)],
            [lx.MatrixLinearOperator(upper.T), None],
        ]
    )
    n = diagonal.shape[0]

    def solve(b):
        x = lx.linear_solve(operator, (b[:n], b[n:]), lx.Schur()).value
        return jnp.concatenate(x)

    x = solve(b)
    return x, jax.grad(lambda b: jnp.sum(solve(b) * jax.lax.stop_gradient(b)))(b)


def test_schur_accurate_for_an_ill_conditioned_top_left_block():
    """The saddle point `[[diag(1e-10, 1, 1, 1), B], [Bᵀ, 0]]` (cond < 10): block
    elimination alone cancels terms of size 1e10, relative error 6e-7 (LU of the
    whole: 2e-16), before the refinement step. The transposed solve likewise."""
    rng = np.random.default_rng(8)
    diagonal = np.array([1e-10, 1.0, 1.0, 1.0])
    upper = rng.normal(size=(4, 2))
    matrix = np.block([[np.diag(diagonal), upper], [upper.T, np.zeros((2, 2))]])
    assert np.linalg.cond(matrix) < 10
    b = rng.normal(size=6)
    expected = np.linalg.solve(matrix, b)
    for value in _schur_solve_and_transposed_solve(diagonal, upper, b):
        error = np.linalg.norm(np.asarray(value) - expected)
        assert error / np.linalg.norm(expected) < 1e-11
