"""Values of `linear_solve` against `np.linalg.pinv` in float64, for every solver
case, operator representation and dtype."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EXHAUSTIVE
from helpers import (
    CASE_KINDS,
    case_operator,
    DTYPES,
    flatten_jax as flatten,
    make_matrix,
    make_vector,
    pinv_solution,
    SOLVER_CASES,
    tolerance,
)

import lineax as lx


def _grid():
    """Every case in two of the three dtypes (rotating with the case), each dtype on
    one operator kind, the kinds rotating with the case: each dtype meets two
    thirds of the cases and every kind; the structured ("native") operator of
    each case that has one, in a dtype rotating with the case (all combinations
    with LINEAX_EXHAUSTIVE=1). (test_properties.py draws more combinations of
    case, kind and dtype, checked against the same pseudoinverse.)"""
    params = []
    for i, case in enumerate(SOLVER_CASES):
        kinds = [
            kind
            for kind in CASE_KINDS
            # "native" is the same as "matrix" without a structure tag.
            if kind != "native"
            or {lx.diagonal_tag, lx.tridiagonal_tag} & set(case.tags)
        ]
        for j, kind in enumerate(kinds):
            for d, dtype in enumerate(DTYPES):
                if (
                    EXHAUSTIVE
                    or ((i + d) % len(kinds) == j and (i + d) % len(DTYPES) != 0)
                    or (kind == "native" and (i + j) % len(DTYPES) == d)
                ):
                    params.append(
                        pytest.param(
                            case,
                            kind,
                            dtype,
                            id=f"{case.name}-{kind}-{jnp.dtype(dtype).name}",
                        )
                    )
    return params


@pytest.mark.parametrize("case,kind,dtype", _grid())
def test_solution_matches_pinv(case, kind, dtype):
    matrix = make_matrix(case.matrix_kind, dtype)
    operator = case_operator(kind, jnp.asarray(matrix, dtype), case.tags)
    vector = make_vector(operator)
    solution = lx.linear_solve(operator, vector, case.solver)
    assert solution.result == lx.RESULTS.successful
    expected = pinv_solution(matrix, np.asarray(flatten(vector), matrix.dtype), dtype)
    got = np.asarray(flatten(solution.value))
    assert got.dtype == jnp.dtype(dtype)
    scale = np.max(np.abs(expected)) + 1
    np.testing.assert_allclose(
        got, expected, rtol=0, atol=tolerance(dtype) * 10 * scale
    )


@pytest.mark.parametrize("case", SOLVER_CASES, ids=lambda c: c.name)
def test_state_reuse_and_jit(case):
    """`state=solver.init(...)` reused across right-hand sides, under `jit`."""
    matrix = make_matrix(case.matrix_kind, jnp.float64)
    operator = case_operator("matrix", jnp.asarray(matrix), case.tags)
    state = case.solver.init(operator, {})

    @jax.jit
    def solve(vector, state):
        return lx.linear_solve(operator, vector, case.solver, state=state).value

    for seed in (1, 2):
        vector = make_vector(operator, seed)
        expected = pinv_solution(matrix, np.asarray(vector))
        np.testing.assert_allclose(solve(vector, state), expected, atol=1e-9)


def test_invert():
    matrix = make_matrix("square", jnp.float64)
    inverse = lx.invert(lx.MatrixLinearOperator(jnp.asarray(matrix)))
    assert inverse.in_size() == 5
    np.testing.assert_allclose(inverse.as_matrix(), np.linalg.inv(matrix), atol=1e-10)
    vector = jnp.arange(5.0)
    np.testing.assert_allclose(
        inverse.mv(vector), np.linalg.solve(matrix, vector), atol=1e-10
    )


@pytest.mark.parametrize(
    "well_posed,tags,shape,expected",
    [
        (True, (), (3, 3), lx.LU),
        (True, lx.diagonal_tag, (3, 3), lx.Diagonal),
        (True, lx.tridiagonal_tag, (3, 3), lx.Tridiagonal),
        (True, lx.lower_triangular_tag, (3, 3), lx.Triangular),
        (True, lx.upper_triangular_tag, (3, 3), lx.Triangular),
        (True, lx.positive_semidefinite_tag, (3, 3), lx.Cholesky),
        (True, lx.negative_semidefinite_tag, (3, 3), lx.Cholesky),
        (None, (), (3, 3), lx.LU),
        (None, lx.positive_semidefinite_tag, (3, 3), lx.Cholesky),
        (None, (), (4, 3), lx.QR),
        (None, (), (3, 4), lx.QR),
        (False, (), (3, 3), lx.SVD),
        (False, (), (4, 3), lx.SVD),
        (False, lx.diagonal_tag, (3, 3), lx.Diagonal),
    ],
)
def test_auto_select_solver(well_posed, tags, shape, expected):
    operator = lx.MatrixLinearOperator(jnp.ones(shape), tags)
    solver = lx.AutoLinearSolver(well_posed=well_posed).select_solver(operator)
    assert type(solver) is expected
    if expected is lx.Diagonal:
        assert isinstance(solver, lx.Diagonal)
        assert solver.well_posed is (well_posed is not False)


def test_auto_well_posed_non_square_error():
    operator = lx.MatrixLinearOperator(jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="well_posed=False"):
        lx.linear_solve(operator, jnp.ones(4))


def test_pytree_vector_solve_matches_flat():
    """A PyTree operator solved with LU gives the flat solution, unflattened."""
    matrix = make_matrix("square", jnp.float64)
    flat_op = lx.MatrixLinearOperator(jnp.asarray(matrix))
    tree_op = case_operator("pytree", jnp.asarray(matrix))
    vector = make_vector(tree_op)
    tree_sol = lx.linear_solve(tree_op, vector, lx.LU()).value
    flat_sol = lx.linear_solve(flat_op, flatten(vector), lx.LU()).value
    assert jax.tree_util.tree_structure(tree_sol) == jax.tree_util.tree_structure(
        tree_op.in_structure()
    )
    np.testing.assert_allclose(flatten(tree_sol), flat_sol, atol=1e-12)


@pytest.mark.parametrize("n", [64, 512])
def test_svd_accuracy_ill_conditioned_float32(n):
    """SVD with the default rcond is as accurate as `jnp.linalg.lstsq` on random
    n x n + sqrt(n) I systems in float32."""
    rng = np.random.default_rng(0)
    matrix = (rng.standard_normal((n, n)) + np.sqrt(n) * np.eye(n)).astype(np.float32)
    vector = rng.standard_normal(n).astype(np.float32)
    expected = np.linalg.solve(matrix.astype(np.float64), vector.astype(np.float64))
    ours = lx.linear_solve(
        lx.MatrixLinearOperator(jnp.asarray(matrix)), jnp.asarray(vector), lx.SVD()
    ).value
    theirs = jnp.linalg.lstsq(jnp.asarray(matrix), jnp.asarray(vector))[0]
    err = lambda x: (
        np.linalg.norm(np.asarray(x, np.float64) - expected) / np.linalg.norm(expected)
    )
    assert err(ours) <= 2 * err(theirs) + 1e-6
    assert err(ours) < 1e-3
