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

One defect was found: LSMR with a right preconditioner `N` returns
`y0 + N (A N)^+ (b - A y0)`, which is not the pseudoinverse solution where `A`
is wide or rank-deficient, but its JVP applied the pseudoinverse formula (1) to
it as a solution of `A y = b` (relative error 0.88 on a 3 x 6 operator), and
ignored `N`'s own tangent. LSMR now poses the solve of `(A N) z = b - A y0`
(`reformulate`), whose derivatives the generic rules give, and maps `z` to `y`
outside the primitive.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lineax as lx


_PRECONDITIONED = lx.LSMR(rtol=1e-13, atol=1e-13)


def _column_scales(matrix):
    # A preconditioner built from the operator, as users build one (not under
    # `stop_gradient`): the solution depends on it where `A` is wide or
    # rank-deficient, so its derivative does too.
    # (In the operator's dtype: a real preconditioner of a complex operator is
    # refused, as its structure is not the operator's input structure.)
    return (1 / jnp.sqrt(jnp.sum(jnp.abs(matrix) ** 2, axis=0))).astype(matrix.dtype)


def _preconditioned_options(matrix, scales, y0, damp):
    if scales is None:
        scales = _column_scales(matrix)
    options = {"preconditioner": lx.DiagonalLinearOperator(scales)}
    if y0 is not None:
        options["y0"] = y0
    if damp is not None:
        options["damp"] = damp
    return options


@jax.jit
def _preconditioned_lsmr_jvp(matrix, vector, t_matrix, scales, y0, damp):
    def solve(matrix):
        operator = lx.MatrixLinearOperator(matrix)
        options = _preconditioned_options(matrix, scales, y0, damp)
        return lx.linear_solve(operator, vector, _PRECONDITIONED, options=options).value

    return jax.jvp(solve, (matrix,), (t_matrix,))


def _expected_preconditioned(matrix, vector, scales, y0, damp):
    """What LSMR documents it returns, in NumPy: `y0 + N z` with `z` the
    minimum-norm least-squares solution of `[A N; damp N] z = (b - A y0, -damp
    y0)`."""
    m, n = matrix.shape
    if scales is None:
        scales = 1 / np.sqrt(np.sum(np.abs(matrix) ** 2, axis=0))
    y0 = np.zeros(n, matrix.dtype) if y0 is None else y0
    damp = 0.0 if damp is None else damp
    stacked = np.concatenate([matrix, damp * np.eye(n)]) * scales
    residual = np.concatenate([vector - matrix @ y0, -damp * y0])
    return y0 + scales * (np.linalg.pinv(stacked) @ residual)


def _problem(shape, dtype, rng):
    def draw(*size):
        if dtype == np.complex128:
            return rng.standard_normal(size) + 1j * rng.standard_normal(size)
        return rng.standard_normal(size)

    if shape == "wide":
        matrix, t_matrix = draw(3, 6), draw(3, 6)
    else:
        # (A tangent that keeps the duplicated column: the derivative exists.)
        matrix, t_matrix = draw(6, 4), draw(6, 4)
        if shape == "rank_deficient":
            matrix[:, 3] = matrix[:, 0]
            t_matrix[:, 3] = t_matrix[:, 0]
    m, n = matrix.shape
    return matrix, t_matrix, draw(m), draw(n)


# (shape, dtype, fixed scales, y0, damp): a sample of the combinations, one
# compile each.
_PRECONDITIONED_CASES = [
    ("wide", np.float64, True, False, None),
    ("rank_deficient", np.float64, True, False, None),
    ("wide", np.float64, False, True, None),
    ("rank_deficient", np.float64, False, True, None),
    ("tall", np.float64, False, True, None),
    ("wide", np.float64, True, True, 0.5),
    ("wide", np.complex128, False, True, None),
]


# LSMR returns `y0 + N (A N)^+ (b - A y0)`, not the pseudoinverse solution where
# `A` is wide or rank-deficient, and its JVP applied the pseudoinverse formula (1)
# to it as the solution of `A y = b`: the null-space term for `N (A N)^+` needs
# `N^{-1}`. Relative error 0.88 (wide 3 x 6) and 0.46 (6 x 4 with a duplicated
# column), with no error raised; the tangent of a preconditioner built from the
# operator was ignored (the preconditioner "never changes the answer"), and `y0`
# was the initial guess of the pseudoinverse formula, not of this solution.
@pytest.mark.parametrize("shape,dtype,fixed,with_y0,damp", _PRECONDITIONED_CASES)
def test_preconditioned_lsmr_derivative_in_the_operator(
    shape, dtype, fixed, with_y0, damp
):
    rng = np.random.default_rng(11)
    matrix, t_matrix, vector, y0 = _problem(shape, dtype, rng)
    y0 = y0 if with_y0 else None
    scales = np.linspace(0.5, 3, matrix.shape[1]) if fixed else None

    def expected(matrix):
        return _expected_preconditioned(matrix, vector, scales, y0, damp)

    value, tangent = _preconditioned_lsmr_jvp(
        matrix, vector, t_matrix, scales, y0, damp
    )
    h = 1e-6
    t_expected = (expected(matrix + h * t_matrix) - expected(matrix - h * t_matrix)) / (
        2 * h
    )
    np.testing.assert_allclose(value, expected(matrix), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(tangent, t_expected, rtol=1e-6, atol=1e-8)


@jax.jit
def _preconditioned_lsmr_vjp(matrix, vector, y0, cotangent):
    def solve(matrix, vector, y0):
        operator = lx.MatrixLinearOperator(matrix)
        options = _preconditioned_options(matrix, None, y0, None)
        return lx.linear_solve(operator, vector, _PRECONDITIONED, options=options).value

    value, vjp = jax.vjp(solve, matrix, vector, y0)
    return value, vjp(cotangent)


def test_preconditioned_lsmr_reverse_mode_in_every_input():
    # Reverse mode (the transposed solve of `(A N)^T = N^T A^T`) against central
    # differences of NumPy's answer, in the operator, the vector and `y0`.
    rng = np.random.default_rng(3)
    matrix, _, vector, y0 = _problem("wide", np.float64, rng)
    cotangent = rng.standard_normal(matrix.shape[1])
    value, (g_matrix, g_vector, g_y0) = _preconditioned_lsmr_vjp(
        matrix, vector, y0, cotangent
    )

    def loss(matrix, vector, y0):
        return cotangent @ _expected_preconditioned(matrix, vector, None, y0, None)

    h = 1e-6
    for i, primal in enumerate((matrix, vector, y0)):
        grad = np.zeros_like(primal)
        for index in np.ndindex(primal.shape):
            step = np.zeros_like(primal)
            step[index] = h
            args = [matrix, vector, y0]
            args[i] = primal + step
            up = loss(*args)
            args[i] = primal - step
            grad[index] = (up - loss(*args)) / (2 * h)
        got = (g_matrix, g_vector, g_y0)[i]
        np.testing.assert_allclose(got, grad, rtol=1e-6, atol=1e-8)


def test_preconditioned_lsmr_called_directly():
    # `init`, `compute` and `transpose` called directly, with the options given to
    # `linear_solve`, as a library wrapping LSMR calls them: the same answers as
    # `linear_solve`, and a state made by `init` accepted as `state=`.
    rng = np.random.default_rng(5)
    matrix, _, vector, y0 = _problem("wide", np.float64, rng)
    scales = np.linspace(0.5, 3, matrix.shape[1])
    # (Arrays: `linear_solve` converts NumPy inputs, the solver API does not.)
    matrix, vector, y0 = jnp.asarray(matrix), jnp.asarray(vector), jnp.asarray(y0)
    options = _preconditioned_options(matrix, scales, y0, None)
    operator = lx.MatrixLinearOperator(matrix)
    state = _PRECONDITIONED.init(operator, options)
    direct, result, _ = _PRECONDITIONED.compute(state, vector, options)
    assert result == lx.RESULTS.successful
    want = _expected_preconditioned(matrix, vector, scales, y0, None)
    np.testing.assert_allclose(direct, want, rtol=1e-10, atol=1e-12)
    reused = lx.linear_solve(
        operator, vector, _PRECONDITIONED, options=options, state=state
    )
    np.testing.assert_allclose(reused.value, want, rtol=1e-10, atol=1e-12)
    # The transposed solve: the transpose of `b -> N (A N)^+ b` (`y0` is a guess
    # for the primal problem, and is dropped).
    state_t, options_t = _PRECONDITIONED.transpose(state, options)
    cotangent = jnp.asarray(rng.standard_normal(matrix.shape[1]))
    transposed, result, _ = _PRECONDITIONED.compute(state_t, cotangent, options_t)
    assert result == lx.RESULTS.successful
    map_ = np.diag(scales) @ np.linalg.pinv(np.asarray(matrix) * scales)
    np.testing.assert_allclose(transposed, map_.T @ cotangent, rtol=1e-10, atol=1e-12)
    # A state made without the preconditioner is refused, not solved with `A`.
    plain = _PRECONDITIONED.init(operator, {})
    with pytest.raises(ValueError, match="without it"):
        _PRECONDITIONED.compute(plain, vector, options)


@pytest.mark.parametrize("damp", [None, 0.1])
def test_float32_least_squares_with_a_small_residual_is_successful(damp):
    # A well-conditioned float32 fit whose residual is small next to `b` (0.1% of
    # it), or a ridge fit (`damp=0.1`), with `rtol=1e-5`: LSMR stagnated, with
    # answers accurate to 1e-7 (`throw=True` raised), because the normal-equations
    # test `||A^H r|| <= rtol ||A|| ||r||` on a computed residual cannot go below
    # the residual's own rounding, about `eps ||b|| / ||r||` of it (1e-4 here).
    rng = np.random.default_rng(0)
    if damp is None:
        m, n = 30, 10
        u = np.linalg.qr(rng.normal(size=(m, m)))[0]
        matrix = u[:, :n] @ np.linalg.qr(rng.normal(size=(n, n)))[0]
        vector = matrix @ rng.normal(size=n)
        noise = u[:, n:] @ rng.normal(size=m - n)
        vector = vector + 1e-3 * np.linalg.norm(vector) * noise / np.linalg.norm(noise)
    else:
        n = 10
        matrix = rng.normal(size=(n, n)) + n * np.eye(n)
        vector = rng.normal(size=n)
    options = {} if damp is None else {"damp": damp}
    solution = lx.linear_solve(
        lx.MatrixLinearOperator(matrix.astype(np.float32)),
        vector.astype(np.float32),
        lx.LSMR(rtol=1e-5, atol=1e-5),
        options=options,
        throw=False,
    )
    gram = matrix.T @ matrix + (damp or 0.0) ** 2 * np.eye(n)
    expected = np.linalg.solve(gram, matrix.T @ vector)
    assert solution.result == lx.RESULTS.successful
    np.testing.assert_allclose(solution.value, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("inner", [lx.Cholesky(), lx.LU(), lx.SVD()])
@pytest.mark.parametrize("wide", [False, True])
def test_normal_equations_whose_gram_matrix_overflows_are_not_successful(inner, wide):
    # `A` is finite, its Gram matrix `A^H A` is not (1e300 squared). From the
    # factorisation of a matrix holding inf, Cholesky, LU and SVD each gave a
    # finite solution of `diag(1e300, 1) x = (1, 1)` with `x[0] = 0` (exact:
    # 1e-300), reported successful (Cholesky in lineax 0.1.1 too). `Normal`
    # now rescales `A` by a power of two (largest entry in [1, 2)), so this is
    # the solve of `diag(1, 1e-300)` (cond(A^H A) = 1e600), scaled: Cholesky and
    # LU meet a zero pivot (`singular`), and SVD, whose `rcond` cuts off the
    # Gram matrix's eigenvalue 1e-600, returns the truncated pseudoinverse
    # solution `(1e-300, 0)`, as it does for `diag(1, 1e-300)` (and for
    # `diag(1, 1e-10)`: SVD's rank decision on the squared condition number).
    matrix = jnp.array([[1e300, 0.0], [0.0, 1.0]])
    if wide:
        matrix = jnp.concatenate([matrix, jnp.zeros((2, 1))], axis=1)
    solution = lx.linear_solve(
        lx.MatrixLinearOperator(matrix), jnp.ones(2), lx.Normal(inner), throw=False
    )
    if isinstance(inner, lx.SVD):
        assert solution.result == lx.RESULTS.successful
        want = [1e-300, 0.0, 0.0] if wide else [1e-300, 0.0]
        np.testing.assert_allclose(solution.value, want, rtol=1e-15, atol=0)
        return
    assert solution.result != lx.RESULTS.successful
    with pytest.raises(Exception, match="singular"):
        lx.linear_solve(lx.MatrixLinearOperator(matrix), jnp.ones(2), lx.Normal(inner))
