"""The bad-input catalogue: every case gives a `ValueError`/`TypeError` at trace
time naming the argument, a `RESULTS` code at run time, or a documented and tested
behaviour. Never a crash, never a silently wrong answer reported as success."""

# Adversarial throughout: the cases pass wrong-typed arguments on purpose.
# pyright: reportArgumentType=false, reportOperatorIssue=false

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import raises_message
from helpers import DelegatingLU, UserMatrixOperator

import lineax as lx


A = jnp.array([[3.0, 1.0, 0.0], [1.0, 4.0, 1.0], [0.0, 1.0, 5.0]])
B = jnp.array([1.0, 2.0, 3.0])
OP = lx.MatrixLinearOperator(A)
SINGULAR = jnp.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [1.0, 0.0, 1.0]])


def _raise(fn, error, match):
    with raises_message(error, match):
        fn()


# (id, thunk, exception type, regex the message must match)
TRACE_TIME_CASES = [
    (
        "vector_wrong_size",
        lambda: lx.linear_solve(OP, jnp.ones(4)),
        ValueError,
        "vector.*shape",
    ),
    (
        "vector_wrong_rank",
        lambda: lx.linear_solve(OP, jnp.ones((3, 1))),
        ValueError,
        "vector.*shape",
    ),
    (
        "vector_wrong_structure",
        lambda: lx.linear_solve(OP, (B,)),
        ValueError,
        "vector.*structure",
    ),
    (
        "vector_dict_for_array",
        lambda: lx.linear_solve(OP, {"a": B}),
        ValueError,
        "vector.*structure",
    ),
    (
        # A Python list is a PyTree of scalars: the message says to make it an
        # array, and describes the expected vector in words.
        "vector_python_list",
        lambda: lx.linear_solve(OP, [1.0, 2.0, 3.0]),
        ValueError,
        r"expected one array, float\d+\[3\], got a list of 3 leaves.*Python list"
        r".*jnp\.asarray",
    ),
    (
        "vector_not_array",
        lambda: lx.linear_solve(OP, "abc"),
        (TypeError, ValueError),
        "vector",
    ),
    (
        "vector_float64_operator_float32",
        lambda: lx.linear_solve(lx.MatrixLinearOperator(A.astype(jnp.float32)), B),
        ValueError,
        "vector.*dtype.*float32",
    ),
    (
        "vector_complex_operator_real",
        lambda: lx.linear_solve(OP, B.astype(jnp.complex128)),
        ValueError,
        "vector.*complex",
    ),
    (
        "vector_complex128_operator_complex64",
        lambda: lx.linear_solve(
            lx.MatrixLinearOperator(A.astype(jnp.complex64)), B.astype(jnp.complex128)
        ),
        ValueError,
        "vector.*dtype",
    ),
    (
        "operator_is_array",
        lambda: lx.linear_solve(A, B),
        TypeError,
        "operator.*MatrixLinearOperator",
    ),
    ("solver_not_solver", lambda: lx.linear_solve(OP, B, "lu"), TypeError, "solver"),
    # A solver class where an instance belongs: the message says what was meant.
    (
        "solver_class",
        lambda: lx.linear_solve(OP, B, lx.LU),
        TypeError,
        r"`solver`.*class `LU`.*lx\.LU\(\)",
    ),
    (
        # A solver named by a string (as SciPy's `method="..."`): the message names
        # the solver object it meant, with `...` where that needs arguments.
        "solver_string",
        lambda: lx.linear_solve(OP, B, "gmres"),  # pyright: ignore
        TypeError,
        r"`solver`.*str 'gmres'.*lx\.GMRES\(\.\.\.\)",
    ),
    (
        "solver_string_without_arguments",
        lambda: lx.linear_solve(OP, B, "qr"),  # pyright: ignore
        TypeError,
        r"`solver`.*str 'qr'.*lx\.QR\(\)`",
    ),
    (
        "solver_string_unknown",
        lambda: lx.linear_solve(OP, B, "fastest"),  # pyright: ignore
        TypeError,
        r"`solver`.*str 'fastest'.*solvers are objects, e\.g\. `lx\.LU\(\)`",
    ),
    (
        # A preconditioner by its name: the class to build it with.
        "preconditioner_string",
        lambda: lx.linear_solve(
            lx.TaggedLinearOperator(OP, lx.positive_semidefinite_tag),
            B,
            lx.CG(rtol=1e-6, atol=1e-6),
            options={"preconditioner": "incomplete-cholesky"},
        ),
        ValueError,
        r"`preconditioner`.*string 'incomplete-cholesky'.*"
        r"lx\.IncompleteCholeskyPreconditioner\(operator\)",
    ),
    (
        "invert_solver_class",
        lambda: lx.invert(OP, lx.CG),
        TypeError,
        r"`solver`.*class `CG`.*lx\.CG\(\)",
    ),
    (
        "woodbury_inner_solver_class",
        lambda: lx.Woodbury(lx.LU),
        TypeError,
        r"`inner`.*class `LU`.*lx\.LU\(\)",
    ),
    (
        "block_diagonal_solver_class_in_tuple",
        lambda: lx.BlockDiagonal((lx.LU(), lx.QR)),
        TypeError,
        r"`solver\[1\]`.*class `QR`",
    ),
    # No half-precision factorisations exist (LAPACK, cuSOLVER): a named
    # TypeError with the remedies, not JAX's `KeyError` from inside its lowering.
    (
        "lu_float16",
        lambda: lx.linear_solve(
            lx.MatrixLinearOperator(jnp.eye(3, dtype=jnp.float16)),
            jnp.ones(3, jnp.float16),
        ),
        TypeError,
        r"`lx\.LU` cannot factorise a float16 operator.*float32.*iterative",
    ),
    (
        "tridiagonal_bfloat16",
        lambda: lx.linear_solve(
            lx.TridiagonalLinearOperator(
                jnp.ones(3, jnp.bfloat16),
                jnp.zeros(2, jnp.bfloat16),
                jnp.zeros(2, jnp.bfloat16),
            ),
            jnp.ones(3, jnp.bfloat16),
            lx.Tridiagonal(),
        ),
        TypeError,
        r"`lx\.Tridiagonal` cannot factorise a bfloat16 operator",
    ),
    (
        "normal_inner_solver_class",
        lambda: lx.Normal(lx.Cholesky),
        TypeError,
        r"`inner_solver`.*class `Cholesky`.*lx\.Cholesky\(\)",
    ),
    ("throw_not_bool", lambda: lx.linear_solve(OP, B, throw="yes"), TypeError, "throw"),
    (
        "options_not_dict",
        lambda: lx.linear_solve(OP, B, options=[1]),
        TypeError,
        "options",
    ),
    (
        "options_unknown_key",
        lambda: lx.linear_solve(OP, B, options={"precondition": 1}),
        ValueError,
        "Unknown key.*precondition",
    ),
    (
        # (Keys of mixed types do not sort: the message sorted them, and raised
        # "'<' not supported between instances of 'int' and 'str'".)
        "options_unknown_keys_of_mixed_types",
        lambda: lx.invert(OP, options={"precondition": 1, 2: 3}),
        ValueError,
        r"Unknown key\(s\) \['precondition', 2\] in `options`",
    ),
    (
        "non_square_well_posed",
        lambda: lx.linear_solve(lx.MatrixLinearOperator(jnp.ones((4, 3))), jnp.ones(4)),
        ValueError,
        "well_posed=False",
    ),
    (
        "lu_non_square",
        lambda: lx.linear_solve(
            lx.MatrixLinearOperator(jnp.ones((4, 3))), jnp.ones(4), lx.LU()
        ),
        ValueError,
        "LU.*square.*lx.QR",
    ),
    (
        "cholesky_no_tag",
        lambda: lx.linear_solve(OP, B, lx.Cholesky()),
        ValueError,
        "Cholesky.*positive_semidefinite_tag",
    ),
    (
        "cholesky_non_square",
        lambda: lx.linear_solve(
            lx.MatrixLinearOperator(jnp.ones((4, 3)), lx.positive_semidefinite_tag),
            jnp.ones(4),
            lx.Cholesky(),
        ),
        ValueError,
        "square",
    ),
    (
        "triangular_no_tag",
        lambda: lx.linear_solve(OP, B, lx.Triangular()),
        ValueError,
        "Triangular.*lower_triangular_tag",
    ),
    (
        "tridiagonal_no_tag",
        lambda: lx.linear_solve(OP, B, lx.Tridiagonal()),
        ValueError,
        "Tridiagonal.*tridiagonal_tag",
    ),
    (
        "diagonal_no_tag",
        lambda: lx.linear_solve(OP, B, lx.Diagonal()),
        ValueError,
        "Diagonal.*diagonal_tag",
    ),
    (
        "state_from_other_solver",
        lambda: lx.linear_solve(OP, B, lx.QR(), state=lx.LU().init(OP, {})),
        ValueError,
        "state",
    ),
    (
        "state_from_other_operator",
        lambda: lx.linear_solve(
            OP, B, lx.LU(), state=lx.LU().init(lx.MatrixLinearOperator(jnp.eye(4)), {})
        ),
        ValueError,
        "state",
    ),
    ("svd_negative_rcond", lambda: lx.SVD(rcond=-1.0), ValueError, "rcond"),
    ("diagonal_negative_rcond", lambda: lx.Diagonal(rcond=-1.0), ValueError, "rcond"),
    (
        "auto_bad_well_posed",
        lambda: lx.AutoLinearSolver(well_posed="yes"),
        ValueError,
        "well_posed",
    ),
    ("normal_bad_inner", lambda: lx.Normal("cg"), TypeError, "inner_solver"),
    (
        "matrix_1d",
        lambda: lx.MatrixLinearOperator(jnp.ones(3)),
        ValueError,
        "matrix.*2-D",
    ),
    ("matrix_not_array", lambda: lx.MatrixLinearOperator("abc"), TypeError, "matrix"),
    (
        "tridiagonal_bad_lengths",
        lambda: lx.TridiagonalLinearOperator(jnp.ones(3), jnp.ones(3), jnp.ones(2)),
        ValueError,
        "lower_diagonal",
    ),
    (
        "jacobian_bad_jac",
        lambda: lx.JacobianLinearOperator(lambda x, a: x, B, jac="rev"),
        ValueError,
        "jac",
    ),
    (
        "pytree_leaf_bad_shape",
        lambda: lx.PyTreeLinearOperator(
            jnp.ones((2, 3)), jax.ShapeDtypeStruct((3,), jnp.float64)
        ),
        ValueError,
        "shape",
    ),
    (
        "pytree_non_array_leaf",
        lambda: lx.PyTreeLinearOperator("abc", jax.ShapeDtypeStruct((3,), jnp.float64)),
        TypeError,
        "pytree",
    ),
    (
        "add_mismatched",
        lambda: OP + lx.MatrixLinearOperator(jnp.eye(4)),
        ValueError,
        "different input structures",
    ),
    (
        "compose_mismatched",
        lambda: OP @ lx.MatrixLinearOperator(jnp.ones((4, 2))),
        ValueError,
        "compose",
    ),
    ("mul_by_vector", lambda: OP * jnp.ones(3), ValueError, "scalar"),
    ("mul_by_operator", lambda: OP * OP, TypeError, "@"),
    (
        "function_not_callable",
        lambda: lx.FunctionLinearOperator(3, jax.ShapeDtypeStruct((3,), jnp.float64)),
        TypeError,
        "fn",
    ),
    (
        "function_bad_input_structure",
        lambda: lx.FunctionLinearOperator(
            lambda x: A @ x, jax.ShapeDtypeStruct((4,), jnp.float64)
        ),
        ValueError,
        "input_structure",
    ),
    (
        "diagonal_non_array",
        lambda: lx.DiagonalLinearOperator([1.0, "a"]),
        TypeError,
        "diagonal",
    ),
    (
        "tagged_non_operator",
        lambda: lx.TaggedLinearOperator(A, lx.symmetric_tag),
        TypeError,
        "operator",
    ),
]


@pytest.mark.parametrize(
    "thunk,error,match",
    [c[1:] for c in TRACE_TIME_CASES],
    ids=[c[0] for c in TRACE_TIME_CASES],
)
def test_trace_time_error(thunk, error, match):
    _raise(thunk, error, match)


RUN_TIME_CASES = [
    (
        "nan_in_operator",
        lambda: lx.MatrixLinearOperator(A.at[0, 1].set(jnp.nan)),
        B,
        lx.LU(),
        "nonfinite_input",
    ),
    ("inf_in_vector", lambda: OP, B.at[1].set(jnp.inf), lx.LU(), "nonfinite_input"),
    (
        "nan_in_vector_svd",
        lambda: OP,
        B.at[1].set(jnp.nan),
        lx.SVD(),
        "nonfinite_input",
    ),
    ("singular_lu", lambda: lx.MatrixLinearOperator(SINGULAR), B, lx.LU(), "singular"),
    # QR reports an exactly zero diagonal entry of R, as from a zero column (a
    # rank deficiency that rounding hides is in `stats["rcond"]` instead).
    (
        "singular_qr",
        lambda: lx.MatrixLinearOperator(SINGULAR.at[:, 1].set(0)),
        B,
        lx.QR(),
        "singular",
    ),
    (
        "rank_deficient_tall_qr",
        lambda: lx.MatrixLinearOperator(
            jnp.concatenate([SINGULAR, SINGULAR]).at[:, 1].set(0)
        ),
        jnp.ones(6),
        lx.QR(),
        "singular",
    ),
    (
        "nearly_singular_lu",
        lambda: lx.MatrixLinearOperator(SINGULAR.at[1, 0].add(1e-17)),
        B,
        lx.LU(),
        "singular",
    ),
    (
        "singular_cholesky",
        lambda: lx.MatrixLinearOperator(jnp.ones((3, 3)), lx.positive_semidefinite_tag),
        B,
        lx.Cholesky(),
        "singular",
    ),
    (
        "indefinite_cholesky",
        lambda: lx.MatrixLinearOperator(
            jnp.diag(jnp.array([1.0, -1.0, 2.0])), lx.positive_semidefinite_tag
        ),
        B,
        lx.Cholesky(),
        "singular",
    ),
    (
        "singular_triangular",
        lambda: lx.MatrixLinearOperator(
            jnp.tril(A).at[1, 1].set(0), lx.lower_triangular_tag
        ),
        B,
        lx.Triangular(),
        "singular",
    ),
    (
        "singular_diagonal_well_posed",
        lambda: lx.DiagonalLinearOperator(jnp.array([1.0, 0.0, 2.0])),
        B,
        lx.Diagonal(well_posed=True),
        "singular",
    ),
    (
        "singular_tridiagonal",
        lambda: lx.TridiagonalLinearOperator(jnp.zeros(3), jnp.zeros(2), jnp.zeros(2)),
        B,
        lx.Tridiagonal(),
        "singular",
    ),
]


@pytest.mark.parametrize(
    "make_operator,vector,solver,member",
    [c[1:] for c in RUN_TIME_CASES],
    ids=[c[0] for c in RUN_TIME_CASES],
)
def test_run_time_result(make_operator, vector, solver, member):
    solution = lx.linear_solve(make_operator(), vector, solver, throw=False)
    assert solution.result == getattr(lx.RESULTS, member)
    # Failure is visible in the value too: never a finite "answer" for these,
    # except that a numerically singular LU may give huge finite values. (LAPACK
    # propagates NaN through its LU; cuSOLVER's may not, so on a GPU only the
    # result code says it, as the docs promise.)
    if member == "nonfinite_input" and jax.default_backend() == "cpu":
        assert not np.all(np.isfinite(solution.value))
    # With throw=True the same solve raises, with the result's message.
    message = lx.RESULTS[getattr(lx.RESULTS, member)]
    with pytest.raises(eqx.EquinoxRuntimeError, match="`linear_solve` failed") as info:
        lx.linear_solve(make_operator(), vector, solver)
    assert message[:40] in str(info.value)


def test_singular_raises_under_jit_with_advice():
    # Under `eqx.filter_jit` (not plain `jax.jit`) the error is an EquinoxRuntimeError.
    solve = eqx.filter_jit(
        lambda a: lx.linear_solve(lx.MatrixLinearOperator(a), B).value
    )
    with pytest.raises(eqx.EquinoxRuntimeError, match="well_posed=False"):
        solve(SINGULAR)


def test_every_failure_message_says_what_to_do():
    for name in (
        "max_steps_reached",
        "singular",
        "breakdown",
        "stagnation",
        "conlim",
        "nonfinite_input",
    ):
        message = lx.RESULTS[getattr(lx.RESULTS, name)]
        assert any(
            word in message for word in ("Try", "try", "use", "Check", "Increase")
        )
    assert lx.RESULTS[lx.RESULTS.successful] == ""
    assert lx.RESULTS[lx.RESULTS.max_steps_reached] == (
        "The maximum number of solver steps was reached. Try increasing `max_steps`."
    )


# Documented behaviours, rather than errors.


def test_real_vector_complex_operator_is_promoted():
    operator = lx.MatrixLinearOperator(
        A.astype(jnp.complex128) * jnp.complex128(1 + 1j)
    )
    solution = lx.linear_solve(operator, B)
    np.testing.assert_allclose(
        solution.value,
        np.linalg.solve(np.asarray(A) * (1 + 1j), np.asarray(B)),
        rtol=1e-12,
    )


def test_integer_vector_and_matrix_are_converted():
    solution = lx.linear_solve(
        lx.MatrixLinearOperator(jnp.array([[2, 0], [0, 4]])), jnp.array([2, 2])
    )
    np.testing.assert_allclose(solution.value, [1.0, 0.5])
    assert solution.value.dtype == jnp.float64


def test_float32_vector_float64_operator_is_promoted():
    solution = lx.linear_solve(OP, B.astype(jnp.float32))
    assert solution.value.dtype == jnp.float64


def test_lying_symmetric_tag_cholesky_uses_hermitian_part():
    """Documented: Cholesky factorises the Hermitian part (A + A^H) / 2 of an
    operator tagged positive semidefinite; a non-symmetric matrix is not an error."""
    nonsym = A.at[0, 2].set(0.5)
    operator = lx.MatrixLinearOperator(nonsym, lx.positive_semidefinite_tag)
    solution = lx.linear_solve(operator, B, lx.Cholesky())
    sym = (nonsym + nonsym.T) / 2
    np.testing.assert_allclose(solution.value, np.linalg.solve(sym, B), rtol=1e-10)


def test_nonlinear_function_operator():
    """Documented: linearity of `fn` is not checked. Materialising solvers see the
    matrix whose columns are `fn(e_i)`; transposing a nonlinear `fn` is an error
    from `jax.linear_transpose`."""
    operator = lx.FunctionLinearOperator(
        lambda x: x**2 + x, jax.ShapeDtypeStruct((3,), jnp.float64)
    )
    np.testing.assert_allclose(operator.as_matrix(), 2 * np.eye(3))
    with pytest.raises(Exception):  # noqa: B017 (JAX's own error for nonlinearity)
        operator.transpose()


def test_no_crash_on_empty_tags_user_operator():
    """An operator class that registers no predicates still solves (as 'no
    structure')."""

    operator = UserMatrixOperator(A)
    assert lx.AutoLinearSolver(well_posed=True).select_solver(operator) == lx.LU()
    np.testing.assert_allclose(
        lx.linear_solve(operator, B).value, np.linalg.solve(A, B)
    )
    np.testing.assert_allclose(lx.diagonal(operator), np.diag(A))


def test_nan_hidden_in_a_masked_diagonal_entry_is_reported():
    """The pseudoinverse of a diagonal masks tiny entries; a NaN must not hide
    there."""
    operator = lx.DiagonalLinearOperator(jnp.array([1.0, jnp.nan, 0.0]))
    solution = lx.linear_solve(operator, B, lx.Diagonal(), throw=False)
    assert solution.result == lx.RESULTS.nonfinite_input


def test_missing_tag_message_has_no_nested_code_spans():
    operator = lx.MatrixLinearOperator(jnp.eye(2))
    with pytest.raises(ValueError) as info:
        lx.linear_solve(operator, jnp.ones(2), lx.CG(rtol=1e-6, atol=1e-6))
    message = str(info.value)
    example = "`lx.TaggedLinearOperator(operator, lx.positive_semidefinite_tag)`"
    assert example in message
    assert "``" not in message and ", `lx." not in message


class _UndeclaredSolver(DelegatingLU):
    """A user's solver that does not declare `option_keys`: it may read keys of
    its own, so `linear_solve` accepts any."""

    def init(self, operator, options):
        return lx.LU().init(operator, {})

    def compute(self, state, vector, options):
        return lx.LU().compute(state, vector, {})


class _DeclaredSolver(_UndeclaredSolver):
    option_keys = frozenset({"my_shift"})


def _solve_shape(solver, options):
    return jax.eval_shape(lambda: lx.linear_solve(OP, B, solver, options=options))


def test_option_keys_unknown_key_names_the_solvers_keys():
    with pytest.raises(ValueError, match=r"'yo'.*GMRES.*reads \['preconditioner'"):
        _solve_shape(lx.GMRES(1e-5, 1e-5), {"yo": B})
    with pytest.raises(ValueError, match="lx.LU` reads no options"):
        _solve_shape(lx.LU(), {"preconditoner": OP})


def test_option_keys_another_solvers_key_is_accepted():
    # One `options` dict serves when switching solvers (the published lineax
    # accepts any key): a key that some solver reads is no typo.
    _solve_shape(lx.LU(), {"y0": B, "preconditioner": OP})
    _solve_shape(lx.AutoLinearSolver(well_posed=True), {"damp": 1.0})


def test_option_keys_undeclared_user_solver_accepts_its_own_keys():
    _solve_shape(_UndeclaredSolver(), {"anything": 1.0})


def test_option_keys_declared_by_a_user_solver_are_known():
    _solve_shape(_DeclaredSolver(), {"my_shift": 1.0})
    _solve_shape(lx.LU(), {"my_shift": 1.0})  # declared by a solver: not a typo
    with pytest.raises(ValueError, match=r"my_shif'.*_DeclaredSolver.*my_shift"):
        _solve_shape(_DeclaredSolver(), {"my_shif": 1.0})
