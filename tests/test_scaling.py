"""Direct solves of row- and column-scaled systems: the result code does not
depend on the scaling, and the answer is as accurate as for the unscaled system.

LU (partial pivoting), Cholesky (symmetric scaling), substitution and the Thomas
algorithm are accurate componentwise under diagonal scaling (the Skeel condition
number `| |A^{-1}| |A| |` of `D_r A D_c` is that of `A`), so every solution
component is compared with the float64 NumPy solution of the *scaled* system, to
a relative tolerance. Householder QR is normwise stable in each column only: it
is checked under column scaling, where that is the same thing.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lineax as lx


def _componentwise_close(got, want, rtol):
    got = np.asarray(got, np.complex128)
    want = np.asarray(want, np.complex128)
    np.testing.assert_array_less(np.abs(got - want), rtol * np.abs(want) + 1e-300)


# name: (solver, tags, how to make the structure from a dense matrix, scalings)
_STRUCTURES = {
    "lu": (lx.LU(), (), lambda a: a, "rows_and_columns"),
    "qr": (lx.QR(), (), lambda a: a, "columns"),
    "cholesky": (
        lx.Cholesky(),
        lx.positive_semidefinite_tag,
        lambda a: a @ a.T + a.shape[0] * np.eye(a.shape[0]),
        "symmetric",
    ),
    "triangular": (
        lx.Triangular(),
        lx.lower_triangular_tag,
        lambda a: np.tril(a) + a.shape[0] * np.eye(a.shape[0]),
        "rows_and_columns",
    ),
    "tridiagonal": (
        lx.Tridiagonal(),
        lx.tridiagonal_tag,
        lambda a: np.triu(np.tril(a, 1), -1) + 3 * np.eye(a.shape[0]),
        "rows_and_columns",
    ),
    "diagonal": (
        lx.Diagonal(well_posed=True),
        lx.diagonal_tag,
        lambda a: np.diag(np.diag(a) + 3),
        "rows_and_columns",
    ),
}


def _scalings(rng, n, kind, base, max_power):
    """Random row and column scalings `base ** k`, `|k| <= max_power`."""
    rows = base ** rng.integers(-max_power, max_power + 1, n).astype(np.float64)
    cols = base ** rng.integers(-max_power, max_power + 1, n).astype(np.float64)
    if kind == "columns":
        rows = np.ones(n)
    elif kind == "symmetric":
        rows = cols
    return rows, cols


# In float32, `10^±3` on rows and on columns already spans 12 decades; the data
# stays far inside float32's range.
_RANGES = [
    (jnp.float64, 10.0, 6),
    (jnp.float64, 2.0, 40),
    (jnp.float32, 10.0, 3),
    (jnp.float32, 2.0, 20),
]


@pytest.mark.parametrize("dtype,base,max_power", _RANGES)
@pytest.mark.parametrize("name", list(_STRUCTURES))
def test_result_and_accuracy_invariant_under_row_column_scaling(
    name, dtype, base, max_power
):
    solver, tags, structure, kind = _STRUCTURES[name]
    n = 5
    rng = np.random.default_rng(zlib.crc32(f"{name}{base}".encode()))
    rtol = 1e-9 if dtype == jnp.float64 else 2e-3
    for _ in range(3):
        a = structure(rng.standard_normal((n, n)))
        b = rng.standard_normal(n)
        rows, cols = _scalings(rng, n, kind, base, max_power)
        scaled = (rows[:, None] * a * cols[None, :]).astype(dtype)
        scaled_b = (rows * b).astype(dtype)
        operator = lx.MatrixLinearOperator(jnp.asarray(scaled), tags)
        solution = lx.linear_solve(operator, jnp.asarray(scaled_b), solver, throw=False)
        assert solution.result == lx.RESULTS.successful
        reference = np.linalg.solve(
            np.asarray(scaled, np.float64), np.asarray(scaled_b, np.float64)
        )
        _componentwise_close(solution.value, reference, rtol)
        assert 0 < solution.stats["rcond"] <= 1.0 + 1e-6


@pytest.mark.parametrize(
    "solver,tags",
    [
        (lx.LU(), ()),
        (lx.QR(), ()),
        (lx.Cholesky(), lx.positive_semidefinite_tag),
        (lx.Triangular(), lx.lower_triangular_tag),
    ],
    ids=["lu", "qr", "cholesky", "triangular"],
)
def test_badly_scaled_float32_diagonal_system_is_successful(solver, tags):
    # diag(1e4, 1e-4) in float32: solved exactly, so never "singular", with or
    # without `throw`, and differentiable without NaN.
    matrix = jnp.diag(jnp.array([1e4, 1e-4], jnp.float32))
    vector = jnp.array([1.0, 1.0], jnp.float32)
    operator = lx.MatrixLinearOperator(matrix, tags)
    solution = lx.linear_solve(operator, vector, solver)
    assert solution.result == lx.RESULTS.successful
    np.testing.assert_allclose(solution.value, [1e-4, 1e4], rtol=1e-6)

    def loss(m):
        op = lx.MatrixLinearOperator(m, tags)
        return lx.linear_solve(op, vector, solver, throw=False).value.sum()

    grad = jax.grad(loss)(matrix)
    assert np.all(np.isfinite(grad))
    # d(sum A^{-1} b)/dA = -A^{-T} 1 x^T: here diagonal -1/d_i^2 (off-diagonal
    # entries depend on the structure the solver assumes).
    np.testing.assert_allclose(jnp.diag(grad), [-1e-8, -1e8], rtol=1e-5)


def test_qr_result_invariant_under_row_scaling():
    # Householder QR is not componentwise accurate under heavy row scaling (rows
    # of 1e-6 next to rows of 1e6 lose digits: its backward error is normwise),
    # but whether it succeeds does not depend on the scaling: the result is
    # `successful` and the normwise residual is at rounding level.
    rng = np.random.default_rng(7)
    n = 5
    for _ in range(3):
        a = rng.standard_normal((n, n))
        rows, cols = _scalings(rng, n, "rows_and_columns", 10.0, 6)
        scaled = rows[:, None] * a * cols[None, :]
        b = rows * rng.standard_normal(n)
        operator = lx.MatrixLinearOperator(jnp.asarray(scaled))
        solution = lx.linear_solve(operator, jnp.asarray(b), lx.QR(), throw=False)
        assert solution.result == lx.RESULTS.successful
        x = np.asarray(solution.value)
        residual = np.linalg.norm(scaled @ x - b)
        assert residual <= 1e-12 * np.linalg.norm(scaled, 2) * np.linalg.norm(x)


def test_newton_and_gauss_newton_on_badly_scaled_float32_problems():
    # Optimistix's Newton and Gauss-Newton solve with LU / QR at every step: a
    # scale-dependent "singular" used to stop them after a step or two.
    import optimistix as optx

    def root(y, args):
        del args
        return jnp.stack([1e4 * (y[0] - 1), 1e-4 * (y[1] ** 3 - 8)])

    y0 = jnp.array([3.0, 3.0], jnp.float32)
    solver = optx.Newton(rtol=1e-5, atol=1e-9)
    sol = optx.root_find(root, solver, y0, throw=False, max_steps=100)
    assert sol.result == optx.RESULTS.successful
    np.testing.assert_allclose(sol.value, [1.0, 2.0], rtol=1e-5)

    t = jnp.linspace(0, 1e4, 50, dtype=jnp.float32)
    data = 1 + 2e-3 * t + 3e-8 * t**2

    def residuals(p, args):
        del args
        return p[0] + p[1] * t + p[2] * t**2 - data

    # Gauss-Newton's Cauchy test also asks the residual vector to change by at
    # most `atol + rtol |r_i|` between steps. This fit's residual at the optimum is
    # float32 rounding noise (about 4e-6: `eps * |data|` mapped through the
    # solve), so `atol` must be above that: with `atol=1e-9` the test passes only
    # where the iterates happen to land on an exact fixed point (7 steps at XLA's
    # default LLVM optimisation; a 3-cycle of iterates one ulp apart, so 256 steps
    # and `max_steps`, at level 0 and on an H200 GPU; the same with the published
    # lineax).
    p0 = jnp.zeros(3, jnp.float32)
    solver = optx.GaussNewton(rtol=1e-6, atol=1e-5)
    sol = optx.least_squares(residuals, solver, p0, throw=False)
    assert sol.result == optx.RESULTS.successful
    np.testing.assert_allclose(sol.value, [1.0, 2e-3, 3e-8], rtol=1e-5)
