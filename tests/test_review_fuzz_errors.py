"""Regression tests from a randomised robustness fuzzer over the public API (a
valid call, then one or two mutations of its arguments), run outside the
repository: each case here had given an internal exception (AttributeError, ...)
where a clear error naming the argument was due, or a wrong answer reported as
successful. Checks are at trace time (`jax.eval_shape`) where the defect was.
"""

import jax
import jax.numpy as jnp
import pytest

import lineax as lx


A = jnp.array([[4.0, 1.0, 0.0], [1.0, 3.0, 1.0], [0.0, 1.0, 2.0]])
B = jnp.array([1.0, -2.0, 0.5])
OP = lx.MatrixLinearOperator(A)  # untagged: no structured solver may take it
_KW = dict(rtol=1e-6, atol=1e-6, max_steps=20)


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
