"""An adversarial review, as a user, of the preconditioners through the Krylov
solvers, of the structured solvers and operators, and of Jacobian operators.

Every expected value comes from NumPy in float64 (`solve`, `pinv`) or from JAX's
own derivative of the dense NumPy-equivalent expression, never from lineax itself.
Small sizes; the solves converge well within their step limits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import sparse as jsparse
from jaxtyping import Array, Float

import lineax as lx


_RNG = np.random.default_rng(20261127)
_N = 6
_PSD = lx.positive_semidefinite_tag
# A symmetric positive definite tridiagonal matrix with one extra symmetric pair:
# not an M-matrix factor pattern, so ILU(0)/IC(0) are not exact inverses.
_SPARSE = (
    np.diag(4 + _RNG.uniform(size=_N))
    - np.diag(np.ones(_N - 1), 1)
    - np.diag(np.ones(_N - 1), -1)
)
_SPARSE[0, 4] = _SPARSE[4, 0] = 0.7
_B = _RNG.standard_normal(_N)
_PATTERN = jsparse.BCOO.fromdense(_SPARSE)


def _dense_grad(matrix: np.ndarray, rhs: np.ndarray) -> Float[Array, " nse"]:
    """The gradient of `sum(solve(A, b)²)` with respect to the stored values."""
    full = jax.grad(lambda a: jnp.sum(jnp.linalg.solve(a, rhs) ** 2))(matrix)
    return full[_PATTERN.indices[:, 0], _PATTERN.indices[:, 1]]


@pytest.mark.parametrize(
    "make, solver",
    [
        (lx.ILUPreconditioner, lx.GMRES(rtol=1e-12, atol=1e-12)),
        (lx.IncompleteCholeskyPreconditioner, lx.CG(rtol=1e-12, atol=1e-12)),
    ],
    ids=["ilu-gmres", "ic-cg"],
)
def test_incomplete_factorisation_with_a_shift_that_depends_on_the_values(make, solver):
    # A shift scaled to the matrix (`shift = c · max|A|`) is traced wherever the
    # values are: the shifted diagonal was a `scatter_mul`, whose JVP JAX only
    # implements for unique indices, so `jax.grad` raised NotImplementedError
    # (while a constant shift worked).
    def loss(data: Float[Array, " nse"]) -> Float[Array, ""]:
        matrix = jsparse.BCOO((data, _PATTERN.indices), shape=_PATTERN.shape)
        operator = lx.SparseLinearOperator(matrix, _PSD)
        precond = make(operator, shift=1e-3 * jnp.max(jnp.abs(data)))
        options = {"preconditioner": precond}
        solution = lx.linear_solve(operator, _B, solver, options=options)
        return jnp.sum(solution.value**2)

    grad = jax.jit(jax.grad(loss))(_PATTERN.data)
    np.testing.assert_allclose(grad, _dense_grad(_SPARSE, _B), rtol=1e-8, atol=1e-12)

