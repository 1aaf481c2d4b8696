"""Adversarial review, round 6: lineax as Optimistix and Diffrax use it, against
the published lineax 0.1.1 (with optimistix 0.1.0 and diffrax 0.7.2, run on the
same inputs in a separate environment) and float64 references.

Found: QR's row sort (by each row's largest entry) reordered the rows of
badly scaled triangular systems, e.g. the `I - h J` of an implicit ODE solver
whose state has components in different units (`J = D M D^-1`), into an order
that Householder QR does not solve accurately: the smallest component of the
solution lost every digit (float32, relative error 0.99, LU and lineax 0.1.1's
QR 6e-8), and Diffrax's `VeryChord(linear_solver=lx.QR())` then never met its
componentwise tolerance (Kvaerno3: `max_steps` reached, where lineax 0.1.1 took
438 steps, as LU does). Measuring the row sizes with the columns
equilibrated fixed that 3x3 system but not 30x30 ones (`D T D^-1`, `T` unit
upper triangular: relative errors 0.8 to 3, once `singular`); row `j` is now
the unchosen row with the largest entry in column `j` (see `_row_order`).

Reviewed and found right (no test here; ours against 0.1.1, same values or
better): Newton, Chord (LU, QR, SVD, Auto) on row- and column-scaled (10^±6)
float32 systems (QR converged in 4 Newton / 5 Chord steps, 0.1.1's in 9 / 11);
a Jacobian singular at the start point (`singular`, both) and at a triple root
(both converge, 33 steps); `vmap` over a batch with one singular member (only
it fails); GaussNewton, LevenbergMarquardt, Dogleg on column- and row-weighted
float32 fits (ours nearer SciPy's float64 `least_squares`: cost 1361786.33 vs
0.1.1's 1361789.98, SciPy 1361786.16); a ReLU MLP with more parameters than
data (rank-deficient wide Jacobian: ours `singular` at step 1, 0.1.1 NaN at
step 3 or fails later), LevenbergMarquardt on it (same loss, 35 steps);
`vmap` of LevenbergMarquardt over fits with scales 10^±3 (same values, codes,
steps); implicit `grad` of `root_find` and `least_squares` (float64, same as
0.1.1, against central differences); BFGS on a badly scaled quadratic (same);
complex Newton (LU, QR, Auto: same); Diffrax Robertson float32/float64 with
Kvaerno3/5, ImplicitEuler with VeryChord/Newton, Kvaerno5 with QR (same
values; float64 same step counts); the float32 ImplicitEuler+Newton failure at
`rtol=1e-4` is chaotic: over 16 tolerances 3e-5..3e-3 ours succeeds 8 times,
0.1.1 5 times; `grad` through Kvaerno5 (RecursiveCheckpoint, Direct) against
central differences; complex Kvaerno5/ImplicitEuler (same); `jit(vmap)` of
Kvaerno5 closing over the parameter (same values)."""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import float32_user

import lineax as lx


def _scaled_implicit_matrix(c):
    """`I - c J` with `J = D M D^-1` upper triangular, `D = diag(1e-6, 1, 1e6)`:
    the implicit stage's matrix of a stiff linear ODE whose state components
    are in different units."""
    d = np.array([1e-6, 1.0, 1e6], np.float32)
    m = np.array([[-1.0, 0.5, 0.0], [0.0, -100.0, 1.0], [0.0, 0.0, -1e4]])
    jac = (d[:, None] * m / d[None, :]).astype(np.float32)
    return (np.eye(3, dtype=np.float32) - np.float32(c) * jac).astype(np.float32)


@pytest.mark.parametrize("c", [1e-3, 1e-2, 0.1, 1.0])
@pytest.mark.parametrize("transposed", [False, True])
def test_qr_of_a_scaled_triangular_system_is_componentwise_accurate(c, transposed):
    """Every component to float32 accuracy, as LU and lineax 0.1.1's QR give
    (6e-8 and better). Before the fix QR sorted the rows (largest first) into
    an anti-triangular order and the first component, 1e-7 beside 2e4, had no
    correct digit (relative error 0.99)."""
    matrix = _scaled_implicit_matrix(c)
    if transposed:
        matrix = matrix.T
    b = np.array([1e-7, 0.3, 2e5], np.float32)
    expected = np.linalg.solve(matrix.astype(np.float64), b.astype(np.float64))
    operator = lx.MatrixLinearOperator(jnp.asarray(matrix))
    for solver in (lx.QR(), lx.LU()):
        x = np.asarray(lx.linear_solve(operator, jnp.asarray(b), solver).value)
        error = np.abs(x - expected) / np.abs(expected)
        assert error.max() < 1e-6, (solver, error)


def test_qr_of_a_scaled_triangular_least_squares_problem_is_componentwise_accurate():
    """The same with one more row (a tall, consistent system) and for the
    minimum-norm solution of its transpose's square part padded by a zero
    column (wide): the rows of `A`, or of `A^H`, are ordered by the same rule."""
    square = _scaled_implicit_matrix(0.1)
    tall = np.concatenate([square, 1e-3 * square[:1]]).astype(np.float32)
    x_true = np.array([1e-7, 0.03, 200.0])
    b = (tall.astype(np.float64) @ x_true).astype(np.float32)
    expected = np.linalg.lstsq(tall.astype(np.float64), b.astype(np.float64))[0]
    operator = lx.MatrixLinearOperator(jnp.asarray(tall))
    x = lx.linear_solve(operator, jnp.asarray(b), lx.QR())
    error = np.abs(np.asarray(x.value) - expected) / np.abs(expected)
    assert error.max() < 1e-5, error

    wide = np.concatenate([square, np.zeros((3, 1), np.float32)], axis=1)
    b = np.array([1e-7, 0.3, 2e5], np.float32)
    expected = np.linalg.lstsq(wide.astype(np.float64), b.astype(np.float64))[0]
    x = lx.linear_solve(
        lx.MatrixLinearOperator(jnp.asarray(wide)), jnp.asarray(b), lx.QR()
    )
    error = np.abs(np.asarray(x.value)[:3] - expected[:3]) / np.abs(expected[:3])
    assert error.max() < 1e-5, error


def test_diffrax_very_chord_with_qr_on_a_badly_scaled_stiff_system():
    """Kvaerno3 with `VeryChord(linear_solver=lx.QR())` on `y' = D M D^-1 y`
    (float32): as with LU and with lineax 0.1.1's QR, 438 steps and success.
    Before the fix: `max_steps` (10000) reached, the Newton iterates of the
    smallest component never within tolerance."""
    dfx = pytest.importorskip("diffrax")
    pytest.importorskip("optimistix")
    with float32_user():
        _very_chord_with_qr(dfx)


def _very_chord_with_qr(dfx):
    d = jnp.array([1e-6, 1.0, 1e6], jnp.float32)
    m = jnp.array([[-1.0, 0.5, 0.0], [0.0, -100.0, 1.0], [0.0, 0.0, -1e4]], jnp.float32)

    def vector_field(t, y, args):
        return d * (m @ (y / d))

    results = {}
    for name, linear_solver in [("lu", lx.LU()), ("qr", lx.QR())]:
        root_finder = dfx.VeryChord(rtol=1e-5, atol=1e-9, linear_solver=linear_solver)
        sol = dfx.diffeqsolve(
            dfx.ODETerm(vector_field),
            dfx.Kvaerno3(root_finder=root_finder),
            0.0,
            1.0,
            1e-3,
            d * jnp.ones(3, jnp.float32),
            stepsize_controller=dfx.PIDController(rtol=1e-4, atol=1e-12),
            max_steps=2000,
            throw=False,
        )
        assert sol.result == dfx.RESULTS.successful, name
        results[name] = (int(sol.stats["num_steps"]), np.asarray(sol.ys[-1] / d))
    assert results["qr"][0] <= results["lu"][0] + 5
    np.testing.assert_allclose(results["qr"][1], results["lu"][1], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("seed", range(8))
def test_qr_of_a_similarity_scaled_triangular_system(seed):
    """`D T D^-1`, float32, `T` unit upper triangular (30x30), `D` of
    `10^U(-6, 6)`: every solution component to 1e-5, as lineax 0.1.1's QR and LU
    give (at most 1.1e-6). Before the fix: relative errors 0.03 to 10 with rows
    sorted by their largest entry, in `A` or with the columns equilibrated
    (seed 6: reported `singular`, an `R` with an exactly zero diagonal entry)."""
    assert _similarity_triangular_error(seed, transposed=False) < 1e-5


@pytest.mark.parametrize("seed", range(8))
def test_qr_of_a_similarity_scaled_lower_triangular_system(seed):
    """The transpose of the family above, `D^-1 T^T D` (float32, 30x30): every
    solution component to 1e-3 (at most 3.8e-4 over these seeds; LU likewise).
    With the rows ordered per column, as at first after the fix above (one
    column's largest entry after another, read in `A`): 5 of the 8 seeds
    fail (errors up to 0.15 on these seeds in a NumPy replay of that order;
    sorted by size up to 1.7e-3). A square operator's rows are now scaled by
    powers of two instead, in their own order."""
    assert _similarity_triangular_error(seed, transposed=True) < 1e-3


def _similarity_triangular_error(seed: int, transposed: bool) -> float:
    """QR's largest relative error of a solution component for `D T D^-1`
    (float32, 30x30, `T` unit upper triangular, `D` of `10^U(-6, 6)`), or for
    its transpose; the solve must report success."""
    n = 30
    rng = np.random.default_rng(seed)
    upper = np.triu(rng.standard_normal((n, n)), 1)
    x = rng.standard_normal(n)
    d = 10.0 ** rng.uniform(-6, 6, n)
    matrix = d[:, None] * (np.eye(n) + 0.3 * upper / np.sqrt(n)) / d
    if transposed:
        matrix, x = matrix.T, x / d
    else:
        x = x * d
    matrix = matrix.astype(np.float32)
    b = (matrix.astype(np.float64) @ x).astype(np.float32)
    expected = np.linalg.solve(matrix.astype(np.float64), b.astype(np.float64))
    operator = lx.MatrixLinearOperator(jnp.asarray(matrix))
    sol = lx.linear_solve(operator, jnp.asarray(b), lx.QR(), throw=False)
    assert sol.result == lx.RESULTS.successful
    error = np.abs(np.asarray(sol.value, np.float64) - expected) / np.abs(expected)
    return float(error.max())
