"""Structured and sparse operators (Kronecker, low-rank update, block diagonal,
block, sparse) and their structure-exploiting solves, against the dense
materialised reference: operator methods, solves, `jit`, `vmap`, `jvp` and
`grad` (operator and vector tangents), and the named errors on bad input.

One table of cases; dtypes per case are a seeded sample (float64 always, plus
one of float32/complex128) to keep compile time low.
"""

import random
import re

import equinox as eqx
import jax
import jax.extend
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
import scipy.linalg
import scipy.sparse
from conftest import raises_message
from helpers import assert_close, flatten, randn, random_vector, sample
from jax.experimental import sparse as jsparse

import lineax as lx
from lineax._misc import tree_all_finite


def _mat(rng, shape, dtype, shift=0.0):
    m = randn(rng, shape, dtype)
    if shift:
        m = m + shift * np.eye(shape[0], dtype=m.dtype)
    return lx.MatrixLinearOperator(jnp.asarray(m, dtype))


def _kronecker(rng, dtype):
    op = lx.KroneckerLinearOperator(
        _mat(rng, (3, 3), dtype, 4.0), _mat(rng, (2, 2), dtype, 3.0)
    )
    return op, lx.AutoLinearSolver(well_posed=True), lx.Kronecker


def _low_rank(rng, dtype):
    d = jnp.asarray(rng.uniform(2.0, 3.0, 5), dtype)
    u = jnp.asarray(0.5 * randn(rng, (5, 2), dtype), dtype)
    c = jnp.asarray(randn(rng, (2, 2), dtype), dtype)
    v = jnp.asarray(0.5 * randn(rng, (2, 5), dtype), dtype)
    op = lx.LowRankUpdateLinearOperator(lx.DiagonalLinearOperator(d), u, c, v)
    return op, lx.AutoLinearSolver(well_posed=True), lx.Woodbury


def _block_diagonal_alike(rng, dtype):
    blocks = [_mat(rng, (2, 2), dtype, 3.0) for _ in range(3)]
    op = lx.BlockDiagonalLinearOperator(blocks)
    return op, lx.AutoLinearSolver(well_posed=True), lx.BlockDiagonal


def _block_diagonal_mixed(rng, dtype):
    diag = lx.DiagonalLinearOperator(jnp.asarray(rng.uniform(1.0, 2.0, 2), dtype))
    op = lx.BlockDiagonalLinearOperator([_mat(rng, (3, 3), dtype, 4.0), diag])
    return op, lx.AutoLinearSolver(well_posed=True), lx.BlockDiagonal


def _block_schur(rng, dtype):
    op = lx.BlockLinearOperator(
        [
            [_mat(rng, (3, 3), dtype, 4.0), _mat(rng, (3, 2), dtype)],
            [_mat(rng, (2, 3), dtype), _mat(rng, (2, 2), dtype, 3.0)],
        ]
    )
    return op, lx.Schur(), lx.Schur


def _sparse(rng, dtype):
    dense = randn(rng, (6, 6), dtype) * (rng.uniform(size=(6, 6)) < 0.4)
    dense = dense + 4 * np.eye(6)
    # (From SciPy, the same stored entries as `BCSR.fromdense`: that runs about
    # thirty operations op by op, each compiled on its own.)
    csr = scipy.sparse.csr_matrix(np.asarray(dense, dtype))
    op = lx.SparseLinearOperator(jsparse.BCSR.from_scipy_sparse(csr))
    return op, lx.AutoLinearSolver(well_posed=True), lx.LU


CASES = {
    "kronecker": _kronecker,
    "low_rank": _low_rank,
    "block_diagonal_alike": _block_diagonal_alike,
    "block_diagonal_mixed": _block_diagonal_mixed,
    "block_schur": _block_schur,
    "sparse": _sparse,
}


def _sample_params():
    sampler = random.Random(12)
    params = []
    for name in CASES:
        params.append((name, jnp.float64))
        params.append((name, sampler.choice([jnp.float32, jnp.complex128])))
    return params


PARAMS = _sample_params()


def _half(part):
    """Each case in one of its two dtypes of `PARAMS`, alternating over the cases,
    `part` choosing which (fixed-seed slices; both with LINEAX_EXHAUSTIVE=1): the
    tests of the operator's methods and of its solve take complementary halves."""
    return [
        pytest.param(name, dtype, id=f"{name}-{jnp.dtype(dtype).name}")
        for i, name in enumerate(CASES)
        for dtype in sample([d for n, d in PARAMS if n == name], (i + part) % 2)
    ]


def _make(name, dtype, seed=0):
    return CASES[name](np.random.default_rng(seed), dtype)


def _dense(op):
    return np.asarray(_as_matrix(op))


#
# Shared jitted functions (one trace per operator type and dtype).
#


# (The dense reference compiled once per operator type: run op by op, each of the
# operations of a structured operator's `as_matrix` compiled on its own.)
_as_matrix = eqx.filter_jit(lambda op: op.as_matrix())


@eqx.filter_jit
def _operator_methods(op, x, y):
    return (
        op.mv(x),
        op.as_matrix(),
        op.transpose().mv(y),
        op.transpose().as_matrix(),
        lx.diagonal(op),
        lx.conj(op).mv(x),
        lx.materialise(op).mv(x),
    )


@eqx.filter_jit
def _solve(op, b, solver):
    sol = lx.linear_solve(op, b, solver)
    return sol.value, sol.result


@eqx.filter_jit
def _transposed_solve(op, y, solver):
    # The solve through the transposed state (what reverse mode uses), compiled
    # once rather than op by op.
    state_t, _ = solver.transpose(solver.init(op, {}), {})
    x_t, result_t, _ = solver.compute(state_t, y, {})
    return x_t, result_t


def _dense_solve(op, b):
    return jnp.linalg.solve(op.as_matrix(), _flat(b))


def _flat(tree):
    return jnp.concatenate([jnp.reshape(x, -1) for x in jtu.tree_leaves(tree)])


@pytest.mark.parametrize("name, dtype", _half(0))
def test_operator_matches_dense(name, dtype):
    rng = np.random.default_rng(1)
    op, _, _ = _make(name, dtype)
    matrix = _dense(op)
    x = random_vector(rng, op.in_structure())
    y = random_vector(rng, op.out_structure())
    mv, as_matrix, mv_t, as_matrix_t, diag, conj_mv, mat_mv = _operator_methods(
        op, x, y
    )
    assert_close(flatten(mv), matrix @ flatten(x), dtype, scale=10)
    assert_close(as_matrix, matrix, dtype)
    assert_close(flatten(mv_t), matrix.T @ flatten(y), dtype, scale=10)
    assert_close(as_matrix_t, matrix.T, dtype)
    assert_close(diag, np.diagonal(matrix), dtype)
    assert_close(flatten(conj_mv), np.conj(matrix) @ flatten(x), dtype, scale=10)
    assert_close(flatten(mat_mv), matrix @ flatten(x), dtype, scale=10)
    # The structures are those of the dense matrix's rows and columns.
    assert op.in_size() == matrix.shape[1] and op.out_size() == matrix.shape[0]


@pytest.mark.parametrize("name, dtype", _half(1))
def test_solve_matches_dense(name, dtype):
    rng = np.random.default_rng(2)
    op, solver, expected = _make(name, dtype)
    chosen = solver
    if isinstance(solver, lx.AutoLinearSolver):
        chosen = solver.select_solver(op)
    assert isinstance(chosen, expected), chosen
    b = random_vector(rng, op.out_structure())
    value, result = _solve(op, b, solver)
    assert result == lx.RESULTS.successful
    want = np.linalg.solve(_dense(op), flatten(b))
    assert_close(flatten(value), want, dtype, scale=10)
    # And through the transposed state (what reverse mode uses).
    if not isinstance(solver, lx.AutoLinearSolver):
        y = random_vector(rng, op.in_structure())
        x_t, result_t = _transposed_solve(op, y, solver)
        assert result_t == lx.RESULTS.successful
        want_t = np.linalg.solve(_dense(op).T, flatten(y))
        assert_close(flatten(x_t), want_t, dtype, scale=10)


def _tangent_like(rng, op):
    """Random tangents for the inexact array leaves of `op`, None elsewhere."""
    return jtu.tree_map(
        lambda x: (
            jnp.asarray(randn(rng, x.shape, x.dtype), x.dtype)
            if eqx.is_inexact_array(x)
            else None
        ),
        op,
    )


_JVP_PARAMS = [("kronecker", jnp.float64), ("low_rank", jnp.complex128)]
_JVP_PARAMS += [(n, jnp.float64) for n in CASES if n not in ("kronecker", "low_rank")]


@pytest.mark.parametrize(
    "name, dtype", _JVP_PARAMS, ids=[f"{n}-{jnp.dtype(d).name}" for n, d in _JVP_PARAMS]
)
def test_jvp_and_grad_match_dense(name, dtype):
    """Forward and reverse mode through the structured solve equal those through a
    dense solve of the materialised matrix (operator and vector tangents)."""
    rng = np.random.default_rng(3)
    op, solver, _ = _make(name, dtype)
    b = random_vector(rng, op.out_structure())
    t_op = _tangent_like(rng, op)
    t_b = random_vector(rng, op.out_structure())

    def structured(op, b):
        return _flat(lx.linear_solve(op, b, solver).value)

    def dense(op, b):
        return _dense_solve(op, b)

    _, jvp = eqx.filter_jit(lambda *a: eqx.filter_jvp(structured, a, (t_op, t_b)))(
        op, b
    )
    # (The dense references compiled too: run op by op, each of their
    # operations compiled on its own.)
    _, jvp_ref = eqx.filter_jit(lambda *a: eqx.filter_jvp(dense, a, (t_op, t_b)))(op, b)
    assert_close(jvp, np.asarray(jvp_ref), dtype, scale=10)

    w = random_vector(rng, jax.ShapeDtypeStruct((op.in_size(),), dtype))

    def loss(fn):
        return lambda ob: jnp.real(jnp.vdot(w, fn(*ob)))

    grads = eqx.filter_jit(eqx.filter_grad(loss(structured)))((op, b))
    grads_ref = eqx.filter_jit(eqx.filter_grad(loss(dense)))((op, b))
    leaves = jtu.tree_leaves(eqx.filter(grads, eqx.is_inexact_array))
    leaves_ref = jtu.tree_leaves(eqx.filter(grads_ref, eqx.is_inexact_array))
    assert len(leaves) == len(leaves_ref)
    for g, g_ref in zip(leaves, leaves_ref):
        assert_close(g, np.asarray(g_ref), dtype, scale=10)


def test_jvp_matches_finite_differences_kronecker():
    rng = np.random.default_rng(4)
    op, solver, _ = _make("kronecker", jnp.float64)
    b = random_vector(rng, op.out_structure())
    t_op = _tangent_like(rng, op)

    def f(eps):
        moved = jtu.tree_map(
            lambda p, t: p if t is None else p + eps * t,
            op,
            t_op,
            is_leaf=lambda x: x is None,
        )
        return lx.linear_solve(moved, b, solver).value

    _, jvp = eqx.filter_jvp(lambda op: lx.linear_solve(op, b).value, (op,), (t_op,))
    h = 1e-6
    fd = (f(h) - f(-h)) / (2 * h)
    np.testing.assert_allclose(jvp, fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["kronecker", "low_rank", "block_diagonal_alike"])
def test_vmap_over_operator_and_vector(name):
    rng = np.random.default_rng(5)
    ops = [_make(name, jnp.float64, seed)[0] for seed in (0, 1)]
    solver = _make(name, jnp.float64)[1]
    stacked = jtu.tree_map(lambda *xs: jnp.stack(xs), *ops)
    bs = [random_vector(rng, ops[0].out_structure()) for _ in ops]
    stacked_b = jtu.tree_map(lambda *xs: jnp.stack(xs), *bs)
    # (Compiled once, not op by op: under `vmap` the library takes its traced path
    # either way, and `jit` compiles one program instead of each operation.)
    out = eqx.filter_jit(
        eqx.filter_vmap(lambda op, b: lx.linear_solve(op, b, solver).value)
    )(stacked, stacked_b)
    for i, (op, b) in enumerate(zip(ops, bs)):
        want = np.linalg.solve(_dense(op), flatten(b))
        assert_close(flatten(jtu.tree_map(lambda x, i=i: x[i], out)), want, jnp.float64)
    # Over the vector only: one state, many right-hand sides.
    out = jax.jit(jax.vmap(lambda b: lx.linear_solve(ops[0], b, solver).value))(
        stacked_b
    )
    for i, b in enumerate(bs):
        want = np.linalg.solve(_dense(ops[0]), flatten(b))
        assert_close(flatten(jtu.tree_map(lambda x, i=i: x[i], out)), want, jnp.float64)


#
# Structure and the choice of solver.
#


def test_kronecker_structure_from_factors():
    pd = lx.MatrixLinearOperator(2 * jnp.eye(2), lx.positive_semidefinite_tag)
    tri = lx.TridiagonalLinearOperator(jnp.ones(3), jnp.ones(2), jnp.ones(2))
    diag = lx.DiagonalLinearOperator(jnp.ones(2))
    assert lx.is_positive_semidefinite(lx.KroneckerLinearOperator(pd, pd))
    assert lx.is_symmetric(lx.KroneckerLinearOperator(pd, pd))
    assert lx.is_tridiagonal(lx.KroneckerLinearOperator(diag, tri))
    assert not lx.is_tridiagonal(lx.KroneckerLinearOperator(tri, diag))
    assert lx.is_negative_semidefinite(lx.KroneckerLinearOperator(pd, -pd))
    # The tridiagonal bands come out right (from the tag-based probing).
    op = lx.KroneckerLinearOperator(diag, tri)
    d, lower, upper = lx.tridiagonal(op)
    matrix = np.asarray(op.as_matrix())
    np.testing.assert_allclose(lower, np.diagonal(matrix, -1))
    # A diagonal product is solved elementwise, not by the Kronecker solver.
    auto = lx.AutoLinearSolver(well_posed=True)
    assert isinstance(
        auto.select_solver(lx.KroneckerLinearOperator(diag, diag)), lx.Diagonal
    )
    kronecker = auto.select_solver(lx.KroneckerLinearOperator(pd, pd))
    assert isinstance(kronecker, lx.Kronecker)
    assert isinstance(kronecker.inner, lx.AutoLinearSolver)


def test_block_diagonal_tridiagonal_bands():
    tri = lx.TridiagonalLinearOperator(
        jnp.arange(1.0, 4.0), jnp.ones(2), 2 * jnp.ones(2)
    )
    op = lx.BlockDiagonalLinearOperator([tri, tri])
    matrix = np.asarray(op.as_matrix())
    d, lower, upper = lx.tridiagonal(op)
    np.testing.assert_allclose(d, np.diagonal(matrix))
    np.testing.assert_allclose(lower, np.diagonal(matrix, -1))
    np.testing.assert_allclose(upper, np.diagonal(matrix, 1))
    assert lx.is_tridiagonal(op)
    assert isinstance(
        lx.AutoLinearSolver(well_posed=True).select_solver(op), lx.Tridiagonal
    )


def test_sparse_from_scipy_diagonal_without_densifying():
    rng = np.random.default_rng(6)
    n = 50
    m = scipy.sparse.random(n, n, density=0.05, rng=rng, format="csr")
    m = m + scipy.sparse.diags(np.arange(1.0, n + 1)) + scipy.sparse.eye(n, k=1)
    op = lx.SparseLinearOperator(m, max_dense_size=0)
    dense = m.toarray()
    np.testing.assert_allclose(lx.diagonal(op), np.diagonal(dense))
    d, lower, upper = lx.tridiagonal(op)
    np.testing.assert_allclose(lower, np.diagonal(dense, -1))
    np.testing.assert_allclose(upper, np.diagonal(dense, 1))
    x = rng.normal(size=n)
    np.testing.assert_allclose(op.mv(jnp.asarray(x)), dense @ x, rtol=1e-12)
    np.testing.assert_allclose(op.T.mv(jnp.asarray(x)), dense.T @ x, rtol=1e-12)


def test_sparse_krylov_is_matrix_free():
    """CG on a sparse Poisson matrix never densifies (`max_dense_size=0`)."""
    n = 30
    # SciPy leaves `offsets` unannotated: pyright types it by its default `0`.
    lap = scipy.sparse.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(n, n))  # pyright: ignore[reportArgumentType]
    op = lx.SparseLinearOperator(lap, lx.positive_semidefinite_tag, max_dense_size=0)
    b = jnp.ones(n)
    solver = lx.CG(rtol=1e-10, atol=1e-10)
    sol = lx.linear_solve(op, b, solver)
    np.testing.assert_allclose(sol.value, np.linalg.solve(lap.toarray(), b), rtol=1e-8)
    # Reverse mode through the matrix-free solve (compiled once: run op by op, it
    # compiled each of its ~80 operations, and the library traces the same path).
    grad = eqx.filter_jit(
        eqx.filter_grad(lambda op: lx.linear_solve(op, b, solver).value.sum())
    )(op)
    assert np.all(np.isfinite(grad.matrix.data))


#
# Named errors.
#


def test_error_mismatched_block_shapes():
    a = lx.MatrixLinearOperator(jnp.ones((3, 3)))
    b = lx.MatrixLinearOperator(jnp.ones((3, 2)))
    c = lx.MatrixLinearOperator(jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="Mismatched block shapes in column 0"):
        lx.BlockLinearOperator([[a, b], [c, c]])
    with pytest.raises(ValueError, match="same number of blocks"):
        lx.BlockLinearOperator([[a, b], [c]])
    with pytest.raises(ValueError, match="only None"):
        lx.BlockLinearOperator([[a, None], [None, None]])
    with pytest.raises(TypeError, match="blocks"):
        lx.BlockDiagonalLinearOperator(a)  # pyright: ignore[reportArgumentType]


def test_error_kronecker_factor_not_square_for_solve():
    op = lx.KroneckerLinearOperator(
        lx.MatrixLinearOperator(jnp.ones((2, 3))),
        lx.MatrixLinearOperator(jnp.ones((3, 2))),
    )
    with pytest.raises(ValueError, match="factor 0 has input size 3"):
        lx.Kronecker().init(op, {})
    with pytest.raises(ValueError, match="one dtype"):
        lx.KroneckerLinearOperator(
            lx.MatrixLinearOperator(jnp.ones((2, 2), jnp.float32)),
            lx.MatrixLinearOperator(jnp.ones((2, 2), jnp.float64)),
        )


def test_error_sparse_batch_dimensions():
    # Two batches of the 3x3 matrix of ones, with one batch dimension (what
    # `BCOO.fromdense(jnp.ones((2, 3, 3)), n_batch=1)` makes, which runs about fifty
    # operations op by op).
    indices = np.stack(np.meshgrid(np.arange(3), np.arange(3), indexing="ij"), -1)
    indices = np.broadcast_to(indices.reshape(1, 9, 2), (2, 9, 2))
    batched = jsparse.BCOO(
        (jnp.ones((2, 9)), jnp.asarray(indices, jnp.int32)), shape=(2, 3, 3)
    )
    assert (batched.n_batch, batched.n_dense) == (1, 0)
    with pytest.raises(ValueError, match="no batch or dense dimensions"):
        lx.SparseLinearOperator(batched)
    with pytest.raises(TypeError, match="MatrixLinearOperator"):
        lx.SparseLinearOperator(jnp.ones((3, 3)))


def test_error_sparse_densify_limit():
    op = lx.SparseLinearOperator(scipy.sparse.eye(20).tocsr() * 2.0, max_dense_size=100)
    with pytest.raises(ValueError, match="max_dense_size=100"):
        lx.linear_solve(op, jnp.ones(20), lx.LU())


def test_singular_capacitance_is_reported_not_nan():
    # I - e0 e0ᵀ is singular; its capacitance 1 + (-1) is exactly zero.
    n = 3
    identity = lx.IdentityLinearOperator(jax.ShapeDtypeStruct((n,), jnp.float64))
    e0 = np.eye(n)[:, :1]
    op = lx.LowRankUpdateLinearOperator(identity, -e0, np.eye(1), e0.T)
    sol = lx.linear_solve(op, jnp.ones(n), lx.Woodbury(), throw=False)
    assert sol.result == lx.RESULTS.singular
    with pytest.raises(eqx.EquinoxRuntimeError, match="singular"):
        lx.linear_solve(op, jnp.ones(n), lx.Woodbury())


def test_low_rank_error_names_argument():
    a = lx.MatrixLinearOperator(jnp.eye(4))
    with pytest.raises(ValueError, match="output structure of `u`"):
        lx.LowRankUpdateLinearOperator(
            a, jnp.ones((3, 2)), jnp.eye(2), jnp.ones((2, 4))
        )
    with pytest.raises(ValueError, match="`operator`"):
        lx.LowRankUpdateLinearOperator(
            lx.MatrixLinearOperator(jnp.ones((4, 3))),
            jnp.ones((4, 2)),
            jnp.eye(2),
            jnp.ones((2, 3)),
        )


def test_low_rank_error_for_vector_or_scalar_factor():
    # A rank-one update written with a 1-D `u` or a scalar `c`: the error names the
    # shape expected and how to get it (it used to say "got ndarray" / "got float").
    a = lx.DiagonalLinearOperator(jnp.arange(1.0, 5.0))
    with pytest.raises(
        ValueError, match=r"shape \(n, k\), got an array of shape \(4,\)"
    ):
        lx.LowRankUpdateLinearOperator(a, np.ones(4), np.eye(1), np.ones((1, 4)))
    with pytest.raises(TypeError, match=r"\(k, k\), got float.*jnp.array\(\[\[c\]\]\)"):
        lx.LowRankUpdateLinearOperator(a, np.ones((4, 1)), 2.0, np.ones((1, 4)))
    # (A list is not `ArrayLike`: under the test run's type checking the
    # signature's check comes first; `.ci/run` checks the message without it.)
    with raises_message(TypeError, "jnp.asarray"):
        lx.LowRankUpdateLinearOperator(a, [[1.0]] * 4, np.eye(1), np.ones((1, 4)))  # pyright: ignore[reportArgumentType]


def test_whole_operator_options_with_iterative_inner_solvers():
    # `y0` and `preconditioner` are of the whole operator. Passed on unchanged to
    # an iterative solver of each factor/block they failed its structure check
    # ("expected float64[3], got float64[6]"); now `y0` is per block for
    # BlockDiagonal, ignored by Kronecker/Schur, and a preconditioner is a named
    # error.
    psd = lx.positive_semidefinite_tag
    a = np.array([[4.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 2.0]])
    m = lx.MatrixLinearOperator(jnp.asarray(a), psd)
    b = np.arange(1.0, 10.0)
    # At most 4 steps: a 3×3 system takes 3.
    cg = lx.CG(rtol=1e-12, atol=1e-12, max_steps=4)
    kron = lx.KroneckerLinearOperator(m, m)
    x = np.linalg.solve(np.kron(a, a), b)
    solution = lx.linear_solve(kron, b, lx.Kronecker(cg), options={"y0": x})
    np.testing.assert_allclose(solution.value, x, rtol=1e-10)
    with pytest.raises(ValueError, match="cannot be used by their solvers"):
        lx.linear_solve(
            kron,
            b,
            lx.Kronecker(cg),
            options={"preconditioner": lx.JacobiPreconditioner(kron)},
        )
    # A direct inner solver ignores both, as LU does for a dense operator.
    options = {"y0": x, "preconditioner": lx.JacobiPreconditioner(kron)}
    solution = lx.linear_solve(kron, b, options=options)
    np.testing.assert_allclose(solution.value, x, rtol=1e-10)
    # BlockDiagonal (alike blocks, stored stacked): each block's own guess is
    # used; the exact guesses succeed with no steps.
    blocks = lx.BlockDiagonalLinearOperator([m, m])
    guess = (np.linalg.solve(a, b[:3]), np.linalg.solve(a, b[3:6]))
    exact = lx.BlockDiagonal(lx.CG(rtol=1e-12, atol=1e-12, max_steps=0))
    solution = lx.linear_solve(blocks, (b[:3], b[3:6]), exact, options={"y0": guess})
    assert solution.result == lx.RESULTS.successful
    with pytest.raises(ValueError, match="one initial guess per block"):
        lx.linear_solve(blocks, (b[:3], b[3:6]), exact, options={"y0": b[:6]})


def test_woodbury_reports_unconverged_column_solves():
    # With an iterative solver for `A`, `A⁻¹ U` may not converge while the solve
    # for the right-hand side does (here b = e₁, an eigenvector of a diagonal A:
    # one CG step). The answer is then wrong (residual ~1e-2), and was reported
    # as successful.
    n = 8
    a = lx.MatrixLinearOperator(
        jnp.diag(jnp.arange(1.0, n + 1.0)), lx.positive_semidefinite_tag
    )
    u = np.random.default_rng(0).normal(size=(n, 2))
    operator = lx.LowRankUpdateLinearOperator(
        a, u, np.eye(2), u.T, lx.positive_semidefinite_tag
    )
    b = np.eye(n)[0]
    solver = lx.Woodbury(lx.CG(rtol=1e-10, atol=1e-10, max_steps=2))
    solution = lx.linear_solve(operator, b, solver, throw=False)
    assert solution.result == lx.RESULTS.max_steps_reached
    # Enough steps: successful and right.
    solver = lx.Woodbury(lx.CG(rtol=1e-12, atol=1e-12, max_steps=n))
    solution = lx.linear_solve(operator, b, solver, throw=False)
    assert solution.result == lx.RESULTS.successful
    expected = np.linalg.solve(np.asarray(operator.as_matrix()), b)
    np.testing.assert_allclose(solution.value, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype, small", [(jnp.float32, 1e-10), (jnp.float64, 1e-20)])
def test_woodbury_reports_an_update_of_an_operator_too_ill_conditioned(dtype, small):
    # `diag(small, 1, 1) + e₁e₁ᵀ` (cond 2) with eps·cond(A) ≫ 1: the identity
    # cancels `A⁻¹b`'s 1/small to nothing and refinement cannot recover, so the
    # solution was `[0, 2, 3]` (answer `[1, 2, 3]`), reported successful. Now
    # `singular`, transposed too; Auto picks Woodbury for such an operator.
    u = jnp.eye(3, 1, dtype=dtype)
    diagonal = lx.DiagonalLinearOperator(jnp.array([small, 1.0, 1.0], dtype))
    operator = lx.LowRankUpdateLinearOperator(diagonal, u, jnp.eye(1, dtype=dtype), u.T)
    b = jnp.array([1.0, 2.0, 3.0], dtype)
    for op in (operator, operator.transpose()):
        for solver in (lx.Woodbury(), lx.AutoLinearSolver(well_posed=True)):
            solution = lx.linear_solve(op, b, solver, throw=False)
            assert solution.result == lx.RESULTS.singular, (solver, solution.value)
    with pytest.raises(eqx.EquinoxRuntimeError, match="lx.materialise"):
        lx.linear_solve(operator, b, lx.Woodbury())
    # A well-conditioned `A` (1e-3 in float32), and a numerically singular `M`
    # of a well-conditioned `A` (its solution huge, as LU's), are successful.
    ok = lx.LowRankUpdateLinearOperator(
        lx.DiagonalLinearOperator(jnp.array([1e-3, 1.0, 1.0], dtype)),
        u,
        jnp.eye(1, dtype=dtype),
        u.T,
    )
    solution = lx.linear_solve(ok, b, lx.Woodbury())
    expected = np.linalg.solve(np.asarray(ok.as_matrix(), np.float64), b)
    np.testing.assert_allclose(solution.value, expected, rtol=1e-5)
    nearly = lx.LowRankUpdateLinearOperator(
        lx.DiagonalLinearOperator(jnp.ones(3, dtype)),
        u,
        jnp.array([[-1.0 + 1e3 * float(jnp.finfo(dtype).eps)]], dtype),
        u.T,
    )
    solution = lx.linear_solve(nearly, b, lx.Woodbury(), throw=False)
    assert solution.result == lx.RESULTS.successful
    assert abs(float(solution.value[0])) > 1e2


def test_schur_needs_two_by_two():
    a = lx.MatrixLinearOperator(jnp.eye(2))
    op = lx.BlockLinearOperator([[a]])
    with pytest.raises(ValueError, match="2×2"):
        lx.Schur().init(op, {})


#
# Performance-shaped behaviour (issue 12's benchmarks): regression tests.
#


def _count_primitives(fn, *args) -> dict[str, int]:
    counts: dict[str, int] = {}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return counts


def test_block_diagonal_alike_blocks_stored_stacked():
    """Alike blocks are one stacked operator: the operator has one array leaf and
    the solve one batched factorisation, whatever the number of blocks (the
    benchmark's 100 blocks compiled in 21 s when each was traced separately)."""
    rng = np.random.default_rng(20)
    count = 7
    mats = randn(rng, (count, 3, 3), np.float64) + 4 * np.eye(3)

    def make(mats):
        return lx.BlockDiagonalLinearOperator(
            [lx.MatrixLinearOperator(mats[i]) for i in range(count)]
        )

    op = make(jnp.asarray(mats))
    assert op.stacked is not None
    assert len(jtu.tree_leaves(op)) == 1
    assert len(op.blocks) == count
    b = tuple(jnp.asarray(rng.normal(size=3)) for _ in range(count))

    def solve(mats, b):
        return lx.linear_solve(make(mats), b).value

    counts = _count_primitives(solve, jnp.asarray(mats), b)
    assert counts.get("lu", 0) == 1
    got = np.concatenate(jax.jit(solve)(jnp.asarray(mats), b))
    dense = np.asarray(scipy.linalg.block_diag(*mats))
    np.testing.assert_allclose(got, np.linalg.solve(dense, np.concatenate(b)))
    # Methods on the stacked storage match the dense reference.
    np.testing.assert_allclose(op.as_matrix(), dense)
    np.testing.assert_allclose(op.T.as_matrix(), dense.T)
    np.testing.assert_allclose(lx.diagonal(op), np.diagonal(dense))
    np.testing.assert_allclose(lx.materialise(op).as_matrix(), dense)
    np.testing.assert_allclose(
        np.concatenate(op.mv(b)), dense @ np.concatenate(b), rtol=1e-12
    )


def test_block_diagonal_of_alike_blocks_without_arrays():
    """Alike blocks that hold no arrays (identities, or scaled by a Python
    scalar): a stack of them had no axis to `vmap` over, and `as_matrix`,
    `diagonal`, `tridiagonal`, `JacobiPreconditioner` and every solve failed with
    JAX's "Cannot resolve batch dimension"."""
    identity = lx.IdentityLinearOperator(jax.ShapeDtypeStruct((3,), jnp.float64))
    b = (jnp.arange(1.0, 4.0), jnp.arange(4.0, 7.0))
    for scale, block in ((1.0, identity), (2.0, identity * 2.0)):
        op = lx.BlockDiagonalLinearOperator([block, block])
        dense = scale * np.eye(6)
        np.testing.assert_allclose(op.as_matrix(), dense)
        np.testing.assert_allclose(op.T.as_matrix(), dense)
        np.testing.assert_allclose(lx.diagonal(op), np.diagonal(dense))
        np.testing.assert_allclose(lx.tridiagonal(op)[0], np.diagonal(dense))
        np.testing.assert_allclose(
            lx.JacobiPreconditioner(op).as_matrix(), np.linalg.inv(dense)
        )
        expected = np.concatenate(b) / scale
        for solve in (lx.linear_solve, jax.jit(lx.linear_solve)):
            np.testing.assert_allclose(np.concatenate(solve(op, b).value), expected)


def test_block_diagonal_finiteness_test_does_not_grow_with_blocks():
    """The solution's finiteness test stacks the blocks' alike solutions into one
    reduction: one per block made the benchmark's 100 blocks compile for 6-20 s."""

    def reductions(count):
        mats = jnp.asarray(np.eye(3) * 2.0 + np.zeros((count, 1, 1)))

        def solve(mats, b):
            op = lx.BlockDiagonalLinearOperator(
                [lx.MatrixLinearOperator(mats[i]) for i in range(count)]
            )
            return lx.linear_solve(op, tuple(b), throw=False).value

        b = jnp.ones((count, 3))
        return jax.jit(solve).lower(mats, b).as_text().count("stablehlo.reduce")

    assert reductions(40) == reductions(4) < 12
    # Non-finite values in one leaf of a group (or in a lone leaf) are found.
    nan_in_one = [jnp.ones(3)] * 5 + [jnp.array([1.0, jnp.nan, 1.0]), jnp.ones(2)]
    assert not tree_all_finite(nan_in_one)
    lone = [jnp.ones(3)] * 5 + [jnp.array([jnp.inf, 1.0])]
    assert not tree_all_finite(lone)
    assert tree_all_finite([jnp.ones(3)] * 5 + [jnp.ones(2), 1.0])


def test_block_diagonal_error_branch_does_not_grow_with_blocks():
    """With `throw=True`, the error branch receives the blocks' alike solutions
    and right-hand sides stacked (its 200 operands for 100 blocks took most of the
    benchmark's compile time), and still reports a NaN in one block's input."""
    count = 40
    mats = jnp.asarray(np.eye(3) * 2.0 + np.zeros((count, 1, 1)))

    @jax.jit
    def solve(mats, b):
        op = lx.BlockDiagonalLinearOperator(
            [lx.MatrixLinearOperator(mats[i]) for i in range(count)]
        )
        return jnp.stack(lx.linear_solve(op, tuple(b)).value)

    b = np.ones((count, 3))
    text = solve.lower(mats, jnp.asarray(b)).as_text()
    # The conditional returns the solution: one stacked array, not 40 vectors.
    results_of_case = re.findall(r"(%[\w:]+) = \"stablehlo.case\"", text)
    assert results_of_case and all(":" not in r for r in results_of_case)
    np.testing.assert_allclose(solve(mats, jnp.asarray(b)), b / 2)
    b[7, 1] = np.nan
    # (Blocking: on a GPU the error surfaces when the result is waited for.)
    with pytest.raises(Exception, match="contains NaN or inf"):
        jax.block_until_ready(solve(mats, jnp.asarray(b)))


def test_block_diagonal_stacked_tridiagonal_and_tags():
    rng = np.random.default_rng(21)
    tris = [
        lx.TridiagonalLinearOperator(
            jnp.asarray(rng.uniform(2, 3, 4)),
            jnp.asarray(rng.normal(size=3)),
            jnp.asarray(rng.normal(size=3)),
        )
        for _ in range(3)
    ]
    op = lx.BlockDiagonalLinearOperator(tris)
    assert op.stacked is not None
    matrix = np.asarray(op.as_matrix())
    d, lower, upper = lx.tridiagonal(op)
    np.testing.assert_allclose(d, np.diagonal(matrix))
    np.testing.assert_allclose(lower, np.diagonal(matrix, -1))
    np.testing.assert_allclose(upper, np.diagonal(matrix, 1))
    # Blocks alike in shape but not in tags are not stacked, and stay correct.
    mats = [_mat(rng, (2, 2), jnp.float64, 3.0) for _ in range(2)]
    spd = lx.MatrixLinearOperator(jnp.eye(2), lx.positive_semidefinite_tag)
    mixed = lx.BlockDiagonalLinearOperator([*mats, spd])
    assert mixed.stacked is None
    assert not lx.is_positive_semidefinite(mixed)


def test_block_diagonal_stacked_grad_matches_dense():
    rng = np.random.default_rng(22)
    mats = jnp.asarray(randn(rng, (3, 2, 2), np.float64) + 3 * np.eye(2))
    b = jnp.asarray(rng.normal(size=(3, 2)))

    def loss(mats, b):
        op = lx.BlockDiagonalLinearOperator(
            [lx.MatrixLinearOperator(mats[i]) for i in range(3)]
        )
        out = lx.linear_solve(op, tuple(b[i] for i in range(3))).value
        return jnp.sum(jnp.stack(out) ** 3)

    def loss_dense(mats, b):
        return jnp.sum(jnp.linalg.solve(mats, b[..., None])[..., 0] ** 3)

    got = jax.jit(jax.grad(loss, argnums=(0, 1)))(mats, b)
    want = jax.jit(jax.grad(loss_dense, argnums=(0, 1)))(mats, b)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-10)


@pytest.mark.parametrize("fmt", ["bcsr", "bcoo", "bcoo_padded", "bcsr_padded"])
def test_sparse_product_without_jax_sparse_matmul(fmt):
    """`mv` is a gather and a segment sum over the stored entries (JAX's BCSR
    matmul was 10-20x slower on the CPU); padded storage (`nse` above the number
    of entries) is ignored; transpose and `jit` of a traced matrix work."""
    rng = np.random.default_rng(23)
    m = scipy.sparse.random(9, 6, density=0.3, rng=rng, format="csr")
    dense = m.toarray()
    matrix = {
        "bcsr": lambda: jsparse.BCSR.from_scipy_sparse(m),
        "bcoo": lambda: jsparse.BCOO.from_scipy_sparse(m),
        "bcoo_padded": lambda: jsparse.BCOO.fromdense(jnp.asarray(dense), nse=40),
        "bcsr_padded": lambda: jsparse.BCSR.fromdense(jnp.asarray(dense), nse=40),
    }[fmt]()
    x = jnp.asarray(rng.normal(size=6))
    y = jnp.asarray(rng.normal(size=9))

    def product(matrix, x):
        return lx.SparseLinearOperator(matrix).mv(x)

    counts = _count_primitives(product, matrix, x)
    assert not any(name.startswith(("bcsr", "bcoo")) for name in counts)
    np.testing.assert_allclose(jax.jit(product)(matrix, x), dense @ x, rtol=1e-12)
    op = lx.SparseLinearOperator(matrix)
    mv_t, grad = _transpose_mv_and_grad(op, op.T, x, y)
    np.testing.assert_allclose(mv_t, dense.T @ y, rtol=1e-12)
    # Gradients land on the stored values (nothing derived holds values).
    _assert_gradient_lands_on_stored_values(op, grad, dense, x)


@eqx.filter_jit
def _transpose_mv_and_grad(op, transposed, x, y):
    # `A^T y` and the gradient of |A x|^2 in the operator, compiled once per case
    # (op by op, each of the operations of a sparse product and of its gradient
    # compiled on its own). The transpose is taken outside, as a user's eager
    # `op.T` is: of concrete indices, on the host (under `jit` they are traced).
    grad = eqx.filter_grad(lambda op: jnp.sum(op.mv(x) ** 2))(op)
    return transposed.mv(y), grad


def _assert_gradient_lands_on_stored_values(op, grad, dense, x):
    # The gradient of |A x|^2 with respect to the stored values is 2 (A x) x^T at
    # the stored positions (nothing derived from the values may hold them).
    got = scipy.sparse.coo_matrix(
        (np.asarray(grad.matrix.data), np.asarray(_stored_indices(op)).T),
        shape=dense.shape,
    ).toarray()
    want = np.outer(2 * dense @ x, x) * (dense != 0)
    np.testing.assert_allclose(got * (dense != 0), want, rtol=1e-12)


def _poisson(side):
    one = 2 * np.eye(side) - np.eye(side, k=1) - np.eye(side, k=-1)
    eye = np.eye(side)
    # (Sparse factors: with two NumPy arrays, newer SciPy warns about the return type.)
    one, eye = scipy.sparse.csr_array(one), scipy.sparse.csr_array(eye)
    return (scipy.sparse.kron(one, eye) + scipy.sparse.kron(eye, one)).tocsr()


@pytest.mark.parametrize("fmt", ["bcsr", "bcoo", "bcoo_padded", "rectangular"])
def test_sparse_banded_product_by_diagonals(fmt):
    """A banded matrix with concrete indices is multiplied diagonal by diagonal
    (no scatter: 3-6x faster than the segment sum on the CPU), inside `jit` when
    passed in as an argument; products, transpose, diagonal, gradients and a CG
    solve match the dense reference."""
    rng = np.random.default_rng(25)
    poisson = _poisson(4)
    offsets = (-4, -1, 0, 1, 4)
    if fmt == "rectangular":
        rectangular = np.eye(7, 5, k=-2) + 2 * np.eye(7, 5) + 3 * np.eye(7, 5, k=3)
        poisson = scipy.sparse.csr_matrix(rectangular)
        offsets = (-2, 0, 3)
    dense = poisson.toarray()
    matrix = {
        "bcsr": lambda: jsparse.BCSR.from_scipy_sparse(poisson),
        "bcoo": lambda: jsparse.BCOO.from_scipy_sparse(poisson),
        "bcoo_padded": lambda: jsparse.BCOO.fromdense(jnp.asarray(dense), nse=70),
        "rectangular": lambda: jsparse.BCSR.from_scipy_sparse(poisson),
    }[fmt]()
    # (A tall matrix cannot be positive semidefinite: the tag is refused there.)
    tags = () if fmt == "rectangular" else lx.positive_semidefinite_tag
    op = lx.SparseLinearOperator(matrix, tags)
    assert op._offsets == offsets
    x = jnp.asarray(rng.normal(size=dense.shape[1]))
    y = jnp.asarray(rng.normal(size=dense.shape[0]))
    mv = jax.jit(lambda op, x: op.mv(x))
    counts = _count_primitives(mv, op, x)
    assert not any("scatter" in name for name in counts), counts
    np.testing.assert_allclose(mv(op, x), dense @ x, rtol=1e-12)
    mv_t, grad = _transpose_mv_and_grad(op, op.T, x, y)
    np.testing.assert_allclose(mv_t, dense.T @ y, rtol=1e-12)
    np.testing.assert_allclose(
        _vmap_mv(op, jnp.stack([x, 2 * x])), np.stack([dense @ x, 2 * dense @ x])
    )
    _assert_gradient_lands_on_stored_values(op, grad, dense, x)
    if fmt == "bcsr":
        np.testing.assert_allclose(_diagonal(op), np.diagonal(dense))
        solve = jax.jit(lambda op, b: lx.linear_solve(op, b, lx.CG(1e-12, 1e-12)))
        np.testing.assert_allclose(
            solve(op, y).value, np.linalg.solve(dense, y), rtol=1e-10
        )


# (Compiled once, not op by op; the operator's diagonal layout is a static field,
# which `jit` keeps.)
_vmap_mv = eqx.filter_jit(lambda op, xs: jax.vmap(op.mv)(xs))
_diagonal = eqx.filter_jit(lx.diagonal)


def test_sparse_diagonal_layout_falls_back():
    """Stored duplicates (summed), scattered entries, and traced indices take the
    segment sum, with the same answers."""
    rng = np.random.default_rng(26)
    data = jnp.asarray([1.0, 2.0, 3.0, 4.0])
    indices = jnp.asarray([[0, 0], [1, 1], [1, 1], [2, 0]])
    duplicated = jsparse.BCOO((data, indices), shape=(3, 3))
    op = lx.SparseLinearOperator(duplicated)
    assert op._offsets == ()
    np.testing.assert_allclose(
        op.mv(jnp.ones(3)), np.asarray(duplicated.todense()) @ np.ones(3)
    )
    scattered = rng.normal(size=(30, 30)) * (rng.uniform(size=(30, 30)) < 0.2)
    assert lx.SparseLinearOperator(scipy.sparse.csr_matrix(scattered))._offsets == ()
    poisson = jsparse.BCSR.from_scipy_sparse(_poisson(3))
    traced = jax.jit(lambda m: lx.SparseLinearOperator(m)._offsets == ())(poisson)
    assert traced


def _stored_indices(op):
    matrix = op.matrix
    if isinstance(matrix, jsparse.BCSR):
        matrix = matrix.to_bcoo()
    return np.clip(np.asarray(matrix.indices), 0, np.asarray(matrix.shape) - 1)


@pytest.mark.parametrize("name", ["kronecker", "low_rank", "block_diagonal_alike"])
def test_auto_sees_through_tagged_structured_operator(name):
    """`AutoLinearSolver` picks the structured solver for a tagged structured
    operator, and the solve matches the dense one."""
    rng = np.random.default_rng(24)
    op, _, expected = CASES[name](rng, jnp.float64)
    tagged = lx.TaggedLinearOperator(op, lx.symmetric_tag)
    if name == "kronecker":
        tagged = lx.TaggedLinearOperator(op, ())  # keep it honest: not symmetric
    auto = lx.AutoLinearSolver(well_posed=True)
    assert isinstance(auto.select_solver(tagged), expected)
    b = random_vector(rng, tagged.out_structure())
    if name != "kronecker":
        # Only the tag's promise is exercised here, not its truth.
        tagged = lx.TaggedLinearOperator(op, ())
    sol = lx.linear_solve(tagged, b).value
    want = np.linalg.solve(np.asarray(op.as_matrix()), flatten(b))
    np.testing.assert_allclose(flatten(sol), want, rtol=1e-10)
