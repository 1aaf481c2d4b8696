"""Regression tests from a randomised robustness fuzzer over the public API (a
valid call, then one or two mutations of its arguments), run outside the
repository: each case here had given an internal exception (AttributeError, ...)
or an unhelpful message where a clear error naming the argument was due, or a wrong
answer without an error (an operator's `mv` ignoring, cutting or reshaping a
vector of the wrong structure). All checks are at trace time: nothing here
compiles more than a small eager solve.
"""

from typing import Any

import jax
import jax.numpy as jnp
import pytest

import lineax as lx


A = jnp.array([[4.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 2.0]])
B = jnp.array([1.0, -2.0, 0.5])
OP = lx.MatrixLinearOperator(A)  # untagged: no structured solver may take it
_KW: dict[str, Any] = dict(rtol=1e-6, atol=1e-6, max_steps=20)


# A solver that cannot solve the operator at all, given a `state` (here LU's, or
# None): `compute` read the state as its own and raised `AttributeError: 'LUState'
# object has no attribute 'operator'`, where without a state `init` says what is
# wrong (a missing tag, the wrong operator class).
_NEEDS_STRUCTURE = [
    (lx.CG(**_KW), "positive or negative"),
    (lx.PipelinedCG(**_KW), "positive or negative"),
    (lx.FlexibleCG(**_KW), "positive or negative"),
    (lx.MINRES(**_KW), "symmetric"),
    (lx.Cholesky(), "positive or negative"),
    (lx.Diagonal(), "diagonal"),
    (lx.Triangular(), "triangular"),
    (lx.Tridiagonal(), "tridiagonal"),
    (lx.Schur(), "BlockLinearOperator"),
    (lx.Woodbury(), "LowRankUpdateLinearOperator"),
    (lx.Kronecker(), "KroneckerLinearOperator"),
    (lx.BlockDiagonal(), "BlockDiagonalLinearOperator"),
]


@pytest.mark.parametrize("state", ["lu", "none"])
@pytest.mark.parametrize(
    "solver,match",
    _NEEDS_STRUCTURE,
    ids=[type(s).__name__ for s, _ in _NEEDS_STRUCTURE],
)
def test_state_for_a_solver_that_cannot_solve_the_operator(solver, match, state):
    given = lx.LU().init(OP, {}) if state == "lu" else None
    # (Not `raises_message`: runtime type checking passes these arguments.)
    with pytest.raises(ValueError, match=match):
        jax.eval_shape(lambda: lx.linear_solve(OP, B, solver, state=given))


def _m(a):
    return lx.MatrixLinearOperator(jnp.asarray(a))


_BLOCK = lx.BlockLinearOperator([[_m(A[:2, :2]), _m(A[:2, 2:])], [_m(A[2:, :2]), None]])
_BLOCK_DIAGONAL = lx.BlockDiagonalLinearOperator([_m(A[:2, :2]), _m(A[2:, 2:])])
# Equal blocks: `mv` runs them as one, under `vmap`.
_STACKED = lx.BlockDiagonalLinearOperator([_m(A[:2, :2]), _m(A[1:, 1:])])


# `mv` of a block operator paired blocks with parts of the vector by `zip`: a
# missing part gave the product of the blocks it had, an extra part was ignored
# (both a wrong answer, no error), and a single array was split into scalars.
@pytest.mark.parametrize(
    "operator", [_BLOCK, _BLOCK_DIAGONAL, _STACKED], ids=["block", "diag", "stacked"]
)
@pytest.mark.parametrize(
    "vector,match",
    [
        ((jnp.ones(2),), "tuple of 2 parts.*got a tuple of 1"),
        ((jnp.ones(2), jnp.ones(1), jnp.ones(1)), "tuple of 2 parts.*got a tuple of 3"),
        (jnp.ones(3), "tuple of 2 parts.*got ArrayImpl"),
        ((jnp.ones(2), jnp.ones(4)), r"`vector\[1\]`.*shapes"),
    ],
    ids=["missing", "extra", "array", "wrong_shape"],
)
def test_block_mv_checks_the_parts(operator, vector, match):
    with pytest.raises(ValueError, match=match):
        operator.mv(vector)


def test_block_mv_of_right_parts():
    x = (jnp.array([1.0, -2.0]), jnp.array([0.5]))
    y = _BLOCK.mv(list(x))  # (a list of the parts is a vector too)
    dense = A.at[2, 2].set(0.0)
    assert jnp.allclose(jnp.concatenate(y), dense @ jnp.concatenate(x), rtol=1e-14)
    y = _BLOCK_DIAGONAL.mv(x)
    assert jnp.allclose(y[0], A[:2, :2] @ x[0]) and jnp.allclose(y[1], A[2:, 2:] @ x[1])


def test_kronecker_mv_checks_the_shape():
    kron = lx.KroneckerLinearOperator(_m(A), _m(A.T))
    x = jnp.arange(9.0)
    assert jnp.allclose(kron.mv(x), jnp.kron(A, A.T) @ x, rtol=1e-14)
    # A `(3, 3)` matrix was reshaped to the `(9,)` vector silently.
    for wrong in [x.reshape(3, 3), jnp.ones(7)]:
        with pytest.raises(ValueError, match=r"`vector` has shape .*shape \(9,\)"):
            kron.mv(wrong)


def test_solver_function_for_a_solver():
    # `lx.NormalCG` is a function that builds a solver (as in lineax 0.1.1): passed
    # unbuilt, the message said only "got function". (Called directly, as runtime
    # type checking of `linear_solve` reports it first in the test suite.)
    from lineax._solver.base import check_solver

    with pytest.raises(TypeError, match=r"function `NormalCG`.*lx\.NormalCG\(\.\.\.\)"):
        check_solver(lx.NormalCG, "solver")
    with pytest.raises(TypeError, match=r"got function\.$"):
        check_solver(lx.linear_solve, "solver")


# `IdentityLinearOperator.mv` returned a vector of another shape as it was (square
# identity), or cut or padded it to the output's size (rectangular): a wrong
# product, no error, where lineax 0.1.1 raises. Other dtypes are still cast.
_S3 = jax.ShapeDtypeStruct((3,), jnp.float64)
_S2 = jax.ShapeDtypeStruct((2,), jnp.float64)


@pytest.mark.parametrize("out", [_S3, _S2], ids=["square", "rectangular"])
def test_identity_mv_checks_the_shape(out):
    identity = lx.IdentityLinearOperator(_S3, out)
    for wrong in [jnp.ones(7), jnp.ones((3, 1)), (jnp.ones(3),)]:
        with pytest.raises(ValueError, match=r"`vector` must have the input structure"):
            identity.mv(wrong)
    y = identity.mv(jnp.array([1, 2, 3]))  # an integer vector, cast
    assert y.dtype == jnp.float64
    assert jnp.array_equal(y, jnp.array([1.0, 2.0, 3.0])[: out.shape[0]])
