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
_PATTERN = jsparse.BCOO.fromdense(jnp.asarray(_SPARSE))


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


#
# Multigrid with a stencil whose coefficient is traced.
#


def _laplacian(u: Float[Array, "n n"], h: float) -> Float[Array, "n n"]:
    padded = jnp.pad(u, 1)
    neighbours = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2]
    return (4 * u - neighbours - padded[1:-1, 2:]) / h**2


_GRID = 7  # coarsened once with `coarsest_size=9`: a real V-cycle
_H = 1 / (_GRID + 1)
_GRID_RHS = _RNG.standard_normal((_GRID, _GRID))


def _grid_laplacian_matrix() -> np.ndarray:
    size = _GRID * _GRID
    basis = np.eye(size).reshape(size, _GRID, _GRID)
    columns = jax.vmap(lambda e: _laplacian(e, _H))(basis).reshape(size, size)
    return np.asarray(columns).T


def _multigrid_solve(coefficient: Float[Array, ""]) -> Float[Array, "n n"]:
    def stencil(u, h):
        return coefficient * _laplacian(u, h)

    struct = jax.ShapeDtypeStruct((_GRID, _GRID), jnp.float64)
    operator = lx.FunctionLinearOperator(lambda u: stencil(u, _H), struct, _PSD)
    precond = lx.MultigridPreconditioner(
        stencil, (_GRID, _GRID), _H, tags=_PSD, coarsest_size=9
    )
    solver = lx.CG(rtol=1e-11, atol=1e-11)
    options = {"preconditioner": precond}
    return lx.linear_solve(operator, _GRID_RHS, solver, options=options).value


def test_multigrid_stencil_with_a_traced_coefficient():
    # A variable coefficient is the common case of a stencil closing over an
    # array; under `jit`/`grad`/`vmap` that array is traced, and the V-cycle, run
    # inside the solve, leaked it: "No constant handler for type
    # DynamicJaxprTracer" (jit), UnexpectedTracerError (grad).
    matrix = _grid_laplacian_matrix()
    x = np.linalg.solve(matrix, _GRID_RHS.reshape(-1)).reshape(_GRID, _GRID)
    np.testing.assert_allclose(jax.jit(_multigrid_solve)(2.0), x / 2, rtol=1e-9)
    # d/dc bᵀA⁻¹b / c = -bᵀA⁻¹b / c² (a definite form: no cancellation in the sum).
    # (`grad` and `vmap` compiled too: op by op they took about 10 s of CPU; they
    # fail the same way there without the fix.)
    grad = jax.jit(jax.grad(lambda c: jnp.sum(_GRID_RHS * _multigrid_solve(c))))(2.0)
    np.testing.assert_allclose(grad, -np.sum(_GRID_RHS * x) / 4, rtol=1e-9)
    batched = jax.jit(jax.vmap(_multigrid_solve))(jnp.array([1.0, 4.0]))
    np.testing.assert_allclose(batched, np.stack([x, x / 4]), rtol=1e-9)


#
# Jacobian operators of functions from real to complex arrays.
#


_W_WIDE = _RNG.standard_normal((2, 3))
_X_REAL = _RNG.standard_normal(3)


def _phase(x: Float[Array, " n"], args: None) -> Array:
    del args
    return jnp.exp(jax.lax.complex(jnp.zeros(2), _W_WIDE @ x))


@pytest.mark.parametrize("jac", [None, "bwd"])
def test_reverse_mode_jacobian_of_real_to_complex_function_keeps_imaginary_part(jac):
    # Reverse mode (jac="bwd", or jac=None for a wide Jacobian) built the matrix
    # from VJPs, which JAX projects onto the real input space: `as_matrix` and
    # `diagonal` silently returned only the real part of the Jacobian, while `mv`
    # was right; `materialise` raised jacrev's "requires real-valued outputs ...
    # pass holomorphic=True" (lineax 0.1.1 raised it from all three).
    y = _W_WIDE @ _X_REAL
    expected = (1j * np.exp(1j * y))[:, None] * _W_WIDE
    operator = lx.JacobianLinearOperator(_phase, _X_REAL, jac=jac)
    np.testing.assert_allclose(operator.as_matrix(), expected, rtol=1e-13)
    np.testing.assert_allclose(lx.materialise(operator).as_matrix(), expected)
    np.testing.assert_allclose(lx.diagonal(operator), np.diagonal(expected))


#
# Behaviour pinned down (passed when written): preconditioners built inside
# `vmap` over the operator's values, and `Normal` with a Gram preconditioner
# under reverse mode.
#


def _spd(seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((_N, _N))
    return a @ a.T + _N * np.eye(_N)


@pytest.mark.parametrize(
    "make, solver",
    [
        # Lanczos (the interval estimate) runs batched under `vmap`.
        (lambda op: lx.ChebyshevPreconditioner(op, 3), lx.PipelinedCG),
        (lambda op: lx.SSORPreconditioner(op, 1.2), lx.FlexibleCG),
    ],
    ids=["chebyshev-pipelined_cg", "ssor-flexible_cg"],
)
def test_preconditioner_built_inside_vmap_of_grad(make, solver):
    matrices = np.stack([_spd(1), _spd(2)])

    def loss(matrix: Float[Array, "n n"]) -> Float[Array, ""]:
        operator = lx.MatrixLinearOperator(matrix, _PSD)
        options = {"preconditioner": make(operator)}
        tight = solver(rtol=1e-12, atol=1e-12)
        value = lx.linear_solve(operator, _B, tight, options=options).value
        return jnp.sum(jnp.sin(value))

    grads = jax.jit(jax.vmap(jax.grad(loss)))(matrices)
    dense = jax.vmap(jax.grad(lambda a: jnp.sum(jnp.sin(jnp.linalg.solve(a, _B)))))(
        matrices
    )
    np.testing.assert_allclose(grads, dense, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("shape", [(7, 4), (4, 7)], ids=["tall", "wide"])
def test_normal_cg_with_a_gram_preconditioner_under_grad(shape):
    # Reverse mode transposes the solve: `Normal` swaps the tall and wide forms
    # and conjugates the inner state, which must keep the Gram preconditioner.
    matrix = _RNG.standard_normal(shape)
    rhs = _RNG.standard_normal(shape[0])

    def solve(a: Float[Array, "m n"]) -> Float[Array, " n"]:
        gram = a.T @ a if shape[0] > shape[1] else a @ a.T
        precond = lx.SSORPreconditioner(lx.MatrixLinearOperator(gram, _PSD))
        solver = lx.Normal(lx.CG(rtol=1e-12, atol=1e-12))
        options = {"preconditioner": precond}
        operator = lx.MatrixLinearOperator(a)
        return lx.linear_solve(operator, rhs, solver, options=options).value

    # (Compiled: op by op, the preconditioner's construction and the pseudoinverse
    # under `grad` cost several seconds of CPU each.)
    value = jax.jit(solve)(matrix)
    np.testing.assert_allclose(value, np.linalg.pinv(matrix) @ rhs, rtol=1e-9)
    grad = jax.jit(jax.grad(lambda a: jnp.sum(jnp.sin(solve(a)))))(matrix)
    dense = jax.jit(jax.grad(lambda a: jnp.sum(jnp.sin(jnp.linalg.pinv(a) @ rhs))))(
        matrix
    )
    np.testing.assert_allclose(grad, dense, rtol=1e-8, atol=1e-12)
