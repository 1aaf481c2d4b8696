"""Adversarial derivative tests of `linear_solve`: derivatives against float64
central finite differences, where a solver reads only part of an operator."""

import jax
import jax.numpy as jnp
import numpy as np
from helpers import central_differences

import lineax as lx


_N = 3


def _check_gradient(loss, matrix):
    loss = jax.jit(loss)
    grad = jax.grad(loss)(matrix)
    expected = central_differences(loss, matrix)
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-8)


def _lower(seed):
    rng = np.random.default_rng(seed)
    return np.tril(rng.normal(size=(_N, _N))) + 3 * np.eye(_N)


def _rhs(size, seed=0):
    return np.random.default_rng(seed).normal(size=size)


def _sum_sin(tree):
    return sum(jnp.sum(jnp.sin(x)) for x in jax.tree_util.tree_leaves(tree))


def test_block_diagonal_gradient_ignores_entries_its_solver_never_reads():
    # Triangular reads one triangle of each block: the other triangle does not
    # change the solution, so its gradient is zero (it was the full tangent's).
    other = _lower(1)
    b = (_rhs(_N, 2), _rhs(_N, 3))
    tag = lx.lower_triangular_tag
    for solver in (lx.BlockDiagonal(lx.Triangular()), lx.AutoLinearSolver(True)):

        def loss(m, solver=solver):
            op = lx.BlockDiagonalLinearOperator(
                [lx.MatrixLinearOperator(m, tag), lx.MatrixLinearOperator(other, tag)]
            )
            return _sum_sin(lx.linear_solve(op, b, solver).value)

        _check_gradient(loss, _lower(0))
        upper = np.triu(np.ones((_N, _N)), 1)
        assert jax.jvp(loss, (_lower(0),), (upper,))[1] == 0


def test_block_diagonal_pseudoinverse_jvp_ignores_unread_entries():
    # The pseudoinverse path (a tangent transposed, equation (1)): diagonal blocks
    # with a zero entry, solved by `Diagonal(well_posed=False)`; the tangent has
    # off-diagonal entries (not read) and keeps the zero entry fixed.
    d = np.diag([2.0, 0.0, 3.0])
    tangent = np.ones((_N, _N))
    tangent[1, 1] = 0.0
    b = (_rhs(_N, 4), _rhs(_N, 5))
    solver = lx.BlockDiagonal(lx.Diagonal(well_posed=False))

    def solve(m):
        op = lx.BlockDiagonalLinearOperator(
            [
                lx.MatrixLinearOperator(m, lx.diagonal_tag),
                lx.MatrixLinearOperator(np.diag([1.0, 2.0, 0.0]), lx.diagonal_tag),
            ]
        )
        return lx.linear_solve(op, b, solver).value[0]

    _, t_out = jax.jvp(solve, (d,), (tangent,))

    def pinv_solve(t):
        return np.linalg.pinv(np.diag(np.diag(d + t * tangent))) @ b[0]

    expected = (pinv_solve(1e-6) - pinv_solve(-1e-6)) / 2e-6
    np.testing.assert_allclose(t_out, expected, rtol=1e-6, atol=1e-8)


def test_kronecker_gradient_ignores_entries_its_solver_never_reads():
    other = _lower(1)
    b = _rhs(_N * _N, 6)
    tag = lx.lower_triangular_tag
    for solver in (lx.Kronecker(lx.Triangular()), lx.AutoLinearSolver(True)):

        def loss(m, solver=solver):
            op = lx.KroneckerLinearOperator(
                lx.MatrixLinearOperator(m, tag), lx.MatrixLinearOperator(other, tag)
            )
            return _sum_sin(lx.linear_solve(op, b, solver).value)

        _check_gradient(loss, _lower(0))


def test_woodbury_gradient_ignores_entries_its_solver_never_reads():
    # A diagonal-tagged base plus a rank-one update: Woodbury solves with the
    # base's diagonal only, so the base's off-diagonal entries have no gradient.
    rng = np.random.default_rng(7)
    u, v = rng.normal(size=(_N, 1)), rng.normal(size=(1, _N))
    b = _rhs(_N, 8)
    for solver in (lx.Woodbury(lx.Diagonal()), lx.AutoLinearSolver(True)):

        def loss(m, solver=solver):
            op = lx.LowRankUpdateLinearOperator(
                lx.MatrixLinearOperator(m, lx.diagonal_tag),
                lx.MatrixLinearOperator(u),
                lx.MatrixLinearOperator(np.eye(1)),
                lx.MatrixLinearOperator(v),
            )
            return _sum_sin(lx.linear_solve(op, b, solver).value)

        _check_gradient(loss, np.diag([2.0, 3.0, 4.0]))


def test_schur_gradient_ignores_entries_its_solver_never_reads():
    rng = np.random.default_rng(9)
    off = rng.normal(size=(_N, 2))
    b = (_rhs(_N, 10), _rhs(2, 11))

    def loss(m):
        op = lx.BlockLinearOperator(
            [
                [
                    lx.MatrixLinearOperator(m, lx.diagonal_tag),
                    lx.MatrixLinearOperator(off),
                ],
                [lx.MatrixLinearOperator(off.T), None],
            ]
        )
        return _sum_sin(lx.linear_solve(op, b, lx.Schur()).value)

    _check_gradient(loss, np.diag([2.0, 3.0, 4.0]))


def test_gradient_with_numpy_operands():
    # NumPy matrix and right-hand side, differentiated with respect to the matrix
    # (eagerly and under `jit`): JAX hands back NumPy constants (`TypedNdArray`)
    # for the stopped-gradient operator that `init` factorises and for the
    # right-hand side in the JVP rule; the type checks refused both.
    matrix = np.array([[3.0, 1.0], [0.5, 2.0]])
    b = np.array([1.0, -2.0])

    def loss(m):
        return jnp.sum(lx.linear_solve(lx.MatrixLinearOperator(m), b).value)

    expected = -np.outer(
        np.linalg.solve(matrix.T, np.ones(2)), np.linalg.solve(matrix, b)
    )
    np.testing.assert_allclose(jax.grad(loss)(matrix), expected, rtol=1e-12)
    np.testing.assert_allclose(jax.grad(jax.jit(loss))(matrix), expected, rtol=1e-12)


def test_block_diagonal_jvp_with_initial_guess_per_block():
    # Wide blocks: LSMR from a guess g returns g + pinv(A) (b - A g), SVD ignores
    # it. BlockDiagonal passes each block its guess, so the solution's derivative
    # (with respect to the blocks and the guesses) follows that, block by block;
    # the JVP took the whole solution for the pseudoinverse one (an error of 1.25).
    rng = np.random.default_rng(12)
    w1, w2 = rng.normal(size=(2, 4)), rng.normal(size=(2, 4))
    t_w1, t_w2 = rng.normal(size=(2, 4)), rng.normal(size=(2, 4))
    b = (rng.normal(size=2), rng.normal(size=2))
    g1, g2 = rng.normal(size=4), rng.normal(size=4)
    t_g1, t_g2 = rng.normal(size=4), rng.normal(size=4)
    solver = lx.BlockDiagonal((lx.LSMR(rtol=1e-12, atol=1e-12), lx.SVD()))

    def solve(w1, w2, g1, g2):
        op = lx.BlockDiagonalLinearOperator(
            [lx.MatrixLinearOperator(w1), lx.MatrixLinearOperator(w2)]
        )
        return lx.linear_solve(op, b, solver, options={"y0": (g1, g2)}).value

    primals = (w1, w2, g1, g2)
    tangents = (t_w1, t_w2, t_g1, t_g2)
    # (Compiled once, not op by op: the library traces the same path.)
    out, t_out = jax.jit(lambda p, t: jax.jvp(solve, p, t))(primals, tangents)

    def expected(eps):
        w1, w2, g1, _ = (p + eps * t for p, t in zip(primals, tangents))
        x1 = g1 + np.linalg.pinv(w1) @ (b[0] - w1 @ g1)
        return x1, np.linalg.pinv(w2) @ b[1]

    for x, t_x, e, e_plus, e_minus in zip(
        out, t_out, expected(0.0), expected(1e-6), expected(-1e-6)
    ):
        np.testing.assert_allclose(x, e, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(t_x, (e_plus - e_minus) / 2e-6, rtol=1e-6, atol=1e-7)


def test_block_diagonal_gradient_with_a_closure_block():
    # A block that is a function of the differentiated value (closure-converted:
    # its PyTree holds a jaxpr), tagged diagonal, so solved by its diagonal only.
    structure = jax.ShapeDtypeStruct((_N,), jnp.float64)
    b = (_rhs(_N, 13), _rhs(_N, 14))

    def loss(t):
        scale = jnp.array([1.0, 2.0, 3.0]) * t
        block = lx.FunctionLinearOperator(
            lambda x: scale * x, structure, lx.diagonal_tag
        )
        op = lx.BlockDiagonalLinearOperator(
            [block, lx.MatrixLinearOperator(_lower(0), lx.lower_triangular_tag)]
        )
        return _sum_sin(lx.linear_solve(op, b).value)

    x = _rhs(_N, 13) / (np.array([1.0, 2.0, 3.0]) * 2.0)
    expected = np.sum(np.cos(x) * -x / 2.0)
    np.testing.assert_allclose(jax.grad(loss)(2.0), expected, rtol=1e-10)
