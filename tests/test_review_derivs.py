"""An adversarial review of "the derivative is the derivative of the function the
solver actually computes": for each solver, operator kind and option, the
function of (operator, vector, options) it computes (from its docstring, checked
against NumPy in float64), and `jax.jvp`/`jax.grad` against central finite
differences of that function, in float64 and complex128.

Reviewed and found to agree (no test here): `Diagonal` with zero entries and
entries under its cutoff, both `well_posed` flags, picked by
`AutoLinearSolver(well_posed=None/False)`; `Kronecker(SVD())`,
`BlockDiagonal((LU(), SVD()))` and `BlockDiagonal(LSMR())` with `y0` on
singular factors and blocks (rank-preserving tangents); `Woodbury`, `Schur`,
`Tridiagonal` and `Triangular` (tangents off the part read, complex);
`Normal` with SVD, LSMR, Cholesky, CG, QR, LU and `Auto` inner solvers on tall,
wide and rank-deficient operators; preconditioners built from the
differentiated operator (Jacobi, or a diagonal operator) and a `y0` depending
on it, in CG, MINRES, GMRES, BiCGStab, FGMRES, FlexibleCG and PipelinedCG
(and Chebyshev, Neumann, SSOR, block Jacobi, ILU, IC and probing Jacobi
preconditioners built from it, under `jax.grad`); Krylov solvers for full rank
on a singular consistent system (the tangent solve fails loudly, or is NaN
with `throw=False`);
`state=` from `solver.init` or `Solution.state` inside the differentiated
function, and one made outside it, for LU, Cholesky, SVD, GMRES, CG and LSMR;
`lx.invert(op)` through `mv`, `transpose().mv`, `as_matrix`, `materialise`,
`diagonal` and as the operator of a solve (LU, SVD, Auto; wide SVD).

Found and left: a symmetric-tagged `FunctionLinearOperator` differentiated
along a tangent that is not symmetric (its transpose is taken to be itself, as in
lineax 0.1.1: tags are promises about the tangents too);
`lx.invert(A, lx.LSMR(), options={"y0": y0})` of a rank-deficient `A`, whose
`mv` is affine (`mv(0) = y0 - A^+ A y0`), as in 0.1.1.
Each test here failed before the fix it protects. Small sizes.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lineax as lx


_RNG = np.random.default_rng(20261128)
_TOL: dict[str, Any] = dict(rtol=1e-13, atol=1e-13)


def _fd(fn, eps=1e-6):
    """The central difference of `fn` (of a real scalar) at 0."""
    return (fn(eps) - fn(-eps)) / (2 * eps)


# A rank-2 tall 5 x 4 operator along a curve of rank-2 operators, where the
# pseudoinverse is differentiable: A(t) = (P + t dP)(Q + t dQ).
_P, _DP = _RNG.normal(size=(5, 2)), _RNG.normal(size=(5, 2))
_Q, _DQ = _RNG.normal(size=(2, 4)), _RNG.normal(size=(2, 4))
_B5 = _RNG.normal(size=5)
_Y0, _DY0 = _RNG.normal(size=4), _RNG.normal(size=4)


def _rank_deficient(t):
    return (_P + t * _DP) @ (_Q + t * _DQ)


@jax.jit
def _normal_lsmr_jvp(t, y0, dt, dy0):
    def solve(t, y0):
        operator = lx.MatrixLinearOperator(_rank_deficient(t))
        solver = lx.Normal(lx.LSMR(**_TOL))
        return lx.linear_solve(operator, _B5, solver, options={"y0": y0}).value

    return jax.jvp(solve, (t, y0), (dt, dy0))


@pytest.mark.parametrize("direction", ["operator", "y0"])
def test_normal_lsmr_from_y0_is_differentiated_with_its_null_space_part(direction):
    # `Normal(LSMR())` from `y0` on a rank-deficient tall `A` returns
    # `y0 + A^+ (b - A y0)` (LSMR on the Gram operator), but `Normal` did not
    # say so (`initial_guess`): its JVP was that of `A^+ b`, with no term in
    # `y0` (relative errors 0.5 in the operator, 1.0 in `y0`).
    def expected(t, y0):
        matrix = _rank_deficient(t)
        return y0 + np.linalg.pinv(matrix) @ (_B5 - matrix @ y0)

    dt, dy0 = (1.0, np.zeros(4)) if direction == "operator" else (0.0, _DY0)
    value, tangent = _normal_lsmr_jvp(0.0, _Y0, dt, dy0)
    fd = _fd(lambda e: expected(e * dt, _Y0 + e * dy0))
    np.testing.assert_allclose(value, expected(0.0, _Y0), rtol=1e-10)
    np.testing.assert_allclose(tangent, fd, rtol=1e-7, atol=1e-9)


def _damped_solve(kind):
    """A solve by a solver that passes `options` on to an inner LSMR."""
    lsmr = lx.LSMR(**_TOL)
    m = lx.MatrixLinearOperator(jnp.asarray(_RNG.normal(size=(2, 2)) + 3 * np.eye(2)))
    if kind == "BlockDiagonal":
        return lx.BlockDiagonalLinearOperator([m, m]), (jnp.ones(2),) * 2, lsmr
    if kind == "Kronecker":
        return lx.KroneckerLinearOperator(m, m), jnp.ones(4), lsmr
    if kind == "Normal":
        return m, jnp.ones(2), lsmr
    if kind == "Woodbury":
        one = lx.MatrixLinearOperator(jnp.ones((2, 1)))
        op = lx.LowRankUpdateLinearOperator(
            m,
            one,
            lx.IdentityLinearOperator(jax.ShapeDtypeStruct((1,), jnp.float64)),
            one.T,
        )
        return op, jnp.ones(2), lsmr
    op = lx.BlockLinearOperator([[m, m], [m, None]])
    return op, (jnp.ones(2),) * 2, lsmr


@pytest.mark.parametrize(
    "kind", ["BlockDiagonal", "Kronecker", "Normal", "Woodbury", "Schur"]
)
def test_damp_is_refused_by_solvers_that_pass_options_on_to_lsmr(kind):
    # `damp` is LSMR's `reformulate` (the least-squares problem of `[A; damp
    # I]`), which `linear_solve` poses for the solver it is given only. Passed
    # on to an inner LSMR it damped each part: `Normal` and `Woodbury` returned
    # neither the damped nor the undamped solution (relative errors 0.12 and
    # 0.39 against the damped one), `Kronecker` failed inside JAX's closure
    # conversion, and `BlockDiagonal`'s right value had a JVP that failed there
    # and would have ignored `damp`.
    operator, vector, inner = _damped_solve(kind)
    solver = getattr(lx, kind)(inner)
    with pytest.raises(ValueError, match="only `linear_solve` can pose"):
        jax.eval_shape(
            lambda: lx.linear_solve(operator, vector, solver, options={"damp": 0.5})
        )
    # (`damp=None`, the default, poses nothing else: accepted as before.)
    jax.eval_shape(
        lambda: lx.linear_solve(operator, vector, solver, options={"damp": None})
    )


@jax.jit
def _qr_reused_state_jvp(matrix, t_matrix, vector):
    def solve(matrix):
        operator = lx.MatrixLinearOperator(matrix)
        state = lx.QR().init(operator, {})
        return lx.linear_solve(operator, vector, lx.QR(), state=state).value

    return jax.jvp(solve, (matrix,), (t_matrix,))


@pytest.mark.parametrize("shape", [(3, 3), (4, 3)])
def test_qr_state_made_under_differentiation(shape):
    # A state from the user's own `QR().init`, to reuse with `state=`, made
    # inside the differentiated function: JAX has no JVP rule for `geqrf`, so
    # `jax.jvp` and `jax.grad` failed ("Differentiation rule for 'geqrf' not
    # implemented", also in lineax 0.1.1), though the state's tangent is never
    # used. LU, Cholesky and SVD states worked.
    matrix = _RNG.normal(size=shape) + np.eye(*shape)
    t_matrix = _RNG.normal(size=shape)
    vector = _RNG.normal(size=shape[0])
    value, tangent = _qr_reused_state_jvp(matrix, t_matrix, vector)

    def expected(e):
        return np.linalg.lstsq(matrix + e * t_matrix, vector, rcond=None)[0]

    np.testing.assert_allclose(value, expected(0.0), rtol=1e-10)
    np.testing.assert_allclose(tangent, _fd(expected), rtol=1e-7, atol=1e-9)


_N = 4
_UNIT = (lx.lower_triangular_tag, lx.unit_diagonal_tag)
# The strictly lower part of a unit lower triangular factor, stored (as LU
# packs it) with another diagonal, which `unit_diagonal_tag` says to ignore.
_STRICT = 0.3 * np.tril(_RNG.normal(size=(_N, _N)), -1)
_STORED = _STRICT + np.diag(_RNG.uniform(2, 3, size=_N))
_UNIT_L = _STRICT + np.eye(_N)
_U, _V = _RNG.normal(size=(_N, 1)), _RNG.normal(size=(1, _N))
_C = _RNG.normal(size=(2, _N))
_D = _RNG.normal(size=(2, 2)) + 3 * np.eye(2)
_UPPER = _RNG.normal(size=(_N, 2))
_B6 = _RNG.normal(size=_N + 2)


@jax.jit
def _unit_triangular_solves(stored):
    a = lx.MatrixLinearOperator(stored, _UNIT)
    update = lx.LowRankUpdateLinearOperator(
        a,
        lx.MatrixLinearOperator(_U),
        lx.MatrixLinearOperator(jnp.eye(1)),
        lx.MatrixLinearOperator(_V),
    )
    block = lx.BlockLinearOperator(
        [
            [a, lx.MatrixLinearOperator(_UPPER)],
            [lx.MatrixLinearOperator(_C), lx.MatrixLinearOperator(_D)],
        ]
    )
    woodbury = lx.linear_solve(update, _B6[:_N], lx.Woodbury()).value
    auto = lx.linear_solve(update, _B6[:_N]).value
    schur = lx.linear_solve(block, (_B6[:_N], _B6[_N:]), lx.Schur()).value
    return woodbury, auto, jnp.concatenate(schur)


@pytest.mark.parametrize("stored", ["unit", "other"], ids=["unit", "packed"])
def test_woodbury_and_schur_with_a_unit_triangular_block(stored):
    # `Woodbury` and `Schur` take their refinement step's residual with the
    # inner solver's `part_read(A, A)`, which for `Triangular` under
    # `unit_diagonal_tag` dropped the unit diagonal (right for a tangent, whose
    # constant diagonal is zero; wrong for the operator): `I + L + u vᵀ`,
    # which `AutoLinearSolver` gives `Woodbury`, was solved with a relative
    # error of 3.4, reported successful.
    matrix = _UNIT_L if stored == "unit" else _STORED
    woodbury, auto, schur = _unit_triangular_solves(matrix)
    expected = np.linalg.solve(_UNIT_L + _U @ _V, _B6[:_N])
    np.testing.assert_allclose(woodbury, expected, rtol=1e-10)
    np.testing.assert_allclose(auto, expected, rtol=1e-10)
    full = np.block([[_UNIT_L, _UPPER], [_C, _D]])
    np.testing.assert_allclose(schur, np.linalg.solve(full, _B6), rtol=1e-10)


@jax.jit
def _diagonal_pinv_jvp(matrix, t_matrix, vector):
    def solve(matrix):
        operator = lx.MatrixLinearOperator(matrix, lx.diagonal_tag)
        return lx.linear_solve(operator, vector, lx.Diagonal()).value

    return jax.jvp(solve, (matrix,), (t_matrix,))


@pytest.mark.parametrize("dtype", [np.float64, np.complex128])
def test_diagonal_pseudoinverse_jvp_of_a_matrix_tagged_diagonal(dtype):
    # `Diagonal(well_posed=False)` (what `AutoLinearSolver(well_posed=None)`
    # picks) of a matrix tagged diagonal reads its diagonal only, and solves
    # with it; its JVP (the pseudoinverse's, equation (1)) took the products
    # `A x` with the whole matrix, so entries off the diagonal made it wrong
    # along every tangent, the diagonal ones included (relative errors 0.13
    # real, 0.38 complex).
    def draw(*shape):
        x = _RNG.normal(size=shape)
        return x + 1j * _RNG.normal(size=shape) if dtype == np.complex128 else x

    matrix = draw(3, 3) + 3 * np.eye(3)
    t_matrix, vector = draw(3, 3), draw(3)
    value, tangent = _diagonal_pinv_jvp(matrix, t_matrix, vector)
    d, t_d = np.diag(matrix), np.diag(t_matrix)
    np.testing.assert_allclose(value, vector / d, rtol=1e-12)
    np.testing.assert_allclose(tangent, -vector * t_d / d**2, rtol=1e-10)


_M = 3
_STRICT_BLOCKS = [0.3 * np.tril(_RNG.normal(size=(_M, _M)), -1) for _ in range(2)]
_PACKED_BLOCKS = [s + np.diag(_RNG.uniform(2, 3, size=_M)) for s in _STRICT_BLOCKS]
_UNIT_BLOCKS = [s + np.eye(_M) for s in _STRICT_BLOCKS]
_U2, _V2 = _RNG.normal(size=(2 * _M, 1)), _RNG.normal(size=(1, 2 * _M))
_B9 = _RNG.normal(size=_M * _M)


@jax.jit
def _update_of_block_diagonal(first, vector):
    # `A + u vᵀ` with `A` block diagonal, of unit lower triangular blocks, solved
    # by `AutoLinearSolver`: `Woodbury`, whose inner solver is `BlockDiagonal`,
    # whose blocks' is `Triangular`.
    a = lx.BlockDiagonalLinearOperator(
        [
            lx.MatrixLinearOperator(first, _UNIT),
            lx.MatrixLinearOperator(_PACKED_BLOCKS[1], _UNIT),
        ]
    )
    sd = jax.ShapeDtypeStruct((_M,), jnp.float64)
    u = lx.FunctionLinearOperator(
        lambda s: (_U2[:_M] @ s, _U2[_M:] @ s), jax.ShapeDtypeStruct((1,), jnp.float64)
    )
    v = lx.FunctionLinearOperator(
        lambda x: _V2[:, :_M] @ x[0] + _V2[:, _M:] @ x[1], (sd, sd)
    )
    operator = lx.LowRankUpdateLinearOperator(
        a, u, lx.MatrixLinearOperator(jnp.eye(1)), v
    )
    return lx.linear_solve(operator, (vector[:_M], vector[_M:])).value


@jax.jit
def _kronecker_jvp(first, t_first, vector):
    def solve(first):
        operator = lx.KroneckerLinearOperator(
            lx.MatrixLinearOperator(first, _UNIT),
            lx.MatrixLinearOperator(_PACKED_BLOCKS[1], _UNIT),
        )
        return lx.linear_solve(operator, vector).value

    return jax.jvp(solve, (first,), (t_first,))


def test_structured_solvers_of_unit_triangular_parts_stored_with_another_diagonal():
    # Under `unit_diagonal_tag` the stored diagonal is never read (as LU packs
    # its factors). A structured solver whose parts are solved by their own
    # structured solver (`Woodbury` over `BlockDiagonal`) took its refinement
    # step's residual with the stored diagonal (a relative error of 5.9,
    # reported successful); `Kronecker` differentiated the product of the
    # stored factors (a relative error of 2.9 in the JVP).
    first = _PACKED_BLOCKS[0]
    value = np.concatenate(_update_of_block_diagonal(first, _B9[: 2 * _M]))
    solved = np.block(
        [[_UNIT_BLOCKS[0], np.zeros((_M, _M))], [np.zeros((_M, _M)), _UNIT_BLOCKS[1]]]
    )
    expected = np.linalg.solve(solved + _U2 @ _V2, _B9[: 2 * _M])
    np.testing.assert_allclose(value, expected, rtol=1e-10)

    t_first = _RNG.normal(size=(_M, _M))
    value, tangent = _kronecker_jvp(first, t_first, _B9)

    def kronecker(e):
        factor = np.tril(first + e * t_first, -1) + np.eye(_M)
        return np.linalg.solve(np.kron(factor, _UNIT_BLOCKS[1]), _B9)

    np.testing.assert_allclose(value, kronecker(0.0), rtol=1e-10)
    np.testing.assert_allclose(tangent, _fd(kronecker), rtol=1e-7, atol=1e-9)


def _with_singular_values(m, n, values, complex_):
    def orthonormal(k):
        x = _RNG.normal(size=(k, k))
        if complex_:
            x = x + 1j * _RNG.normal(size=(k, k))
        return np.linalg.qr(x)[0]

    r = min(m, n)
    return orthonormal(m)[:, :r] @ np.diag(values) @ orthonormal(n)[:, :r].conj().T


def _normal(shape, complex_):
    x = _RNG.normal(size=shape)
    return x + 1j * _RNG.normal(size=shape) if complex_ else x


@pytest.mark.parametrize(
    "m, n, values, complex_",
    [
        (4, 4, [1.0, 0.5, 0.3, 0.05], False),
        (6, 4, [1.0, 0.5, 0.5, 0.05], True),  # a repeated kept value
        (3, 5, [1.0, 0.4, 0.05], True),
        (5, 5, [1.0, 0.9, 0.3, 0.05, 0.0], False),
    ],
)
def test_svd_derivative_with_a_cutoff_above_nonzero_singular_values(
    m, n, values, complex_
):
    # SVD with an `rcond` that cuts off nonzero singular values (a truncated SVD,
    # as regularisation) solves with `A_k`, the best approximation of rank k, and
    # was differentiated by equation (1) for `A` itself, as `jnp.linalg.pinv`
    # does: exact only where the values cut off are zero. Relative errors
    # 0.02-0.18 of the JVP and 0.001-0.13 of reverse mode, real and complex,
    # square, tall and wide (singular values cut off 0.05 against 0.3-0.5 kept,
    # `rcond=0.1`); now 1e-9.
    matrix = _with_singular_values(m, n, values, complex_)
    t_matrix, t_vector = _normal((m, n), complex_), _normal(m, complex_)
    vector = _normal(m, complex_)

    def solve(matrix, vector):
        operator = lx.MatrixLinearOperator(matrix)
        return lx.linear_solve(operator, vector, lx.SVD(rcond=0.1)).value

    def truncated(matrix, vector):
        u, s, vh = np.linalg.svd(matrix)
        k = np.sum(s > 0.1 * s[0])
        return vh[:k].conj().T @ ((u[:, :k].conj().T @ vector) / s[:k])

    def expected(e):
        return truncated(matrix + e * t_matrix, vector + e * t_vector)

    value, tangent = jax.jvp(solve, (matrix, vector), (t_matrix, t_vector))
    np.testing.assert_allclose(value, expected(0.0), rtol=1e-10)
    np.testing.assert_allclose(tangent, _fd(expected), rtol=1e-7, atol=1e-9)

    # Reverse mode, along the same direction: `jax.grad` of a real loss of a
    # complex input `z` is `conj` of its derivative in `z`, so `Re(sum(g dA))`.
    grad = jax.grad(lambda m: jnp.sum(jnp.abs(solve(m, vector)) ** 2))(matrix)
    loss = _fd(lambda e: np.sum(np.abs(truncated(matrix + e * t_matrix, vector)) ** 2))
    np.testing.assert_allclose(np.real(np.sum(grad * t_matrix)), loss, rtol=1e-7)


@pytest.mark.parametrize(
    "m, n, values, complex_",
    [(6, 4, [1.0, 0.5, 0.3, 0.2], False), (3, 5, [1.0, 0.5, 0.2], True)],
)
def test_normal_svd_derivative_with_a_cutoff(m, n, values, complex_):
    # `Normal(SVD(rcond=r))` keeps the Gram operator's eigenvalues `s²` above
    # `r max(s²)`: it returns the solution of `A` truncated at `sqrt(r) max(s)`,
    # and was differentiated as if it returned `A^+ b` (relative error 1.0 for
    # the tall case here).
    matrix = _with_singular_values(m, n, values, complex_)
    t_matrix, vector = _normal((m, n), complex_), _normal(m, complex_)

    def solve(matrix):
        operator = lx.MatrixLinearOperator(matrix)
        return lx.linear_solve(operator, vector, lx.Normal(lx.SVD(rcond=0.1))).value

    def expected(e):
        u, s, vh = np.linalg.svd(matrix + e * t_matrix, full_matrices=False)
        k = np.sum(s > np.sqrt(0.1) * s[0])
        return vh[:k].conj().T @ ((u[:, :k].conj().T @ vector) / s[:k])

    value, tangent = jax.jvp(solve, (matrix,), (t_matrix,))
    np.testing.assert_allclose(value, expected(0.0), rtol=1e-10)
    np.testing.assert_allclose(tangent, _fd(expected), rtol=1e-7, atol=1e-9)


def test_woodbury_transposes_its_inner_solvers_preconditioner():
    # `Woodbury` passes `options` on to its inner solver, and kept them as they
    # were for the transposed solve: the cotangent solve of reverse mode, with
    # `Aᵀ`, was preconditioned by the approximate inverse of `A` given for the
    # solve with `A`. With a preconditioner that makes GMRES converge at once
    # (the exact inverse) and a budget of two steps, the solve succeeded and
    # its gradient failed ("A cotangent linear solve failed ... maximum number
    # of solver steps"); GMRES on `A` alone had the right gradient.
    n = 6
    a = np.triu(_RNG.normal(size=(n, n)), 1) * 2 + np.diag(_RNG.uniform(1, 2, n))
    u, v = 0.1 * _RNG.normal(size=(n, 1)), 0.1 * _RNG.normal(size=(1, n))
    b = _RNG.normal(size=n)
    a_op = lx.MatrixLinearOperator(a)
    operator = lx.LowRankUpdateLinearOperator(
        a_op,
        lx.MatrixLinearOperator(u),
        lx.MatrixLinearOperator(np.eye(1)),
        lx.MatrixLinearOperator(v),
    )
    gmres = lx.GMRES(rtol=1e-10, atol=1e-10, max_steps=2, restart=2)
    options = {"preconditioner": lx.invert(a_op, lx.LU())}

    @jax.jit
    def grad(b):
        def loss(b):
            x = lx.linear_solve(operator, b, lx.Woodbury(gmres), options=options).value
            return jnp.sum(x * b)

        return jax.grad(loss)(b)

    m = a + u @ v
    expected = np.linalg.solve(m, b) + np.linalg.solve(m.T, b)
    np.testing.assert_allclose(grad(b), expected, rtol=1e-10)


@pytest.mark.parametrize("shape", [(20, 6), (6, 20)])
def test_svd_gradient_accurate_for_graded_float32(shape):
    # The JVP's terms for dependent columns of a tall operator, `(I - A^+ A) z`,
    # and for dependent rows of a wide one, `(A^+)^H V^H (b - A x)`, are zero
    # for an operator of full rank, but were computed as `z - A^+ (A z)` and
    # `b - A x`: rounding errors of the order of `eps |A^+| |A| |z|` and
    # `eps |A| |x|`, the latter multiplied by `|A^+|^2`. Float32, rows and
    # columns graded by 10^-4: the relative error of `jax.grad` of the SVD
    # solution with respect to `A` was 1.2e-4 (tall) and 7.3e-5 (wide), 250x and
    # 100x that of `jnp.linalg.lstsq` (geometric means; QR's is within 2x of
    # it). Now from the SVD's factors where the rank is full, as `(I - V V^H) z`
    # and `(I - U U^H) b`: 1.4e-6 and 2.1e-6, 3x.
    m, n = shape
    rng = np.random.default_rng(3)
    grade = lambda k: 10.0 ** -np.linspace(0, 4, k)
    matrices = grade(m)[None, :, None] * rng.normal(size=(12, m, n))
    matrices = (matrices * grade(n)[None, None, :]).astype(np.float32)
    # (Away from the cutoffs, where `SVD` and `lstsq` may keep different ranks.)
    s = np.linalg.svd(matrices.astype(np.float64), compute_uv=False)
    matrices = matrices[s[:, -1] > 1e-5 * s[:, 0]][:8]
    vectors = rng.normal(size=(len(matrices), m)).astype(np.float32)
    weights = rng.normal(size=(len(matrices), n)).astype(np.float32)

    def gradient(solve, *args):
        loss = lambda a, b, w: jnp.sum(w * solve(a, b))
        return np.asarray(jax.vmap(jax.grad(loss))(*map(jnp.asarray, args)))

    def ours(a, b):
        return lx.linear_solve(lx.MatrixLinearOperator(a), b, lx.SVD()).value

    def lstsq(a, b):
        return jnp.linalg.lstsq(a, b)[0]

    args = (matrices, vectors, weights)
    exact = gradient(lstsq, *(x.astype(np.float64) for x in args))

    def error(g):
        diff = np.linalg.norm(g - exact, axis=(1, 2))
        return np.exp(np.mean(np.log(diff / np.linalg.norm(exact, axis=(1, 2)))))

    assert error(gradient(ours, *args)) < 6 * error(gradient(lstsq, *args))
