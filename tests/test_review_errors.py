"""Regression tests from an adversarial review of what a user sees after a
mistake, over every public constructor, solver and function (`lx.__all__`,
`lineax.internal`): wrong types, shapes, dtypes and structures of every argument,
classes for instances, operators for arrays, NumPy scalars for Python ones, and
integer dtypes, eagerly and under `jax.jit`.

Each case here had given an unclear error (NumPy's or JAX's, or a wrong exception
type), silently accepted the mistake, or silently returned a wrong answer; or had
refused what lineax 0.1.1 accepts. The cases that already behaved are in
`test_errors.py`. Checks are at construction or trace time: most tests construct
or use `jax.eval_shape`, and compile nothing.
"""

# Adversarial throughout: the cases pass wrong-typed arguments on purpose.
# pyright: reportArgumentType=false, reportOperatorIssue=false

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import raises_message
from jax.experimental import sparse as jsparse

import lineax as lx
import lineax.internal as lxi


A = jnp.array([[3.0, 1.0, 0.0], [1.0, 4.0, 1.0], [0.0, 1.0, 5.0]])
B = jnp.array([1.0, 2.0, 3.0])
OP = lx.MatrixLinearOperator(A)
SPD = lx.MatrixLinearOperator(A, lx.positive_semidefinite_tag)
S3 = jax.ShapeDtypeStruct((3,), jnp.float64)


def _solve_shape(
    operator,
    vector,
    solver: lx.AbstractLinearSolver = lx.AutoLinearSolver(well_posed=True),
    **kw,
):
    return jax.eval_shape(lambda: lx.linear_solve(operator, vector, solver, **kw))


# (id, thunk, exception type, regex the message must match)
TRACE_TIME_CASES = [
    # Solver parameters.
    ("svd_rcond_str", lambda: lx.SVD(rcond="1e-3"), TypeError, "`rcond`.*str"),
    (
        "svd_rcond_vector",
        lambda: lx.SVD(rcond=[1e-3, 1e-3]),
        TypeError,
        "`rcond`.*list",
    ),
    ("diagonal_rcond_str", lambda: lx.Diagonal(rcond="a"), TypeError, "`rcond`"),
    (
        "diagonal_well_posed_str",
        lambda: lx.Diagonal(well_posed="yes"),
        TypeError,
        "`well_posed`.*'yes'",
    ),
    # Operator arithmetic with something that is not an operator.
    ("mul_by_str", lambda: OP * "a", TypeError, "`scalar`.*str"),
    ("mul_by_none", lambda: lx.MulLinearOperator(OP, None), TypeError, "`scalar`"),
    (
        "add_scalar",
        lambda: OP + 1.0,
        TypeError,
        r"`\+`.*float.*IdentityLinearOperator",
    ),
    ("radd_scalar", lambda: 1.0 + OP, TypeError, r"`\+`.*IdentityLinearOperator"),
    ("sub_matrix", lambda: OP - A, TypeError, "`-`.*MatrixLinearOperator"),
    ("matmul_vector", lambda: OP @ B, TypeError, r"`@`.*operator\.mv\(vector\)"),
    ("rmatmul_vector", lambda: B @ OP, TypeError, r"`@`.*operator\.mv\(vector\)"),
    ("div_by_operator", lambda: OP / OP, TypeError, r"lx\.invert"),
    ("scalar_by_operator", lambda: 2.0 / OP, TypeError, r"s \* lx\.invert"),
    # An operator where a PyTree of arrays belongs (it is one, of its own arrays).
    (
        "diagonal_of_operator",
        lambda: lx.DiagonalLinearOperator(OP),
        TypeError,
        r"`diagonal`.*linear operator MatrixLinearOperator.*lx\.diagonal",
    ),
    (
        "pytree_of_operator",
        lambda: lx.PyTreeLinearOperator(OP, S3),
        TypeError,
        "`pytree`.*linear operator",
    ),
    (
        "identity_of_operator",
        lambda: lx.IdentityLinearOperator(OP),
        TypeError,
        r"`input_structure`.*in_structure\(\)",
    ),
    (
        "function_structure_operator",
        lambda: lx.FunctionLinearOperator(lambda x: x, OP),
        TypeError,
        "`input_structure`.*linear operator",
    ),
    (
        "jacobian_x_operator",
        lambda: lx.JacobianLinearOperator(lambda x, args: x, OP),
        TypeError,
        "`x`.*linear operator",
    ),
    # The user's function.
    (
        "function_returns_none",
        lambda: lx.FunctionLinearOperator(lambda x: None, S3),
        TypeError,
        "returned None.*return",
    ),
    (
        "jacobian_fn_of_one_argument",
        lambda: lx.JacobianLinearOperator(lambda x: x, B),
        ValueError,
        r"`fn\(x, args\)`.*two arguments",
    ),
    (
        "jacobian_fn_fails",
        lambda: lx.JacobianLinearOperator(lambda x, args: x @ jnp.ones(4), B),
        ValueError,
        r"`fn\(x, args\)` failed",
    ),
    (
        "jacobian_integer_output",
        lambda: lx.JacobianLinearOperator(lambda x, args: jnp.round(x).astype(int), B),
        TypeError,
        "dtype int.*floating",
    ),
    (
        "kronecker_list",
        lambda: lx.KroneckerLinearOperator([OP, OP]),
        TypeError,
        r"separate arguments.*\*operators",
    ),
    # Solving.
    (
        "operator_without_arrays",
        lambda: _solve_shape(lx.IdentityLinearOperator(None), None),
        ValueError,
        "at least one array.*nothing to solve for",
    ),
    (
        "select_solver_of_array",
        lambda: lx.AutoLinearSolver(well_posed=True).select_solver(A),
        TypeError,
        "select_solver.*`operator`.*ArrayImpl",
    ),
    ("invert_throw_str", lambda: lx.invert(OP, throw="yes"), TypeError, "`throw`"),
    (
        "preconditioner_class",
        lambda: _solve_shape(
            SPD,
            B,
            lx.CG(rtol=1e-6, atol=1e-6),
            options={"preconditioner": lx.JacobiPreconditioner},
        ),
        ValueError,
        r"class `JacobiPreconditioner`.*lx\.JacobiPreconditioner\(operator\)",
    ),
    # `lineax.internal`, for solvers written outside lineax.
    (
        "ravel_vector_wrong_shape",
        lambda: lxi.ravel_vector(jnp.ones(4), lxi.pack_structures(OP)),
        ValueError,
        r"output structure.*float64\[3\]; got float64\[4\]",
    ),
    (
        "unravel_solution_wrong_size",
        lambda: lxi.unravel_solution(jnp.ones(4), lxi.pack_structures(OP)),
        ValueError,
        r"input size 3.*\(4,\)",
    ),
    # Preconditioner parameters: a string or a vector for a number, an int seed.
    ("ssor_omega_str", lambda: lx.SSORPreconditioner(OP, "a"), TypeError, "`omega`"),
    (
        "neumann_scale_vector",
        lambda: lx.NeumannPreconditioner(SPD, 2, jnp.ones(3)),
        TypeError,
        "`scale`.*0-d",
    ),
    (
        "chebyshev_interval_str",
        lambda: lx.ChebyshevPreconditioner(SPD, 2, ("a", "b")),
        TypeError,
        "`interval`",
    ),
    (
        "ilu_shift_vector",
        lambda: lx.ILUPreconditioner(
            lx.SparseLinearOperator(jsparse.BCOO.fromdense(A)), shift=np.ones(3)
        ),
        TypeError,
        "`shift`.*0-d",
    ),
    (
        "multigrid_spacing_str",
        lambda: lx.MultigridPreconditioner(lambda u, h: u, (8,), spacing="a"),
        TypeError,
        "`spacing`",
    ),
    (
        "multigrid_spacing_zero",
        lambda: lx.MultigridPreconditioner(lambda u, h: u, (8,), spacing=0.0),
        ValueError,
        "`spacing` must be a positive",
    ),
    (
        "jacobi_key_int",
        lambda: lx.JacobiPreconditioner(OP, probes=2, key=0),
        TypeError,
        r"`key`.*jax\.random\.key",
    ),
    (
        "chebyshev_key_int",
        lambda: lx.ChebyshevPreconditioner(SPD, 2, key=0),
        TypeError,
        r"`key`.*jax\.random\.key",
    ),
]


@pytest.mark.parametrize(
    "thunk,error,match",
    [c[1:] for c in TRACE_TIME_CASES],
    ids=[c[0] for c in TRACE_TIME_CASES],
)
def test_trace_time_error(thunk, error, match):
    with raises_message(error, match):
        thunk()


_KRYLOV = [
    lx.CG,
    lx.GMRES,
    lx.BiCGStab,
    lx.LSMR,
    lx.MINRES,
    lx.PipelinedCG,
    lx.FlexibleCG,
    lx.FGMRES,
]


@pytest.mark.parametrize("cls", _KRYLOV, ids=lambda c: c.__name__)
def test_numpy_scalars_as_solver_parameters(cls):
    # Accepted by lineax 0.1.1, and how tolerances are often computed
    # (`np.finfo(np.float32).eps ** 0.5` is a NumPy scalar): stored as Python
    # numbers, so that the solver equals (and compiles as) the one written with
    # Python numbers.
    tol = np.finfo(np.float32).eps ** 0.5
    solver = cls(rtol=tol, atol=jnp.asarray(1e-6), max_steps=np.int64(50))
    plain = cls(rtol=float(tol), atol=1e-6, max_steps=50)
    assert type(solver.rtol) is float and type(solver.max_steps) is int
    assert solver == plain and hash(solver) == hash(plain)


def test_numpy_scalar_rcond_and_restart():
    assert lx.SVD(rcond=np.float32(0.5)) == lx.SVD(rcond=0.5)
    assert lx.Diagonal(rcond=np.float64(0.5)).rcond == 0.5
    assert lx.GMRES(rtol=1e-6, atol=1e-6, restart=np.int32(5)).restart == 5


_INT32 = jax.ShapeDtypeStruct((3,), jnp.int32)


_INT32_OPERATORS = {
    "function": lambda: lx.FunctionLinearOperator(lambda x: 2 * x, _INT32),
    "identity": lambda: 2.0 * lx.IdentityLinearOperator(_INT32),
    "pytree_output": lambda: lx.PyTreeLinearOperator(2 * jnp.eye(3), _INT32),
}
_KRYLOV_SOLVERS = {
    "GMRES": lx.GMRES(rtol=1e-8, atol=1e-8),
    "LSMR": lx.LSMR(rtol=1e-8, atol=1e-8),
}


# (LU solved the identity and PyTree cases in floating point already.)
@pytest.mark.parametrize(
    "make, solver",
    [
        pytest.param(_INT32_OPERATORS["function"], lx.LU(), id="function-LU"),
        *[
            pytest.param(make, solver, id=f"{name}-{solver_name}")
            for name, make in _INT32_OPERATORS.items()
            for solver_name, solver in _KRYLOV_SOLVERS.items()
        ],
    ],
)
def test_integer_structure_is_floating(make, solver):
    # An int32 structure gave an int32 solution: [0, 0, 0] for 2x = 1, reported
    # successful (lineax 0.1.1: [0.5, 0.5, 0.5]); the Krylov solvers failed in
    # `np.finfo(int32)`.
    operator = make()
    assert operator.in_structure() == S3
    out = jax.eval_shape(
        lambda: lx.linear_solve(operator, jnp.ones(3, jnp.int32), solver).value
    )
    assert out == S3


def test_integer_structure_solves_to_the_floating_answer():
    operator = lx.FunctionLinearOperator(lambda x: 2 * x, _INT32)
    solution = lx.linear_solve(operator, jnp.ones(3, jnp.int32), lx.LU())
    np.testing.assert_allclose(solution.value, [0.5, 0.5, 0.5])


def test_function_of_a_one_argument_fn_keeps_the_original_error():
    with pytest.raises(ValueError) as info:
        lx.JacobianLinearOperator(lambda x: x, B)
    assert isinstance(info.value.__cause__, TypeError)


def test_solver_with_numpy_tolerance_solves():
    # End to end, under `jit` (where a static field is hashed).
    solver = lx.CG(rtol=np.float32(1e-10), atol=np.float32(1e-10))
    value = eqx.filter_jit(lambda b: lx.linear_solve(SPD, b, solver).value)(B)
    np.testing.assert_allclose(value, np.linalg.solve(A, B), rtol=1e-6)
