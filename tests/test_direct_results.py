"""What a direct solve reports: `singular` only for an exactly zero pivot or
non-finite output (as LAPACK), the reciprocal condition estimate in
`stats["rcond"]`; and the structural behaviour of direct solves the published
package has: `AutoLinearSolver`'s choice for diagonal operators, the tags of
`invert`, the rectangular identity, Python-scalar and NumPy leaves, and mixed
real/complex PyTree operators under strict dtype promotion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lineax as lx


def _true_rcond(matrix):
    matrix = np.asarray(matrix, np.complex128)
    inverse = np.linalg.inv(matrix)
    return 1 / (np.linalg.norm(matrix, 1) * np.linalg.norm(inverse, 1))


def _rcond_cases(rng, n, complex_):
    a = rng.standard_normal((n, n))
    if complex_:
        a = a + 1j * rng.standard_normal((n, n))
    a = a * 10.0 ** rng.integers(-3, 4, (n, 1))
    eye = np.eye(n)
    return [
        ("lu", lx.LU(), a, ()),
        ("cholesky", lx.Cholesky(), a @ a.conj().T, lx.positive_semidefinite_tag),
        (
            "cholesky_negative",
            lx.Cholesky(),
            -(a @ a.conj().T),
            lx.negative_semidefinite_tag,
        ),
        ("lower", lx.Triangular(), np.tril(a), lx.lower_triangular_tag),
        ("upper", lx.Triangular(), np.triu(a), lx.upper_triangular_tag),
        (
            "unit_lower",
            lx.Triangular(),
            np.tril(a, -1) + eye,
            (lx.lower_triangular_tag, lx.unit_diagonal_tag),
        ),
        (
            "tridiagonal",
            lx.Tridiagonal(),
            np.triu(np.tril(a, 1), -1),
            lx.tridiagonal_tag,
        ),
        ("diagonal", lx.Diagonal(), np.diag(np.diag(a)), lx.diagonal_tag),
    ]


@pytest.mark.parametrize("complex_", [False, True], ids=["real", "complex"])
def test_rcond_estimates_the_reciprocal_condition_number(complex_):
    # Hager/Higham's estimate bounds the 1-norm reciprocal condition number from
    # above, and is within a small factor of it; also for the transposed and
    # conjugated states that reverse-mode differentiation and the JVP use. (LU
    # reports the condition number of the matrix factored for its transposed
    # state too, as documented: the infinity-norm one of the transpose.)
    rng = np.random.default_rng(3 + complex_)
    n = 6
    for name, solver, matrix, tags in _rcond_cases(rng, n, complex_):
        operator = lx.MatrixLinearOperator(jnp.asarray(matrix), tags)
        vector = jnp.asarray(rng.standard_normal(n)).astype(matrix.dtype)
        state = solver.init(operator, {})
        transposed, _ = solver.transpose(state, {})
        conjugated, _ = solver.conj(state, {})
        for s, m in (
            (state, matrix),
            (transposed, matrix.T),
            (conjugated, matrix.conj()),
        ):
            _, result, stats = solver.compute(s, vector, {})
            assert result == lx.RESULTS.successful
            if name == "lu" and s is transposed:
                m = matrix
            rcond, true = float(stats["rcond"]), _true_rcond(m)
            assert true * (1 - 1e-8) <= rcond <= 3 * true, name


def test_rcond_of_qr_and_svd():
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((6, 6)) * 10.0 ** rng.integers(-3, 4, (1, 6))
    operator = lx.MatrixLinearOperator(jnp.asarray(matrix))
    vector = jnp.asarray(rng.standard_normal(6))
    # QR: the estimate for the triangular factor R, whose 1-norm condition number
    # is within a factor n of A's.
    rcond = lx.linear_solve(operator, vector, lx.QR()).stats["rcond"]
    true = _true_rcond(matrix)
    assert true / 6 <= rcond <= 6 * true
    # SVD: exactly 1 / cond_2.
    rcond = lx.linear_solve(operator, vector, lx.SVD()).stats["rcond"]
    np.testing.assert_allclose(rcond, 1 / np.linalg.cond(matrix), rtol=1e-10)
    tall = jnp.concatenate([jnp.asarray(matrix), jnp.zeros((2, 6))])
    solution = lx.linear_solve(
        lx.MatrixLinearOperator(tall), jnp.ones(8), lx.SVD(), throw=False
    )
    np.testing.assert_allclose(
        solution.stats["rcond"], 1 / np.linalg.cond(matrix), rtol=1e-10
    )


def test_rank_deficient_float32_is_flagged_by_rcond_not_result():
    # A float32 10x10 matrix of rank 9 that rounding leaves without an exactly
    # zero pivot: LAPACK's `gesv` returns a huge answer with info = 0, and so does
    # LU; the condition estimate is how to see it.
    rng = np.random.default_rng(0)
    u = rng.standard_normal((10, 9))
    v = rng.standard_normal((9, 10))
    matrix = jnp.asarray(u @ v, jnp.float32)
    vector = jnp.ones(10, jnp.float32)
    solution = lx.linear_solve(
        lx.MatrixLinearOperator(matrix), vector, lx.LU(), throw=False
    )
    assert solution.result == lx.RESULTS.successful
    assert solution.stats["rcond"] < 1e-5
    # A well-conditioned system of the same size has an rcond far from that.
    good = lx.linear_solve(
        lx.MatrixLinearOperator(matrix + 10 * jnp.eye(10, dtype=jnp.float32)),
        vector,
        lx.LU(),
    )
    assert good.stats["rcond"] > 1e-3


def test_ill_conditioned_but_nonsingular_is_successful():
    # The Hilbert matrix of order 12 (cond ~ 1e16) has no zero pivot: LU and
    # Cholesky succeed, whatever digits are left, and say so through `rcond`.
    n = 12
    i = np.arange(n)
    hilbert = jnp.asarray(1 / (i[:, None] + i[None, :] + 1.0))
    for solver, tags in ((lx.LU(), ()), (lx.Cholesky(), lx.positive_semidefinite_tag)):
        operator = lx.MatrixLinearOperator(hilbert, tags)
        solution = lx.linear_solve(operator, jnp.ones(n), solver, throw=False)
        assert solution.result == lx.RESULTS.successful
        assert solution.stats["rcond"] < 1e-14


def test_exactly_zero_pivot_is_singular():
    singular = jnp.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [1.0, 0.0, 1.0]])
    vector = jnp.array([1.0, 2.0, 3.0])
    cases = [
        (lx.LU(), lx.MatrixLinearOperator(singular)),
        (lx.QR(), lx.MatrixLinearOperator(singular.at[:, 1].set(0))),
        (
            lx.Cholesky(),
            lx.MatrixLinearOperator(jnp.ones((3, 3)), lx.positive_semidefinite_tag),
        ),
        (
            lx.Triangular(),
            lx.MatrixLinearOperator(
                jnp.tril(singular).at[1, 1].set(0), lx.lower_triangular_tag
            ),
        ),
        (
            lx.Diagonal(well_posed=True),
            lx.DiagonalLinearOperator(jnp.array([1.0, 0.0, 2.0])),
        ),
    ]
    for solver, operator in cases:
        solution = lx.linear_solve(operator, vector, solver, throw=False)
        assert solution.result == lx.RESULTS.singular, solver
        assert solution.stats["rcond"] == 0, solver


def test_nonfinite_matrix_with_a_finite_solution_is_nonfinite_input():
    # LU of [[inf, 2], [2, 4]] divides by the inf pivot: x = (1 / inf, 1 / 2), a
    # finite solution of a non-finite input.
    matrix = jnp.array([[jnp.inf, 2.0], [2.0, 4.0]])
    vector = jnp.array([1.0, 2.0])
    message = "contains NaN or inf"
    operator = lx.MatrixLinearOperator(matrix)
    solution = lx.linear_solve(operator, vector, lx.LU(), throw=False)
    assert np.all(np.isfinite(solution.value))
    assert solution.result == lx.RESULTS.nonfinite_input
    with pytest.raises(Exception, match=message):
        lx.linear_solve(operator, vector, lx.LU())
    result = jax.jit(
        lambda m, v: lx.linear_solve(lx.MatrixLinearOperator(m), v, throw=False).result
    )(matrix, vector)
    assert result == lx.RESULTS.nonfinite_input
    with pytest.raises(Exception, match=message):
        jax.block_until_ready(
            jax.jit(
                jax.vmap(
                    lambda m: (
                        lx.linear_solve(
                            lx.MatrixLinearOperator(m), vector, lx.LU()
                        ).value
                    )
                )
            )(jnp.stack([jnp.eye(2), matrix]))
        )


@pytest.mark.parametrize(
    "solver, matrix",
    [
        (lx.LU(), [[jnp.inf, 2.0], [2.0, 4.0]]),
        (lx.QR(), [[jnp.inf, 2.0], [2.0, 4.0]]),
        (lx.SVD(), [[jnp.nan, 2.0], [2.0, 4.0]]),
        (lx.Cholesky(), [[jnp.inf, 2.0], [2.0, 4.0]]),
    ],
)
def test_reused_state_of_a_nonfinite_matrix_is_nonfinite_input(solver, matrix):
    # The dense solvers test the matrix once, in `init`, and record it in the
    # state: a state reused across right-hand sides reports what the solve that
    # made it reports, without scanning the matrix at each solve.
    tags = lx.positive_semidefinite_tag if isinstance(solver, lx.Cholesky) else ()
    operator = lx.MatrixLinearOperator(jnp.array(matrix), tags)
    state = solver.init(operator, {})

    @jax.jit
    def solve(vector):
        return lx.linear_solve(
            operator, vector, solver, state=state, throw=False
        ).result

    for vector in (jnp.array([1.0, 2.0]), jnp.array([0.0, 0.0])):
        assert solve(vector) == lx.RESULTS.nonfinite_input
    with pytest.raises(Exception, match="contains NaN or inf"):
        lx.linear_solve(operator, jnp.array([1.0, 2.0]), solver, state=state)
    finite = lx.MatrixLinearOperator(jnp.array([[4.0, 2.0], [2.0, 4.0]]), tags)
    assert (
        lx.linear_solve(
            finite, jnp.array([1.0, 2.0]), solver, state=solver.init(finite, {})
        ).result
        == lx.RESULTS.successful
    )


@pytest.mark.parametrize(
    "solver", [lx.LU(), lx.QR(), lx.SVD(), lx.AutoLinearSolver(well_posed=True)]
)
def test_solve_from_a_reused_state_does_not_scan_the_matrix(solver):
    # A solve from a given state is O(n^2), as is a scan of the matrix: the
    # scan made an LU solve at n = 2000 (float32) 25% slower. The matrix is
    # tested once, by `init`; the solve only reduces vectors.
    matrix = jnp.array([[2.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 4.0]])
    operator = lx.MatrixLinearOperator(matrix)
    state = solver.init(operator, {})

    def solve(matrix, state, vector):
        operator = lx.MatrixLinearOperator(matrix)
        return lx.linear_solve(operator, vector, solver, state=state).value

    text = jax.jit(solve).lower(matrix, state, jnp.ones(3)).as_text()
    reductions = [line for line in text.splitlines() if "stablehlo.reduce" in line]
    assert reductions
    assert not [line for line in reductions if "tensor<3x3x" in line]


#
# AutoLinearSolver on diagonal operators.
#


def _select(well_posed, operator):
    return lx.AutoLinearSolver(well_posed=well_posed).select_solver(operator)


def test_auto_well_posed_none_gives_pseudoinverse_on_diagonal():
    operator = lx.DiagonalLinearOperator(jnp.array([2.0, 0.0, 4.0]))
    solver = lx.AutoLinearSolver(well_posed=None)
    solution = lx.linear_solve(operator, jnp.ones(3), solver)
    assert solution.result == lx.RESULTS.successful
    np.testing.assert_allclose(solution.value, [0.5, 0.0, 0.25])
    # The derivative is that of the pseudoinverse solution, finite.
    grad = jax.grad(
        lambda d: lx.linear_solve(
            lx.DiagonalLinearOperator(d), jnp.ones(3), solver
        ).value.sum()
    )(jnp.array([2.0, 0.0, 4.0]))
    np.testing.assert_allclose(grad, [-0.25, 0.0, -1 / 16])


def test_auto_selection_matches_published_package():
    # The published lineax 0.1.1 chooses these (checked by running it).
    f64 = jnp.float64
    m = jnp.array([[2.0, 1.0], [1.0, 3.0]])
    operators = {
        "diagonal": lx.DiagonalLinearOperator(jnp.array([2.0, 0.0, 4.0])),
        "identity": lx.IdentityLinearOperator(jax.ShapeDtypeStruct((3,), f64)),
        "1x1": lx.MatrixLinearOperator(jnp.array([[2.0]])),
        "diagonal_tag": lx.MatrixLinearOperator(jnp.eye(3), lx.diagonal_tag),
        "tridiagonal": lx.TridiagonalLinearOperator(
            jnp.ones(3), jnp.ones(2), jnp.ones(2)
        ),
        "lower": lx.MatrixLinearOperator(jnp.tril(m), lx.lower_triangular_tag),
        "psd": lx.MatrixLinearOperator(m, lx.positive_semidefinite_tag),
        "symmetric": lx.MatrixLinearOperator(m, lx.symmetric_tag),
    }
    expected = {
        None: {
            "diagonal": lx.Diagonal(),
            "identity": lx.Diagonal(),
            "1x1": lx.Diagonal(),
            "diagonal_tag": lx.Diagonal(),
            "tridiagonal": lx.Tridiagonal(),
            "lower": lx.Triangular(),
            "psd": lx.Cholesky(),
            "symmetric": lx.LU(),
        },
        True: {
            "diagonal": lx.Diagonal(well_posed=True),
            "identity": lx.Diagonal(well_posed=True),
            "1x1": lx.Diagonal(well_posed=True),
            "diagonal_tag": lx.Diagonal(well_posed=True),
            "tridiagonal": lx.Tridiagonal(),
            "lower": lx.Triangular(),
            "psd": lx.Cholesky(),
            "symmetric": lx.LU(),
        },
        False: {
            "diagonal": lx.Diagonal(),
            "identity": lx.Diagonal(),
            "1x1": lx.Diagonal(),
            "diagonal_tag": lx.Diagonal(),
            "tridiagonal": lx.SVD(),
            "lower": lx.SVD(),
            "psd": lx.SVD(),
            "symmetric": lx.SVD(),
        },
    }
    for well_posed, table in expected.items():
        for name, solver in table.items():
            assert _select(well_posed, operators[name]) == solver, (well_posed, name)


#
# invert keeps the tags that hold for the inverse.
#


def test_invert_keeps_positive_semidefinite_and_picks_cholesky():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 4))
    matrix = jnp.asarray(a @ a.T + 4 * np.eye(4))
    inverse = lx.invert(lx.MatrixLinearOperator(matrix, lx.positive_semidefinite_tag))
    assert lx.is_positive_semidefinite(inverse)
    assert lx.is_symmetric(inverse)
    assert not lx.is_negative_semidefinite(inverse)
    assert type(_select(True, inverse)) is lx.Cholesky
    vector = jnp.asarray(rng.standard_normal(4))
    # Solving with the inverse multiplies by the matrix.
    np.testing.assert_allclose(
        lx.linear_solve(inverse, vector).value, matrix @ vector, rtol=1e-10
    )
    np.testing.assert_allclose(
        inverse.mv(vector), np.linalg.solve(matrix, vector), rtol=1e-10
    )


def test_invert_keeps_negative_semidefinite():
    matrix = -jnp.array([[4.0, 1.0], [1.0, 3.0]])
    inverse = lx.invert(lx.MatrixLinearOperator(matrix, lx.negative_semidefinite_tag))
    assert lx.is_negative_semidefinite(inverse)
    assert not lx.is_positive_semidefinite(inverse)
    np.testing.assert_allclose(
        lx.linear_solve(inverse, jnp.array([1.0, 2.0])).value,
        matrix @ jnp.array([1.0, 2.0]),
    )


def test_invert_keeps_triangular_side_and_unit_diagonal():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4, 4)) + 4 * np.eye(4)
    vector = jnp.asarray(rng.standard_normal(4))
    for tri, tag, other in (
        (np.tril, lx.lower_triangular_tag, lx.is_upper_triangular),
        (np.triu, lx.upper_triangular_tag, lx.is_lower_triangular),
    ):
        matrix = jnp.asarray(tri(a))
        inverse = lx.invert(lx.MatrixLinearOperator(matrix, tag))
        assert tag in inverse.tags and not other(inverse)
        assert not lx.has_unit_diagonal(inverse)
        assert type(_select(True, inverse)) is lx.Triangular
        np.testing.assert_allclose(
            lx.linear_solve(inverse, vector).value, matrix @ vector, rtol=1e-10
        )
        np.testing.assert_allclose(
            inverse.as_matrix(), tri(np.linalg.inv(matrix)), atol=1e-12
        )
        unit = jnp.asarray(tri(a, -1 if tri is np.tril else 1) + np.eye(4))
        inverse = lx.invert(lx.MatrixLinearOperator(unit, (tag, lx.unit_diagonal_tag)))
        assert lx.has_unit_diagonal(inverse) and tag in inverse.tags


def test_invert_keeps_diagonal_and_symmetric():
    d = jnp.array([2.0, -4.0, 0.5])
    inverse = lx.invert(lx.DiagonalLinearOperator(d))
    assert lx.is_diagonal(inverse) and lx.is_symmetric(inverse)
    assert type(_select(True, inverse)) is lx.Diagonal
    np.testing.assert_allclose(lx.diagonal(inverse), 1 / d)
    symmetric = jnp.array([[1.0, 2.0], [2.0, 1.0]])
    inverse = lx.invert(lx.MatrixLinearOperator(symmetric, lx.symmetric_tag))
    assert lx.is_symmetric(inverse) and not lx.is_positive_semidefinite(inverse)


def test_invert_drops_what_does_not_hold_for_the_inverse():
    # A tridiagonal matrix has a dense inverse; a singular triangular one has a
    # pseudoinverse that need not be triangular; a unit diagonal alone says
    # nothing about the inverse's diagonal.
    tri = lx.TridiagonalLinearOperator(2 * jnp.ones(3), jnp.ones(2), jnp.ones(2))
    assert not lx.is_tridiagonal(lx.invert(tri))
    lower = jnp.array([[0.0, 0.0], [1.0, 0.0]])
    pinv = lx.invert(lx.MatrixLinearOperator(lower, lx.lower_triangular_tag), lx.SVD())
    assert not lx.is_lower_triangular(pinv)
    # (Exact zeros need an absolute tolerance: cuSOLVER's SVD leaves 1e-16 there.)
    np.testing.assert_allclose(pinv.as_matrix(), np.linalg.pinv(lower), atol=1e-14)
    unit = lx.MatrixLinearOperator(
        jnp.array([[1.0, 2.0], [3.0, 1.0]]), lx.unit_diagonal_tag
    )
    assert not lx.has_unit_diagonal(lx.invert(unit))


#
# The rectangular identity.
#


def test_identity_between_different_sizes_is_rectangular():
    f64 = jnp.float64
    in_structure = (
        jax.ShapeDtypeStruct((3,), f64),
        jax.ShapeDtypeStruct((1,), f64),
    )
    out_structure = {
        "a": jax.ShapeDtypeStruct((2,), f64),
        "b": jax.ShapeDtypeStruct((2, 2), f64),
    }
    # Zero-padding: 4 -> 6.
    pad = lx.IdentityLinearOperator(in_structure, out_structure)
    assert (pad.in_size(), pad.out_size()) == (4, 6)
    np.testing.assert_array_equal(pad.as_matrix(), np.eye(6, 4))
    out = pad.mv((jnp.array([1.0, 2.0, 3.0]), jnp.array([4.0])))
    np.testing.assert_array_equal(out["a"], [1.0, 2.0])
    np.testing.assert_array_equal(out["b"], [[3.0, 4.0], [0.0, 0.0]])
    # Truncation: its transpose, 6 -> 4.
    cut = pad.T
    assert cut.in_structure() == out_structure
    np.testing.assert_array_equal(cut.as_matrix(), np.eye(4, 6))
    first, second = cut.mv({"a": jnp.array([1.0, 2.0]), "b": jnp.ones((2, 2))})
    np.testing.assert_array_equal(first, [1.0, 2.0, 1.0])
    np.testing.assert_array_equal(second, [1.0])
    # Structure: diagonal, triangular, unit diagonal; never symmetric or definite.
    for op in (pad, cut):
        assert lx.is_diagonal(op) and lx.has_unit_diagonal(op)
        assert lx.is_lower_triangular(op) and lx.is_upper_triangular(op)
        assert not lx.is_symmetric(op)
        assert not lx.is_positive_semidefinite(op)
        np.testing.assert_array_equal(lx.diagonal(op), np.ones(4))
    # A least-squares solve with it is the pseudoinverse (truncate / pad back).
    solution = lx.linear_solve(
        pad, out, lx.AutoLinearSolver(well_posed=None), throw=False
    )
    np.testing.assert_allclose(solution.value[0], [1.0, 2.0, 3.0])
    np.testing.assert_allclose(solution.value[1], [4.0])


def test_identity_rectangular_flat_and_arithmetic():
    f64 = jnp.float64
    op = lx.IdentityLinearOperator(
        jax.ShapeDtypeStruct((3,), f64), jax.ShapeDtypeStruct((5,), f64)
    )
    np.testing.assert_array_equal(op.mv(jnp.array([1.0, 2.0, 3.0])), [1, 2, 3, 0, 0])
    matrix = lx.MatrixLinearOperator(jnp.ones((5, 3)))
    np.testing.assert_array_equal((matrix + 2.0 * op).as_matrix(), 1 + 2 * np.eye(5, 3))
    square = lx.IdentityLinearOperator(jax.ShapeDtypeStruct((2, 2), f64))
    assert lx.is_symmetric(square) and lx.is_positive_semidefinite(square)


#
# Python scalars and NumPy arrays as leaves.
#


def test_pytree_operator_accepts_python_scalars_and_numpy_leaves():
    f64 = jnp.float64
    structure = {
        "a": jax.ShapeDtypeStruct((), f64),
        "b": jax.ShapeDtypeStruct((2,), f64),
    }
    pytree = {
        "a": {"a": 3.0, "b": np.array([1.0, 0.0])},
        "b": {"a": np.array([0.0, 1]), "b": np.array([[2, 0], [1, 4]])},
    }
    op = lx.PyTreeLinearOperator(pytree, structure)
    for leaf in jax.tree_util.tree_leaves(op.pytree):
        assert isinstance(leaf, jax.Array) and leaf.dtype == f64
        assert not leaf.weak_type
    dense = np.array([[3.0, 1, 0], [0, 2, 0], [1, 1, 4]])
    np.testing.assert_array_equal(op.as_matrix(), dense)
    vector = {"a": jnp.array(1.0), "b": jnp.array([2.0, 3.0])}
    solution = lx.linear_solve(op, vector)
    np.testing.assert_allclose(
        np.concatenate([np.atleast_1d(solution.value["a"]), solution.value["b"]]),
        np.linalg.solve(dense, [1.0, 2.0, 3.0]),
    )
    scalar = lx.PyTreeLinearOperator(2.0, jax.ShapeDtypeStruct((), f64))
    np.testing.assert_allclose(lx.linear_solve(scalar, jnp.array(3.0)).value, 1.5)
    assert lx.PyTreeLinearOperator(2, jax.ShapeDtypeStruct((), f64)).pytree.dtype == f64


def test_array_operators_accept_python_scalars_numpy_and_lists():
    f64 = jnp.float64
    diagonal = lx.DiagonalLinearOperator((2.0, np.array([4.0, 5])))
    assert diagonal.in_structure() == (
        jax.ShapeDtypeStruct((), f64),
        jax.ShapeDtypeStruct((2,), f64),
    )
    solution = lx.linear_solve(diagonal, (jnp.array(1.0), jnp.array([2.0, 10.0])))
    np.testing.assert_allclose(solution.value[0], 0.5)
    np.testing.assert_allclose(solution.value[1], [0.5, 2.0])
    assert lx.DiagonalLinearOperator(3.0).diagonal.dtype == f64
    matrix = lx.MatrixLinearOperator(np.array([[2.0, 0.0], [0.0, 4.0]]))
    assert matrix.matrix.dtype == f64 and isinstance(matrix.matrix, jax.Array)
    assert lx.MatrixLinearOperator(np.eye(2, dtype=np.int32)).matrix.dtype == f64
    # Nested Python lists are refused with a hint (as the published package refuses
    # them), since their dtype would be a guess.
    with pytest.raises(TypeError, match="jnp.asarray"):
        lx.MatrixLinearOperator([[2.0, 0.0], [0.0, 4.0]])
    tridiagonal = lx.TridiagonalLinearOperator(
        np.array([2.0, 2.0, 2.0]), np.array([1, 1]), np.ones(2)
    )
    np.testing.assert_array_equal(
        tridiagonal.as_matrix(), [[2, 1, 0], [1, 2, 1], [0, 1, 2]]
    )
    jacobian = lx.JacobianLinearOperator(lambda x, args: x**2, 3.0)
    np.testing.assert_allclose(jacobian.as_matrix(), [[6.0]])


#
# Mixed real and complex PyTree operators under strict dtype promotion.
#


def _mixed_operator(matrix, tags=()):
    # Input {"a": real, "b": complex} (an input leaf takes the dtype of its block
    # in the first output leaf), output complex: not complex-linear.
    c128 = jnp.complex128
    blocks = {
        "a": {"a": np.real(matrix[:2, :2]).copy(), "b": matrix[:2, 2:]},
        "b": {"a": matrix[2:, :2], "b": matrix[2:, 2:]},
    }
    structure = {
        "a": jax.ShapeDtypeStruct((2,), c128),
        "b": jax.ShapeDtypeStruct((2,), c128),
    }
    op = lx.PyTreeLinearOperator(blocks, structure, tags)
    assert op.in_structure()["a"].dtype == jnp.float64
    return op


def _realified_solution(matrix, flat_vector):
    """The pseudoinverse solution over `(x_a real, x_b complex)`: NumPy's, of the
    stacked real matrix."""
    stacked = np.block(
        [[matrix.real, -matrix.imag[:, 2:]], [matrix.imag, matrix.real[:, 2:]]]
    )
    y = np.linalg.pinv(stacked) @ np.concatenate([flat_vector.real, flat_vector.imag])
    return y[:4] + 1j * np.concatenate([np.zeros(2), y[4:]])


def _promoted_solution(matrix, flat_vector):
    """NumPy's solve of the promoted complex matrix, cast to the input dtypes: the
    real part at the real leaf "a"."""
    x = np.linalg.solve(matrix, flat_vector)
    return np.concatenate([x[:2].real, x[2:]])


def _mixed_matrices():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4, 4)) + 1j * rng.standard_normal((4, 4)) + 4 * np.eye(4)
    a[:2, :2] = a[:2, :2].real
    h = a @ a.conj().T
    h[:2, :2] = h[:2, :2].real
    h = (h + h.conj().T) / 2
    d = np.diag(np.diag(a))
    return [
        ("lu", lx.LU(), a, ()),
        ("qr", lx.QR(), a, ()),
        ("svd", lx.SVD(), a, ()),
        ("cholesky", lx.Cholesky(), h, lx.positive_semidefinite_tag),
        ("diagonal", lx.Diagonal(), d, lx.diagonal_tag),
        ("diagonal_well_posed", lx.Diagonal(well_posed=True), d, lx.diagonal_tag),
        # (Upper: the real rows "a" then couple to the complex unknowns "b".)
        ("triangular", lx.Triangular(), np.triu(a), lx.upper_triangular_tag),
        (
            "tridiagonal",
            lx.Tridiagonal(),
            np.triu(np.tril(a, 1), -1),
            lx.tridiagonal_tag,
        ),
        ("auto", lx.AutoLinearSolver(well_posed=None), a, ()),
        ("auto_well_posed", lx.AutoLinearSolver(well_posed=True), a, ()),
    ]


# The least-squares solvers solve the realified problem (6 real unknowns, 8 real
# equations, no tags); the solvers for square operators cannot, and solve the
# promoted complex system, returning the real part at the real leaf "a".
# Differential: lineax 0.1.1 (the published package) returns that real part with
# every solver here, the least-squares ones included (from a solution that is
# complex at "a" where the right-hand side has no solution with a real "a").
_LEAST_SQUARES = ("qr", "svd", "auto")


@pytest.mark.parametrize(
    "name,solver,matrix,tags", _mixed_matrices(), ids=[c[0] for c in _mixed_matrices()]
)
def test_mixed_real_complex_pytree_operator_solves_under_strict_promotion(
    name, solver, matrix, tags
):
    assert jax.config.jax_numpy_dtype_promotion == "strict"  # pyright: ignore
    op = _mixed_operator(matrix, tags)
    # A right-hand side in the range over a real "a": every solver returns that
    # solution (to rounding; for a square solver, the imaginary part it drops).
    x_true = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([1 + 1j, 2 - 1j])}
    vector = op.mv(x_true)
    solution = lx.linear_solve(op, vector, solver)
    assert solution.value["a"].dtype == jnp.float64
    assert solution.value["b"].dtype == jnp.complex128
    flat = np.concatenate([solution.value["a"], solution.value["b"]])
    np.testing.assert_allclose(flat, [1.0, 2.0, 1 + 1j, 2 - 1j], rtol=1e-10)
    # Products with the operator and its transpose promote explicitly too.
    out = op.mv(solution.value)
    np.testing.assert_allclose(
        np.concatenate([out["a"], out["b"]]),
        np.concatenate([vector["a"], vector["b"]]),
        rtol=1e-10,
    )
    op.T.mv(vector)

    # A right-hand side with no solution over a real "a": the least-squares
    # solvers give the real least-squares one, the square solvers (as 0.1.1) the
    # real part of the promoted solution, which is another vector.
    vector = {"a": jnp.array([1.0 + 0j, 2.0]), "b": jnp.array([1 + 1j, 2 - 1j])}
    flat_vector = np.array([1.0, 2.0, 1 + 1j, 2 - 1j])
    solution = lx.linear_solve(op, vector, solver)
    assert solution.value["a"].dtype == jnp.float64
    flat = np.concatenate([solution.value["a"], solution.value["b"]])
    realified = _realified_solution(matrix, flat_vector)
    promoted = _promoted_solution(matrix, flat_vector)
    expected = realified if name in _LEAST_SQUARES else promoted
    np.testing.assert_allclose(flat, expected, rtol=1e-10, atol=1e-12)
    if not name.startswith("diagonal"):  # (diagonal: real "a" rows on "a" alone)
        assert not np.allclose(realified, promoted, rtol=1e-3)


# The JVP of a least-squares solve (SVD: equation (1)) forms the residual
# `vector - operator.mv(solution)`, whose leaves have different dtypes for a
# mixed-dtype PyTree operator: it promoted implicitly, a TypePromotionError under
# strict promotion (as did summing the tangent terms), in forward and reverse mode.
# The square solvers differentiate the promoted complex solve, whose real part
# at "a" they return (as lineax 0.1.1 does).
@pytest.mark.parametrize(
    "solver",
    [
        lx.SVD(),
        lx.AutoLinearSolver(well_posed=False),
        lx.LU(),
        lx.AutoLinearSolver(well_posed=True),
    ],
    ids=["svd", "auto_ill_posed", "lu", "auto_well_posed"],
)
def test_mixed_real_complex_pytree_operator_jvp_under_strict_promotion(solver):
    assert jax.config.jax_numpy_dtype_promotion == "strict"  # pyright: ignore
    matrix = _mixed_matrices()[0][2]
    op = _mixed_operator(matrix)
    vector = {"a": jnp.array([1.0 + 0j, 2.0]), "b": jnp.array([1 + 1j, 2 - 1j])}
    t_vector = {"a": jnp.array([0.5 + 0j, -1.0]), "b": jnp.array([1j, 1.0 + 0j])}

    def solve(o, v):
        return lx.linear_solve(o, v, solver).value

    # Along the operator itself and `t_vector`: d/dt (1 + t)^-1 A^+ (b + t v),
    # `A^+` the (linear) pseudoinverse of the realified operator, or the inverse
    # of the promoted one (real part at "a").
    # (Compiled once, not op by op: the library traces the same path, and
    # promotes, or refuses to, at trace time either way.)
    jvp = jax.jit(lambda p, t: jax.jvp(solve, p, t))
    _, t_out = jvp((op, vector), (op, t_vector))
    flat_vector = np.array([1.0, 2.0, 1 + 1j, 2 - 1j])
    flat_t_vector = np.array([0.5, -1.0, 1j, 1.0])
    square = isinstance(solver, lx.LU) or solver == lx.AutoLinearSolver(well_posed=True)
    reference = _promoted_solution if square else _realified_solution
    expected = reference(matrix, flat_t_vector - flat_vector)
    assert t_out["a"].dtype == jnp.float64
    got = np.concatenate([t_out["a"], t_out["b"]])
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    grad = jax.jit(jax.grad(lambda o: solve(o, vector)["a"][0]))(op)
    assert jnp.all(jnp.isfinite(jax.tree.leaves(grad)[0]))


def _float32_float64_operator():
    rng = np.random.default_rng(3)
    matrix = rng.standard_normal((4, 4)) + 4 * np.eye(4)
    matrix = matrix @ matrix.T
    blocks = {
        row: {
            "a": matrix[i : i + 2, :2].astype(np.float32),
            "b": matrix[i : i + 2, 2:],
        }
        for row, i in (("a", 0), ("b", 2))
    }
    structure = {
        "a": jax.ShapeDtypeStruct((2,), jnp.float32),
        "b": jax.ShapeDtypeStruct((2,), jnp.float64),
    }
    op = lx.PyTreeLinearOperator(blocks, structure, lx.positive_semidefinite_tag)
    return op, matrix


@pytest.mark.parametrize(
    "solver",
    [lx.AutoLinearSolver(well_posed=True), lx.QR(), lx.SVD(), lx.Cholesky()],
    ids=["auto", "qr", "svd", "cholesky"],
)
def test_float32_float64_pytree_operator_solution_keeps_the_input_dtypes(solver):
    # The matrix solvers compute in the promoted dtype (float64) of a PyTree
    # operator mixing float32 and float64 leaves, and returned the float32 leaf of
    # the solution as float64: as the carry of a `lax.scan` (an Optimistix iterate
    # updated by the solution) that was a type error. lineax 0.1.1 returns the
    # input structure's dtypes (checked against it in a subprocess).
    op, matrix = _float32_float64_operator()
    vector = {"a": jnp.ones(2, jnp.float32), "b": jnp.ones(2)}
    expected = np.linalg.solve(matrix, np.ones(4))

    def step(x, _):
        delta = lx.linear_solve(op, vector, solver).value
        return jax.tree.map(lambda xi, di: xi + di, x, delta), None

    x0 = jax.tree.map(jnp.zeros_like, vector)
    x, _ = jax.lax.scan(step, x0, length=2)
    assert x["a"].dtype == jnp.float32 and x["b"].dtype == jnp.float64
    got = np.concatenate([x["a"], x["b"]]) / 2
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # Un-jitted (the cached compiled path) and the tangent, likewise.
    value = lx.linear_solve(op, vector, solver).value
    assert value["a"].dtype == jnp.float32 and value["b"].dtype == jnp.float64
    _, tangent = jax.jvp(
        lambda v: lx.linear_solve(op, v, solver).value, (vector,), (vector,)
    )
    assert tangent["a"].dtype == jnp.float32 and tangent["b"].dtype == jnp.float64
    np.testing.assert_allclose(
        np.concatenate([tangent["a"], tangent["b"]]), expected, rtol=1e-6
    )
