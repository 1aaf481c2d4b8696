"""Run-time regression tests of derivatives through `linear_solve`, asserted on the
compiled program (which factorisations it makes, and the shapes of its arrays),
never on a wall clock."""

import re

import jax
import jax.numpy as jnp
import numpy as np

import lineax as lx


_N = 40  # above XLA:CPU's 32-entry window, below the 4096-entry sum (`_misc`)
_BATCH = 7


def _compiled(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def _largest_array(hlo: str) -> int:
    shapes = re.findall(r"(?:f32|f64)\[([\d,]+)\]", hlo)
    return max(int(np.prod([int(s) for s in shape.split(",")])) for shape in shapes)


def _factorisations(hlo: str) -> dict[str, int]:
    names = ("getrf", "geqrf", "gesdd", "gesvd", "potrf", "syevd")
    return {
        name: len(re.findall(r'custom_call_target="[^"]*' + name, hlo))
        for name in names
    }


def _matrix(n=_N, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, n)) + np.sqrt(n) * np.eye(n)


def _loss(x):
    return jnp.sum(jnp.sin(x))


def test_vmap_of_gradient_over_vectors_tests_each_solution_once():
    # The tangent and cotangent solves test their solutions' finiteness. A small
    # vector's sum is broadcast to 4096 entries (for XLA:CPU's compile time);
    # under `vmap` that copied each member: a batch x 4096 array (here
    # 7 x 103 x 40) next to the batch x n^2 solve, and jacfwd's tangents alike.
    # No array is now as large as batch x n x n.
    matrix = _matrix()
    vectors = np.random.default_rng(1).normal(size=(_BATCH, _N))

    def solve(m, b):
        return lx.linear_solve(lx.MatrixLinearOperator(m), b, lx.LU()).value

    grad_b = jax.vmap(jax.grad(lambda m, b: _loss(solve(m, b)), 1), (None, 0))
    hlo = _compiled(grad_b, matrix, vectors)
    assert _factorisations(hlo)["getrf"] == 1
    assert _largest_array(hlo) < _BATCH * _N * _N
    expected = jax.vmap(
        jax.grad(lambda m, b: _loss(jnp.linalg.solve(m, b)), 1), (None, 0)
    )(matrix, vectors)
    np.testing.assert_allclose(grad_b(matrix, vectors), expected, rtol=1e-10)

    jacobian = jax.jacfwd(lambda m, b: solve(m, b)[:3], 1)
    hlo = _compiled(jacobian, matrix, vectors[0])
    assert _factorisations(hlo)["getrf"] == 1
    assert _largest_array(hlo) < _N * _N * _N


def test_gradient_of_a_batched_matrix_solve_tests_each_matrix_once():
    # vmap over 40 x 40 matrices: each matrix's finiteness test was broadcast to
    # 4096 entries per member (batch x 2 x 40 x 40), twice the batch of matrices.
    matrices = np.stack([_matrix(seed=s) for s in range(_BATCH)])
    vectors = np.random.default_rng(1).normal(size=(_BATCH, _N))

    def loss(m, b):
        return _loss(lx.linear_solve(lx.MatrixLinearOperator(m), b, lx.LU()).value)

    hlo = _compiled(jax.vmap(jax.grad(loss)), matrices, vectors)
    assert _factorisations(hlo)["getrf"] == 1
    assert _largest_array(hlo) == _BATCH * _N * _N
