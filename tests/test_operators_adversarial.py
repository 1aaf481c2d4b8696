"""Regression tests from a differential pass over the operators: each case is one
where this package had differed from lineax 0.1.1 (run as an oracle, outside the
test suite) or from NumPy, in a way that breaks user code.

Small sizes, one compiled function per test where possible.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lineax as lx


def assert_close(actual, desired, rtol=1e-10):
    np.testing.assert_allclose(np.asarray(actual), desired, rtol=rtol, atol=rtol)


def _matrix(rng, n, shift):
    return rng.standard_normal((n, n)) + shift * np.eye(n)


def _kronecker(rng):
    a, b = _matrix(rng, 2, 3.0), _matrix(rng, 3, 4.0)
    op = lx.KroneckerLinearOperator(
        lx.MatrixLinearOperator(jnp.asarray(a)), lx.MatrixLinearOperator(jnp.asarray(b))
    )
    return op, np.kron(a, b), lx.Kronecker


def _block_diagonal(rng):
    a, b = _matrix(rng, 2, 3.0), _matrix(rng, 2, 3.0)
    blocks = [lx.MatrixLinearOperator(jnp.asarray(m)) for m in (a, b)]
    op = lx.BlockDiagonalLinearOperator(blocks)
    dense = np.zeros((4, 4))
    dense[:2, :2], dense[2:, 2:] = a, b
    return op, dense, lx.BlockDiagonal


def _low_rank(rng):
    a = _matrix(rng, 5, 5.0)
    u = rng.standard_normal((5, 1))
    op = lx.LowRankUpdateLinearOperator(
        lx.MatrixLinearOperator(jnp.asarray(a)), jnp.asarray(u), jnp.eye(1), u.T
    )
    return op, a + u @ u.T, lx.Woodbury


def _flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


@pytest.mark.parametrize("make", [_kronecker, _block_diagonal, _low_rank])
def test_scaled_and_negated_structured_operators_keep_their_solver(make):
    # `2 * kron(A, B)` and `-kron(A, B)` were a `MulLinearOperator` and a
    # `NegLinearOperator`, which `AutoLinearSolver` solved by dense LU; so were the
    # scalings of block-diagonal and low-rank operators.
    op, dense, solver_type = make(np.random.default_rng(0))
    auto = lx.AutoLinearSolver(well_posed=True)
    scalings = [
        (2 * op, 2.0),
        (op * jnp.array(-0.5), -0.5),
        (-op, -1.0),
        (op / 4, 0.25),
        (-(3.0 * op), -3.0),
    ]
    for scaled, factor in scalings:
        assert isinstance(auto.select_solver(scaled), solver_type)
        assert_close(scaled.as_matrix(), factor * dense)
        assert_close(scaled.T.as_matrix(), factor * dense.T)
    scaled, factor = scalings[1]
    vector = jax.tree_util.tree_map(jnp.ones_like, scaled.out_structure())
    solution = lx.linear_solve(scaled, vector)
    assert_close(_flat(solution.value), np.linalg.solve(factor * dense, _flat(vector)))


def test_scaled_structured_operator_derivative_in_the_scalar():
    op, dense, _ = _kronecker(np.random.default_rng(1))
    vector = jnp.arange(1.0, 7.0)

    def loss(s):
        return lx.linear_solve(s * op, vector).value.sum()

    # d/ds sum((s K)^-1 b) = -sum(K^-1 b) / s^2.
    expected = -np.linalg.solve(dense, np.asarray(vector)).sum() / 4.0
    # (Compiled once, not op by op: the library traces the same path.)
    assert_close(jax.jit(jax.grad(loss))(2.0), expected)


def test_complex_scaling_of_a_real_kronecker_product_stays_correct():
    # The factors share one dtype, so a complex scalar cannot go into one factor:
    # the product is scaled as a whole instead (and is complex).
    op, dense, _ = _kronecker(np.random.default_rng(2))
    assert_close((op * 1j).as_matrix(), 1j * dense)
    assert_close((op * jnp.array(2j)).mv(jnp.ones(6)), 2j * dense @ np.ones(6))


@jax.jit
def _solve_and_mv(operator, vector):
    solution = lx.linear_solve(operator, vector, lx.GMRES(rtol=1e-5, atol=1e-5))
    return solution.value, operator.mv(vector), operator.T.as_matrix()


def test_python_scalar_scaling_of_float32_operator_stays_float32_under_jit():
    # The Python-number scalar of `op * 2.0` is a leaf of the operator: `jax.jit`
    # makes it a weakly typed float64 array (with x64), which was promoted as a
    # strong one, so that the float32 operator computed in float64 and GMRES
    # failed on mixed dtypes. lineax 0.1.1 keeps float32, as JAX's promotion does.
    matrix = np.array([[3.0, 1.0, 0.5], [1.0, 4.0, 0.2], [0.5, 0.2, 5.0]])
    vector = jnp.array([1.0, -2.0, 0.5], jnp.float32)
    operator = lx.MatrixLinearOperator(jnp.asarray(matrix, jnp.float32))
    for scaled, factor in ((operator * 2.0, 2.0), (operator / 2, 0.5)):
        solution, product, matrix_t = _solve_and_mv(scaled, vector)
        assert solution.dtype == product.dtype == matrix_t.dtype == jnp.float32
        assert_close(product, factor * matrix @ np.asarray(vector), rtol=1e-5)
        expected = np.linalg.solve(factor * matrix, np.asarray(vector))
        assert_close(solution, expected, rtol=1e-4)
    # A weakly typed array (`jnp.asarray(2.0)`) promotes as the number does; a
    # strongly typed float64 array promotes the product to float64.
    assert (operator * jnp.asarray(2.0)).mv(vector).dtype == jnp.float32
    strong = jnp.asarray(2.0, jnp.float64)
    assert (operator * strong).mv(vector).dtype == jnp.float64


def test_symmetric_tagged_map_between_two_structures_transposes_them():
    # A Function or Jacobian operator tagged symmetric returned itself as its
    # transpose, keeping its input and output structures unswapped: `.T.mv` of a
    # vector of the output structure then failed inside JAX. (lineax 0.1.1 refuses
    # the tag on such an operator at construction.)
    def fn(x):
        return x[:2], x[2]

    structure = jax.ShapeDtypeStruct((3,), jnp.float64)
    vector = (jnp.array([1.0, 2.0]), jnp.array(3.0))
    operators = [
        lx.FunctionLinearOperator(fn, structure, lx.symmetric_tag),
        lx.JacobianLinearOperator(
            lambda x, _: fn(x), jnp.ones(3), None, lx.symmetric_tag
        ),
    ]
    for operator in operators:
        transpose = operator.T
        assert transpose.in_structure() == operator.out_structure()
        assert transpose.out_structure() == operator.in_structure()
        assert_close(transpose.mv(vector), np.array([1.0, 2.0, 3.0]))


_MATRIX = np.array([[3.0, 1.0, 0.5], [1.0, 4.0, 0.2], [0.5, 0.2, 5.0]])
_VECTOR = np.array([1.0, -2.0, 0.5])


@eqx.filter_jit
def _solve_closing_over(matrix, solver):
    # `closure_convert=False`, yet `fn` closes over `matrix`, traced here.
    structure = jax.ShapeDtypeStruct((3,), jnp.float64)
    psd = lx.positive_semidefinite_tag
    function = lx.FunctionLinearOperator(
        lambda x: matrix @ x, structure, psd, closure_convert=False
    )
    jacobian = lx.JacobianLinearOperator(
        lambda x, _: matrix @ x, jnp.zeros(3), None, psd, closure_convert=False
    )
    vector = jnp.asarray(_VECTOR)
    return [lx.linear_solve(op, vector, solver).value for op in (function, jacobian)]


@pytest.mark.parametrize("solver", [lx.LU(), lx.CG(rtol=1e-10, atol=1e-10)])
def test_closure_convert_false_with_a_traced_closure_still_solves(solver):
    # The traced matrix escaped its trace when the solve called `fn` inside the
    # `linear_solve` primitive: "No constant handler for type DynamicJaxprTracer"
    # (lineax 0.1.1 fails so too with CG, and solves with LU).
    expected = np.linalg.solve(_MATRIX, _VECTOR)
    for solution in _solve_closing_over(jnp.asarray(_MATRIX), solver):
        assert_close(solution, expected, rtol=1e-8)


def test_closure_convert_false_outside_transformations_traces_fn_once():
    # Outside every transformation a closure cannot hold a live tracer: the flag's
    # promise holds, and `fn` is traced once only (for its output structure), not
    # a second time by a closure conversion (about 0.5 ms per construction).
    matrix = jnp.asarray(_MATRIX)
    calls = []

    def fn(x):
        calls.append(None)
        return matrix @ x

    structure = jax.ShapeDtypeStruct(_VECTOR.shape, matrix.dtype)
    for kind in (lx.FunctionLinearOperator, lx.JacobianLinearOperator):
        calls.clear()
        if kind is lx.FunctionLinearOperator:
            operator = kind(fn, structure, closure_convert=False)
        else:
            operator = kind(
                lambda x, _: fn(x), jnp.asarray(_VECTOR), closure_convert=False
            )
        assert len(calls) <= 1, (kind, len(calls))
        assert_close(operator.mv(jnp.asarray(_VECTOR)), _MATRIX @ _VECTOR)


def test_numpy_and_complex_scalars_scale_under_strict_promotion():
    # `np.float64(2.0)` is a Python float to `isinstance` but a strongly typed
    # float64 to JAX, and `1j` promotes a real operator: both were multiplied
    # implicitly, which strict dtype promotion refuses (lineax 0.1.1 too).
    matrix = np.array([[2.0, 1.0], [0.0, 3.0]])
    operator = lx.MatrixLinearOperator(jnp.asarray(matrix, jnp.float32))
    vector = jnp.ones(2, jnp.float32)
    product = (operator * np.float64(2.0)).mv(vector)
    assert product.dtype == jnp.float64
    assert_close(product, 2 * matrix @ np.ones(2))
    for scaled in (operator * 1j, lx.conj(operator * 1j)):
        assert scaled.as_matrix().dtype == jnp.complex64
    assert_close(lx.diagonal(operator * 1j), 1j * np.diagonal(matrix))
    assert_close(lx.tridiagonal(operator / 1j)[0], -1j * np.diagonal(matrix))


def test_identity_from_complex_to_real_structure_keeps_the_real_part():
    # The implicit complex-to-real cast is deprecated by JAX (a
    # `DeprecationWarning`, an error under `filterwarnings = error`); lineax 0.1.1
    # returned the real part.
    complex_ = jax.ShapeDtypeStruct((2,), jnp.complex128)
    real = jax.ShapeDtypeStruct((2,), jnp.float64)
    vector = jnp.array([1.0 + 1.0j, 2.0 - 1.0j])
    square = lx.IdentityLinearOperator(complex_, real)
    assert_close(square.mv(vector), np.array([1.0, 2.0]))
    widened = lx.IdentityLinearOperator(
        complex_, (real, jax.ShapeDtypeStruct((), jnp.float64))
    )
    out = widened.mv(vector)
    assert_close(out[0], np.array([1.0, 2.0]))
    assert_close(out[1], np.array(0.0))


def test_sparse_matrix_given_to_matrix_operator_names_the_sparse_operator():
    # `jnp.asarray` of a sparse matrix failed with "setting an array element with
    # a sequence".
    import scipy.sparse
    from jax.experimental import sparse as jsparse

    for matrix in (jsparse.BCOO.fromdense(jnp.eye(2)), scipy.sparse.eye(2).tocsr()):
        with pytest.raises(TypeError, match="SparseLinearOperator"):
            lx.MatrixLinearOperator(matrix)


def test_schur_solves_scaled_and_negated_block_operators():
    # `-block` and `2 * block` were a `NegLinearOperator` and a
    # `MulLinearOperator`, which `lx.Schur` refused ("solves only a 2×2
    # `lx.BlockLinearOperator`").
    a = np.array([[3.0, 1.0], [0.5, 4.0]])
    b, c, d = np.array([[1.0], [2.0]]), np.array([[0.5, 0.1]]), np.array([[5.0]])
    blocks = [[a, b], [c, d]]
    operator = lx.BlockLinearOperator(
        [[lx.MatrixLinearOperator(jnp.asarray(x)) for x in row] for row in blocks]
    )
    dense = np.block(blocks)
    vector = (jnp.ones(2), jnp.ones(1))
    for scaled, factor in ((-operator, -1.0), (operator * jnp.array(2.0), 2.0)):
        assert isinstance(scaled, lx.BlockLinearOperator)
        solution = lx.linear_solve(scaled, vector, lx.Schur()).value
        assert_close(_flat(solution), np.linalg.solve(factor * dense, np.ones(3)))


def test_kronecker_product_with_an_empty_factor():
    # A factor of size 0 makes the product empty. Its `mv` reshaped the vector with
    # a `-1` next to a 0 dimension: ZeroDivisionError inside jnp.reshape.
    empty = lx.MatrixLinearOperator(jnp.zeros((0, 0)))
    square = lx.MatrixLinearOperator(2 * jnp.eye(3))
    for operator in (
        lx.KroneckerLinearOperator(square, empty),
        lx.KroneckerLinearOperator(empty, square),
    ):
        assert operator.mv(jnp.zeros(0)).shape == (0,)
        assert operator.transpose().mv(jnp.zeros(0)).shape == (0,)
        assert operator.as_matrix().shape == (0, 0)
        sol = lx.linear_solve(operator, jnp.zeros(0), throw=False)
        assert sol.result == lx.RESULTS.successful
        assert sol.value.shape == (0,)
