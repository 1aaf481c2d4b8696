"""Adversarial checks of the preconditioners and `SparseLinearOperator`, as users
build them: inside `jax.jit`, from SciPy matrices, with Python-number parameters.
Each test here failed before the fix it protects."""

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse
from helpers import backend_compiles
from jax.experimental import sparse as jsparse

import lineax as lx


def _spd(n: int, seed: int = 0) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(n, n))
    return a @ a.T + n * np.eye(n)


#
# Parameters given as Python numbers, with the preconditioner built inside `jit`.
#


@pytest.mark.parametrize(
    "make",
    [
        lambda op: lx.SSORPreconditioner(op),
        lambda op: lx.SSORPreconditioner(op, 1.3),
        lambda op: lx.NeumannPreconditioner(op, 3, 0.05),
    ],
    ids=["ssor-default", "ssor-omega", "neumann-scale"],
)
def test_preconditioner_with_python_number_parameters_builds_inside_jit(make):
    # Under `jit`, `jnp.asarray(1.3)` is traced: the concrete checks of `omega`
    # and `scale` called `float`/`complex` on it and raised a
    # ConcretizationTypeError, so SSOR could not be built under `jit` at all.
    matrix = _spd(5)

    def apply(a):
        vector = jnp.arange(1.0, 6.0)
        op = lx.MatrixLinearOperator(a, lx.positive_semidefinite_tag)
        return make(op).mv(vector)

    np.testing.assert_allclose(jax.jit(apply)(matrix), apply(matrix), rtol=1e-14)


def test_bad_python_number_parameters_are_named_errors_inside_jit():
    op = lx.MatrixLinearOperator(jnp.asarray(_spd(4)), lx.positive_semidefinite_tag)
    with pytest.raises(ValueError, match="omega"):
        jax.jit(lambda o: lx.SSORPreconditioner(o, 2.5).mv(jnp.ones(4)))(op)
    with pytest.raises(ValueError, match="scale"):
        jax.jit(lambda o: lx.NeumannPreconditioner(o, 2, -1.0).mv(jnp.ones(4)))(op)


#
# SciPy matrices and NumPy index arrays inside `jit`.
#


def _poisson_1d_scipy(n: int) -> scipy.sparse.csr_matrix:
    return scipy.sparse.csr_matrix(
        # SciPy leaves `offsets` unannotated: pyright types it by its default `0`.
        scipy.sparse.diags([-1.0, 2.5, -1.0], [-1, 0, 1], shape=(n, n))  # pyright: ignore[reportArgumentType]
    )


def test_scipy_matrix_inside_jit_keeps_its_pattern():
    # `BCSR.from_scipy_sparse` inside `jit` gave traced index arrays: the
    # incomplete factorisations refused the operator (ValueError, "index arrays
    # must be concrete") and `mv` lost its banded layout.
    matrix = _poisson_1d_scipy(6)
    b = jnp.arange(1.0, 7.0)
    solver = lx.CG(rtol=1e-12, atol=1e-12, max_steps=20)

    def solve(b):
        op = lx.SparseLinearOperator(matrix, lx.positive_semidefinite_tag)
        assert op._diagonal_slots is not None
        precond = lx.IncompleteCholeskyPreconditioner(op)
        ilu = lx.ILUPreconditioner(op)
        options = {"preconditioner": precond}
        return lx.linear_solve(op, b, solver, options=options).value, ilu.mv(b)

    x, y = jax.jit(solve)(b)
    want = np.linalg.solve(matrix.toarray(), np.asarray(b))
    np.testing.assert_allclose(x, want, rtol=1e-12)
    # A tridiagonal matrix's ILU(0) is its exact LU.
    np.testing.assert_allclose(y, want, rtol=1e-12)


def test_numpy_indices_traced_inside_jit_is_a_named_error():
    matrix = _poisson_1d_scipy(5).tocoo()
    indices = np.stack([matrix.row, matrix.col], axis=1)

    def build(data):
        # NumPy `indices` on purpose (JAX types them as arrays).
        bcoo = jsparse.BCOO((data, indices), shape=(5, 5))  # pyright: ignore[reportArgumentType]
        return lx.ILUPreconditioner(lx.SparseLinearOperator(bcoo)).mv(jnp.ones(5))

    with pytest.raises(ValueError, match="ensure_compile_time_eval"):
        jax.jit(build)(matrix.data)


#
# NumPy vectors.
#


def test_preconditioners_apply_to_numpy_vectors():
    # `mv` of a NumPy vector (what a user has at hand) failed the library's own
    # type check (`apply_flat` annotated its vector as JAX arrays only), while
    # every other operator's `mv` accepts it.
    matrix = _spd(4)
    op = lx.MatrixLinearOperator(jnp.asarray(matrix), lx.positive_semidefinite_tag)
    sparse = lx.SparseLinearOperator(
        scipy.sparse.csr_matrix(matrix), lx.positive_semidefinite_tag
    )
    vector = np.arange(1.0, 5.0)
    for precond in [
        lx.JacobiPreconditioner(op),
        lx.BlockJacobiPreconditioner(op, 2),
        lx.SSORPreconditioner(op),
        lx.ChebyshevPreconditioner(op, 2),
        lx.NeumannPreconditioner(op, 2),
        lx.ILUPreconditioner(sparse),
        lx.IncompleteCholeskyPreconditioner(sparse),
    ]:
        np.testing.assert_allclose(
            precond.mv(vector), precond.mv(jnp.asarray(vector)), rtol=1e-15
        )


#
# The transpose and conjugate of a sparse operator inside `jit`.
#


def _awkward_sparse(fmt: str):
    """A 4×6 complex matrix stored with unsorted entries, a duplicate and padding
    slots; its dense value."""
    rows = np.array([2, 0, 3, 0, 1, 2, 0])
    cols = np.array([5, 1, 0, 4, 1, 2, 1])
    data = np.arange(1.0, 8.0) + 1j * np.arange(7.0, 0.0, -1.0)
    dense = np.zeros((4, 6), complex)
    np.add.at(dense, (rows, cols), data)
    coo = jsparse.BCOO(
        (jnp.asarray(data), jnp.asarray(np.stack([rows, cols], 1), jnp.int32)),
        shape=(4, 6),
    )
    if fmt == "bcsr":
        coo = coo.sort_indices()
        matrix = jsparse.BCSR.from_bcoo(coo)
        # Two padding slots past indptr[-1].
        matrix = jsparse.BCSR(
            (
                jnp.concatenate([matrix.data, jnp.array([9.0j, 9.0j])]),
                jnp.concatenate([matrix.indices, jnp.array([0, 0], jnp.int32)]),
                matrix.indptr,
            ),
            shape=(4, 6),
        )
    else:
        matrix = jsparse.BCOO(
            (
                jnp.concatenate([coo.data, jnp.array([9.0j, 9.0j])]),
                jnp.concatenate([coo.indices, jnp.array([[4, 6], [4, 6]], jnp.int32)]),
            ),
            shape=(4, 6),
        )
    return matrix, dense


@pytest.mark.parametrize("fmt", ["bcoo", "bcsr"])
def test_sparse_transpose_and_conj_keep_concrete_indices_inside_jit(fmt):
    # JAX's sparse transposes sort indices and values together, and the
    # conjugate mapped `jnp.conj` over the index arrays too: inside `jit` (values
    # traced) the result had traced indices, so `lx.ILUPreconditioner` of
    # `op.transpose()` or `lx.conj(op)` built inside `jit` raised a ValueError
    # and the transposed operator lost its banded layout.
    matrix, dense = _awkward_sparse(fmt)
    x6 = jnp.asarray(np.arange(1.0, 7.0) - 2j)
    x4 = jnp.asarray(np.arange(1.0, 5.0) + 1j)

    @jax.jit
    def products(data):
        if fmt == "bcsr":
            assert isinstance(matrix, jsparse.BCSR)
            m = jsparse.BCSR((data, matrix.indices, matrix.indptr), shape=(4, 6))
        else:
            m = jsparse.BCOO((data, matrix.indices), shape=(4, 6))
        op = lx.SparseLinearOperator(m)
        transposed, conjugated = op.transpose(), lx.conj(op)
        assert isinstance(transposed, lx.SparseLinearOperator)
        assert isinstance(conjugated, lx.SparseLinearOperator)
        # The pattern stayed concrete (the banded layout and ILU need it).
        for m in (transposed.matrix, conjugated.matrix):
            if fmt == "bcsr":
                assert isinstance(m, jsparse.BCSR)
                index_arrays = (m.indices, m.indptr)
            else:
                index_arrays = (m.indices,)
            assert not any(isinstance(i, jax.core.Tracer) for i in index_arrays)
        return (
            transposed.mv(x4),
            conjugated.mv(x6),
            transposed.transpose().mv(x6),
            transposed.as_matrix(),
        )

    t, c, tt, t_dense = products(matrix.data)
    np.testing.assert_allclose(t, dense.T @ np.asarray(x4), rtol=1e-14)
    np.testing.assert_allclose(c, dense.conj() @ np.asarray(x6), rtol=1e-14)
    np.testing.assert_allclose(tt, dense @ np.asarray(x6), rtol=1e-14)
    np.testing.assert_array_equal(t_dense, dense.T)


def test_ilu_of_transposed_sparse_operator_builds_inside_jit():
    # SciPy still takes the legacy `random_state` (untyped); `rng=3` draws another
    # matrix.
    a = scipy.sparse.random(6, 6, density=0.4, random_state=3) + 4 * scipy.sparse.eye(6)  # pyright: ignore[reportCallIssue]
    a = a.tocsr()
    indices, indptr = jnp.asarray(a.indices), jnp.asarray(a.indptr)
    b = jnp.arange(1.0, 7.0)

    def apply(data):
        matrix = jsparse.BCSR((data, indices, indptr), shape=a.shape)
        op = lx.SparseLinearOperator(matrix)
        return lx.ILUPreconditioner(op.transpose()).mv(b)

    want = lx.ILUPreconditioner(lx.SparseLinearOperator(a.T.tocsr())).mv(b)
    np.testing.assert_allclose(jax.jit(apply)(a.data), want, rtol=1e-14)
    # And gradients through the permuted values reach the original ones.
    grad = jax.grad(lambda d: jnp.sum(apply(d)))(a.data)
    eps = 1e-6
    e = np.random.default_rng(0).normal(size=a.data.shape)
    up, down = jnp.sum(apply(a.data + eps * e)), jnp.sum(apply(a.data - eps * e))
    fd = (up - down) / (2 * eps)
    np.testing.assert_allclose(grad @ e, fd, rtol=1e-7)


#
# Block Jacobi and SSOR of a sparse operator.
#


@pytest.mark.parametrize("fmt", ["bcoo", "bcsr"])
def test_block_jacobi_of_sparse_operator_reads_its_stored_blocks(fmt):
    # It refused a `SparseLinearOperator` as "matrix-free" and told the user to
    # pass `lx.materialise(operator)`, which returns the same sparse operator.
    rng = np.random.default_rng(4)
    n = 7  # block size 3 does not divide it
    dense = rng.normal(size=(n, n)) * (rng.uniform(size=(n, n)) < 0.5)
    dense += 5 * np.eye(n)
    rows, cols = np.nonzero(dense)
    # Stored with a duplicate (split in halves) and padding.
    rows, cols = np.concatenate([rows, rows[:1]]), np.concatenate([cols, cols[:1]])
    data = dense[rows, cols].copy()
    data[0] /= 2
    data[-1] /= 2
    coo = jsparse.BCOO(
        (jnp.asarray(data), jnp.asarray(np.stack([rows, cols], 1), jnp.int32)),
        shape=(n, n),
    )
    coo = jsparse.BCOO(
        (
            jnp.concatenate([coo.data, jnp.array([1.0, 1.0])]),
            jnp.concatenate([coo.indices, jnp.full((2, 2), n, jnp.int32)]),
        ),
        shape=(n, n),
    )
    matrix = jsparse.BCSR.from_bcoo(coo.sort_indices()) if fmt == "bcsr" else coo
    op = lx.SparseLinearOperator(matrix, max_dense_size=0)  # never densified
    want = np.zeros((n, n))
    for start in range(0, n, 3):
        s = slice(start, min(start + 3, n))
        want[s, s] = np.linalg.inv(dense[s, s])
    precond = jax.jit(lambda o: lx.BlockJacobiPreconditioner(o, 3))(op)
    got = jax.vmap(precond.mv)(jnp.eye(n)).T
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)
    got_t = jax.vmap(precond.transpose().mv)(jnp.eye(n)).T
    np.testing.assert_allclose(got_t, want.T, rtol=1e-13, atol=1e-15)


def test_ssor_of_sparse_operator_names_the_sparse_alternatives():
    op = lx.SparseLinearOperator(scipy.sparse.eye(4, format="csr"))
    with pytest.raises(ValueError, match="ILUPreconditioner"):
        lx.SSORPreconditioner(op)


#
# Parameters that are not finite, or complex where they must be real.
#


def test_non_finite_or_complex_parameters_are_named_errors():
    # An infinite Chebyshev bound or Neumann scale gave a NaN preconditioner (the
    # solve then reported a breakdown "of the operator"), a NaN scale was
    # accepted, and a complex omega/interval/scale for a real operator raised
    # Python's unnamed "float() argument must be ... not 'complex'".
    op = lx.MatrixLinearOperator(jnp.asarray(_spd(4)), lx.positive_semidefinite_tag)
    cases = [
        ("interval", lambda: lx.ChebyshevPreconditioner(op, 2, (1.0, np.inf))),
        ("interval", lambda: lx.ChebyshevPreconditioner(op, 2, (1.0 + 1j, 5.0))),
        ("scale", lambda: lx.NeumannPreconditioner(op, 2, np.inf)),
        ("scale", lambda: lx.NeumannPreconditioner(op, 2, np.nan)),
        ("scale", lambda: lx.NeumannPreconditioner(op, 2, 0.1 + 0.01j)),
        ("omega", lambda: lx.SSORPreconditioner(op, 1.0 + 0.5j)),
    ]
    for name, build in cases:
        with pytest.raises(ValueError, match=f"`{name}`"):
            build()
    # A complex scale for a complex operator is fine.
    complex_op = lx.MatrixLinearOperator(jnp.asarray(_spd(4) + 0j))
    precond = lx.NeumannPreconditioner(complex_op, 2, 0.1 + 0.01j)
    assert precond.scale == 0.1 + 0.01j


#
# `SparseLinearOperator.mv` of a vector of the wrong shape.
#


def test_sparse_mv_of_wrong_shape_is_a_named_error():
    # The product gathers with out-of-range columns clipped (and the banded
    # layout slices), so a vector too long or too short (general pattern), too
    # long (banded), or of shape (n, 1) gave a wrong product without an error.
    general = lx.SparseLinearOperator(
        # Legacy `random_state`: as above.
        scipy.sparse.random(5, 6, density=0.6, random_state=2, format="csr")  # pyright: ignore[reportCallIssue]
    )
    banded = lx.SparseLinearOperator(_poisson_1d_scipy(5))
    assert general._diagonal_slots is None and banded._diagonal_slots is not None
    for op, n in [(general, 6), (banded, 5)]:
        for shape in [(n - 1,), (n + 1,), (n, 1), ()]:
            with pytest.raises(ValueError, match="`vector` has shape"):
                op.mv(jnp.ones(shape))
        np.testing.assert_allclose(
            op.mv(np.arange(n, dtype=float)), op.as_matrix() @ np.arange(n, dtype=float)
        )


def test_preconditioner_mv_of_wrong_size_is_a_named_error():
    # Jacobi and incomplete Cholesky apply elementwise products, which
    # broadcast a vector of one element: `P.mv(jnp.ones(1))` returned a full
    # vector without an error.
    matrix = _spd(4)
    op = lx.MatrixLinearOperator(jnp.asarray(matrix), lx.positive_semidefinite_tag)
    sparse = lx.SparseLinearOperator(
        scipy.sparse.csr_matrix(matrix), lx.positive_semidefinite_tag
    )
    for precond in [
        lx.JacobiPreconditioner(op),
        lx.IncompleteCholeskyPreconditioner(sparse),
        lx.ILUPreconditioner(sparse),
    ]:
        for size in [1, 3, 5]:
            with pytest.raises(ValueError, match="acts on vectors of 4 elements"):
                precond.mv(jnp.ones(size))


def test_breakdown_message_names_the_preconditioner():
    # SSOR of a matrix with a zero diagonal entry divides by it: the preconditioner
    # is infinite, GMRES breaks down, and the message blamed only the operator
    # ("typically means the operator is singular"), though the operator is not.
    operator = lx.MatrixLinearOperator(jnp.array([[0.0, 1.0], [1.0, 2.0]]))
    options = {"preconditioner": lx.SSORPreconditioner(operator)}
    solver = lx.GMRES(rtol=1e-6, atol=1e-6)
    sol = lx.linear_solve(operator, jnp.ones(2), solver, options=options, throw=False)
    assert sol.result == lx.RESULTS.breakdown
    with pytest.raises(Exception, match="If you supplied one, it may be the cause"):
        lx.linear_solve(operator, jnp.ones(2), solver, options=options)


#
# Built and applied un-jitted, as in an interactive session or a Python loop.
#


def _poisson_2d_sparse(n: int) -> scipy.sparse.csr_array:
    size = n * n
    return scipy.sparse.diags_array(
        [-1.0, -1.0, 4.0, -1.0, -1.0],
        # SciPy leaves `offsets` unannotated: pyright types it by its default `0`.
        offsets=[-n, -1, 0, 1, n],  # pyright: ignore[reportArgumentType]
        shape=(size, size),
    ).tocsr()


@pytest.mark.parametrize(
    "make",
    [
        lambda dense, sparse: lx.NeumannPreconditioner(dense, 3),
        lambda dense, sparse: lx.ChebyshevPreconditioner(dense, 3),
        lambda dense, sparse: lx.ILUPreconditioner(sparse),
        lambda dense, sparse: lx.IncompleteCholeskyPreconditioner(
            lx.TaggedLinearOperator(sparse, lx.positive_semidefinite_tag)
        ),
    ],
    ids=["neumann", "chebyshev", "ilu", "ic"],
)
def test_unjitted_preconditioner_compiles_once_per_structure(make):
    # The Lanczos estimate of Neumann/Chebyshev's construction, the elimination
    # of ILU/IC, and the loops of their `mv` were traced and compiled again at
    # every call (a new closure each time): 0.1-0.8 s per preconditioner built
    # and per un-jitted `mv`. A second build and two applications now compile
    # nothing.
    matrix = _poisson_2d_sparse(6)
    dense = lx.MatrixLinearOperator(
        jnp.asarray(matrix.toarray()), lx.positive_semidefinite_tag
    )
    sparse = lx.SparseLinearOperator(matrix)
    vector = jnp.arange(1.0, 37.0)
    doubled = 2 * vector
    expected = make(dense, sparse).mv(vector)

    def build_and_apply():
        preconditioner = make(dense, sparse)
        return preconditioner.mv(vector), preconditioner.mv(doubled)

    (first, second), compiles = backend_compiles(build_and_apply)
    assert compiles == []
    np.testing.assert_allclose(first, expected, rtol=1e-14)
    np.testing.assert_allclose(second, 2 * expected, rtol=1e-14)


@pytest.mark.parametrize(
    "make",
    [
        lambda op: lx.JacobiPreconditioner(op),
        lambda op: lx.JacobiPreconditioner(
            lx.FunctionLinearOperator(op.mv, op.in_structure(), op.tags),
            probes=2,
            key=jax.random.key(0),
        ),
        lambda op: lx.BlockJacobiPreconditioner(op, 2),
        lambda op: lx.ChebyshevPreconditioner(op, 3, key=jax.random.key(0)),
        lambda op: lx.NeumannPreconditioner(op, 3, key=jax.random.key(0)),
        lambda op: lx.ILUPreconditioner(_sparse(op, jsparse.BCOO)),
        lambda op: lx.ILUPreconditioner(_sparse(op, jsparse.BCSR)),
        lambda op: lx.IncompleteCholeskyPreconditioner(_sparse(op, jsparse.BCOO)),
        lambda op: lx.IncompleteCholeskyPreconditioner(_sparse(op, jsparse.BCSR)),
    ],
    ids=[
        "jacobi",
        "jacobi-probes",
        "block-jacobi",
        "chebyshev",
        "neumann",
        "ilu-bcoo",
        "ilu-bcsr",
        "ic-bcoo",
        "ic-bcsr",
    ],
)
def test_preconditioner_of_an_operator_of_size_zero(make):
    # The solvers solve a system of size 0; its preconditioners failed to build:
    # Jacobi took the largest of no entries, block-Jacobi divided by a block size
    # cut to 0, Lanczos (Chebyshev, Neumann) indexed an empty start vector, and
    # the incomplete factorisations' gathers read from the empty values (JAX
    # rejects that even in fill mode).
    op = lx.MatrixLinearOperator(jnp.zeros((0, 0)), lx.positive_semidefinite_tag)
    precond = make(op)
    assert precond.mv(jnp.zeros(0)).shape == (0,)
    assert not getattr(precond, "breakdown", False)
    # (CG asks a positive semidefinite preconditioner, which ILU is not.)
    solver = lx.CG if lx.is_positive_semidefinite(precond) else lx.GMRES
    solution = lx.linear_solve(
        op,
        jnp.zeros(0),
        solver(rtol=1e-6, atol=1e-6, max_steps=5),
        options={"preconditioner": precond},
    )
    assert solution.value.shape == (0,)


def _sparse(op, sparse_format):
    return lx.SparseLinearOperator(
        sparse_format.fromdense(op.as_matrix()), lx.positive_semidefinite_tag
    )


@pytest.mark.parametrize(
    "make",
    [lx.ILUPreconditioner, lx.IncompleteCholeskyPreconditioner],
    ids=["ilu", "ic"],
)
def test_incomplete_factorisation_of_a_matrix_storing_no_entry(make):
    # The control of the incomplete factorisations of size 0: a matrix of size
    # 3 storing no entry has its diagonal in the pattern (entries not stored
    # count as zeros), so nothing is gathered from an empty array; all pivots
    # are zero: a breakdown, applied as NaN.
    matrix = jsparse.BCOO((jnp.zeros(0), jnp.zeros((0, 2), jnp.int32)), shape=(3, 3))
    precond = make(lx.SparseLinearOperator(matrix, lx.positive_semidefinite_tag))
    assert precond.breakdown
    assert np.all(np.isnan(np.asarray(precond.mv(jnp.ones(3)))))
