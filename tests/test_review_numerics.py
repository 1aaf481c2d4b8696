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


def _row_scaled(rng, m, n, dtype):
    exponent = 6 if dtype == np.float64 else 4
    scale = 10.0 ** rng.uniform(-exponent, exponent, size=(m, 1))
    return (scale * rng.normal(size=(m, n))).astype(dtype)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 1e-4)])
def test_qr_accurate_for_row_scaled_square_systems(dtype, tol):
    """Rows scaled by `10^U(-6, 6)` (float32: `10^U(-4, 4)`), as equations in
    different units are: Householder QR is not row-wise stable, and lost up to
    10^6 against LU (relative error, seed 0: float64 5.5e-8, float32 0.37; LU
    1e-16, 1e-7), as NumPy's QR does. With the rows sorted by decreasing size
    first (Powell-Reid, Cox-Higham) it is as accurate as LU. `b = A x` is
    rounded row by row, a row-wise small change."""
    n = 8
    for seed in range(4):
        rng = np.random.default_rng(seed)
        matrix = _row_scaled(rng, n, n, dtype)
        expected = rng.normal(size=n)
        vector = (matrix.astype(np.float64) @ expected).astype(dtype)
        operator = lx.MatrixLinearOperator(jnp.asarray(matrix))
        x = lx.linear_solve(operator, jnp.asarray(vector), lx.QR()).value
        error = np.linalg.norm(np.asarray(x, np.float64) - expected)
        assert error / np.linalg.norm(expected) < tol, seed


def test_qr_accurate_for_weighted_least_squares():
    """A weighted least-squares problem, float32, 100x50, the weights (rows of
    `A` and `b`) `10^U(-6, 6)`: relative error against NumPy's float64 `lstsq`
    of the same data 2.6e-3 to 3.3e-2 (seeds 0-3) before the rows were sorted,
    3e-6 to 1e-5 after."""
    m, n = 100, 50
    for seed in range(4):
        rng = np.random.default_rng(seed)
        weights = 10.0 ** rng.uniform(-6, 6, size=m)
        matrix = (weights[:, None] * rng.normal(size=(m, n))).astype(np.float32)
        vector = (weights * rng.normal(size=m)).astype(np.float32)
        expected = np.linalg.lstsq(
            matrix.astype(np.float64), vector.astype(np.float64), rcond=None
        )[0]
        operator = lx.MatrixLinearOperator(jnp.asarray(matrix))
        x = lx.linear_solve(operator, jnp.asarray(vector), lx.QR()).value
        error = np.linalg.norm(np.asarray(x, np.float64) - expected)
        assert error / np.linalg.norm(expected) < 1e-4, seed


@pytest.mark.parametrize("shape", [(8, 8), (12, 5), (5, 12)])
def test_qr_row_order_consistent_in_derivatives(shape):
    """The row order of the factorisation is applied in the solve, the
    transposed solve (the minimum-norm one of a wide operator, and reverse mode)
    and the JVP: gradients against central differences, float64, rows and
    columns scaled by `10^U(-3, 3)`; the transposed solve against NumPy."""
    m, n = shape
    rng = np.random.default_rng(3)
    matrix = 10.0 ** rng.uniform(-3, 3, size=(m, 1)) * rng.normal(size=(m, n))
    matrix = matrix * 10.0 ** rng.uniform(-3, 3, size=(1, n))
    b, w = rng.normal(size=m), rng.normal(size=n)
    d_matrix, d_b = rng.normal(size=(m, n)) * np.abs(matrix), rng.normal(size=m)

    def loss(a, b):
        x = lx.linear_solve(lx.MatrixLinearOperator(a), b, lx.QR()).value
        return jnp.sum(jnp.asarray(w) * x)

    args = (jnp.asarray(matrix), jnp.asarray(b))
    grads = jax.grad(loss, argnums=(0, 1))(*args)
    directional = jnp.sum(grads[0] * d_matrix) + jnp.sum(grads[1] * d_b)
    _, jvp = jax.jvp(loss, args, (jnp.asarray(d_matrix), jnp.asarray(d_b)))
    h = 1e-6
    plus = loss(args[0] + h * d_matrix, args[1] + h * d_b)
    minus = loss(args[0] - h * d_matrix, args[1] - h * d_b)
    central = (plus - minus) / (2 * h)
    assert abs(directional - central) <= 1e-7 * abs(central)
    assert abs(jvp - directional) <= 1e-10 * abs(directional)
    transposed = lx.linear_solve(
        lx.MatrixLinearOperator(args[0]).T, jnp.asarray(w), lx.QR()
    ).value
    expected = np.linalg.lstsq(matrix.T, w, rcond=None)[0]
    np.testing.assert_allclose(transposed, expected, rtol=1e-8)
