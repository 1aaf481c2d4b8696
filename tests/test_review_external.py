"""Regression tests from an outside review (as a new user, against NumPy and
against lineax 0.1.1 run as an oracle outside the test suite): each case is one
where this package gave a silently wrong result, or a crash deep inside JAX.

Small sizes, one compiled function per test where possible.
"""

from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

import lineax as lx


def assert_close(actual, desired, rtol=1e-10):
    np.testing.assert_allclose(np.asarray(actual), desired, rtol=rtol, atol=rtol)


_A = np.array([[2.0, 1.0], [0.5, 3.0]])
_B = np.array([[1.0, 0.0], [0.3, 1.0]])
_TOL: dict[str, Any] = dict(rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "solver",
    [lx.Normal(lx.Cholesky()), lx.GMRES(**_TOL)],
    ids=["Normal", "GMRES"],
)
def test_real_operator_times_complex_scalar_is_a_complex_operator(solver):
    # `A * 1j` (A real) kept A's real structures while its `mv` returned complex
    # values: `lx.Normal` read "real" from the structures, skipped the conjugate
    # in `Aᴴ A` and returned a wrong answer with `successful`; the Krylov solvers
    # crashed inside `lax` ("dynamic_update_slice requires arguments to have the
    # same dtypes"); a complex right-hand side was refused as "the operator is
    # real". (lineax 0.1.1 dropped the imaginary part.)
    operator = lx.MatrixLinearOperator(jnp.asarray(_A)) * jnp.array(2j)
    complex_operator = lx.MatrixLinearOperator(jnp.asarray(_B, jnp.complex128))
    for op, dense in ((operator, 2j * _A), (operator + complex_operator, 2j * _A + _B)):
        assert op.in_structure().dtype == op.out_structure().dtype == jnp.complex128
        for b in (np.array([1.0, 2.0]), np.array([1.0 - 1j, 2.0])):
            solution = lx.linear_solve(op, jnp.asarray(b), solver)
            assert_close(solution.value, np.linalg.solve(dense, b))


def test_real_operator_plus_complex_scaled_operator_is_complex():
    # `A + B * 1j` (A, B real) solved right with LU under lineax 0.1.1 (whose
    # `B * 1j` kept real structures); once scaled operators had complex
    # structures, the sum was refused as "different input structures". Sums
    # promote dtypes as adding the outputs does; strict dtype promotion, as
    # users may set it, must not break them.
    import jax

    def build(t):
        return lx.MatrixLinearOperator(jnp.asarray(_A)) + lx.MatrixLinearOperator(
            jnp.asarray(_B)
        ) * (t * 1j)

    dense = _A + 1j * _B
    b = np.array([1.0 - 1j, 2.0])
    with jax.numpy_dtype_promotion("strict"):
        operator = build(1.0)
        assert operator.in_structure().dtype == jnp.complex128
        assert_close(operator.as_matrix(), dense)
        for solver in (lx.LU(), lx.GMRES(**_TOL), lx.Normal(lx.Cholesky())):
            solution = lx.linear_solve(operator, jnp.asarray(b), solver)
            assert_close(solution.value, np.linalg.solve(dense, b))
    # The derivative in `t` against the analytic one, -(A + itB)^-1 iB x.
    x = np.linalg.solve(dense, b)
    _, tangent = jax.jvp(
        lambda t: lx.linear_solve(build(t), jnp.asarray(b)).value,
        (jnp.array(1.0),),
        (jnp.array(1.0),),
    )
    assert_close(tangent, -np.linalg.solve(dense, 1j * _B @ x))


def test_an_array_as_preconditioner_is_named_as_an_array():
    # The options reach the check traced, so the message said "got
    # DynamicJaxprTracer" for a plain matrix.
    operator = lx.MatrixLinearOperator(jnp.asarray(_A))
    with pytest.raises(ValueError, match=r"an array of shape \(2, 2\).*MatrixLinear"):
        lx.linear_solve(
            operator, jnp.ones(2), lx.GMRES(**_TOL), options={"preconditioner": _A}
        )
