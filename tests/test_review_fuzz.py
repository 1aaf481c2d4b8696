"""Defects found by a randomised differential fuzzer of values and derivatives
(random operators, arithmetic on them, solvers, dtypes and transforms, against
NumPy float64 and central finite differences). Each test here failed before the
fix it protects. Small sizes.
"""

from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest
from beartype import beartype
from jax.experimental import sparse as jsparse
from jaxtyping import Array, Float, jaxtyped

import lineax as lx


_RNG = np.random.default_rng(20261129)
_TOL: dict[str, Any] = dict(rtol=1e-12, atol=1e-12)


def _banded(n: int) -> np.ndarray:
    # Entries on three diagonals, none stored twice: the operator gets the
    # diagonal layout of `SparseLinearOperator`.
    return (
        np.diag(3.0 + _RNG.random(n))
        + np.diag(_RNG.normal(size=n - 1), 1)
        + np.diag(_RNG.normal(size=n - 1), -1)
    )


_A = _banded(5)
_TALL = np.vstack([_A, _RNG.normal(size=(2, 5))])


@pytest.mark.parametrize(
    "format, matrix",
    [(jsparse.BCOO, _A), (jsparse.BCSR, _TALL), (jsparse.BCOO, _TALL.T)],
    ids=["square-BCOO", "tall-BCSR", "wide-BCOO"],
)
@jaxtyped(typechecker=beartype)
def test_normal_krylov_state_of_a_sparse_operator(
    format: type, matrix: np.ndarray
) -> None:
    # `Normal` of a Krylov solver holds the Gram operator, which transposes the
    # sparse operator. With concrete indices (`init` called eagerly) the
    # transpose is made on the host, with a diagonal layout; the check of the
    # state traced `init` (indices traced: no layout), and refused the state of
    # `solver.init(op, {})` as "does not match".
    solver = lx.Normal(lx.CG(max_steps=40, **_TOL))
    op = lx.SparseLinearOperator(format.fromdense(jnp.asarray(matrix)))
    b: Float[Array, " m"] = jnp.asarray(_RNG.normal(size=matrix.shape[0]))
    state = solver.init(op, {})
    sol = lx.linear_solve(op, b, solver, state=state)
    expected = np.linalg.lstsq(matrix, np.asarray(b), rcond=None)[0]
    np.testing.assert_allclose(np.asarray(sol.value), expected, rtol=1e-9, atol=1e-9)
