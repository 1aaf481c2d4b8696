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


def _compile(fn, *args) -> jax.stages.Compiled:
    # (The values are checked by running this same executable: evaluated op by
    # op, or jitted anew, each check compiled the program again.)
    return jax.jit(fn).lower(*args).compile()


def _compiled(fn, *args) -> str:
    text = _compile(fn, *args).as_text()
    assert text is not None
    return text


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
    compiled = _compile(grad_b, matrix, vectors)
    hlo = compiled.as_text()
    assert hlo is not None
    assert _factorisations(hlo)["getrf"] == 1
    assert _largest_array(hlo) < _BATCH * _N * _N
    expected = jax.jit(
        jax.vmap(jax.grad(lambda m, b: _loss(jnp.linalg.solve(m, b)), 1), (None, 0))
    )(matrix, vectors)
    np.testing.assert_allclose(compiled(matrix, vectors), expected, rtol=1e-10)

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


def _cg_solve(diagonal, vector, max_steps=50):
    # A cheap operator (O(n) products): its solves cost O(batch n) a step, so a
    # carried statistic of batch x max_steps entries can dominate them.
    off = -np.ones(diagonal.shape[0] - 1)
    operator = lx.TaggedLinearOperator(
        lx.TridiagonalLinearOperator(diagonal, off, off), lx.positive_semidefinite_tag
    )
    solver = lx.CG(rtol=1e-10, atol=1e-10, max_steps=max_steps)
    return lx.linear_solve(operator, vector, solver)


def test_batched_krylov_derivative_solves_carry_no_residual_history():
    # Under `vmap` the solves are Equinox's batched primitive, which the
    # statistics' dead-code elimination did not know: every batched solve --
    # the tangent and cotangent solves of `vmap(jax.grad(...))`, whose
    # statistics nothing can read, included -- carried CG's residual history
    # (batch x max_steps) through its loops, selected whole at every step (5.6x
    # the time of `vmap(jax.grad(...))` of 300 CG solves, n = 1000). None of it
    # is in the program now.
    n, batch, max_steps = 8, 3, 50
    diagonal = np.full(n, 2.5)
    vectors = np.random.default_rng(2).normal(size=(batch, n))

    def loss(d, b):
        return _loss(_cg_solve(d, b, max_steps).value)

    compiled = [
        _compile(fn, diagonal, vectors)
        for fn in (
            jax.vmap(jax.grad(loss, 1), (None, 0)),
            jax.grad(lambda d, bs: jnp.sum(jax.vmap(lambda b: loss(d, b))(bs))),
            jax.vmap(lambda d, b: _cg_solve(d, b, max_steps).value, (None, 0)),
        )
    ]
    for program in compiled:
        hlo = program.as_text()
        assert hlo is not None
        assert re.search(rf"f64\[{batch},{max_steps}\]", hlo) is None
        assert re.search(rf"f64\[{max_steps}\]", hlo) is None

    # Where the statistics are read, they are computed, batched or not.
    def stats(d, b):
        return _cg_solve(d, b, max_steps).stats["residual_history"]

    batched = jax.jit(jax.vmap(stats, (None, 0)))(diagonal, vectors)
    single = jax.jit(stats)(diagonal, vectors[1])
    # (Entries at the float64 floor, 1e-17 of the first, round as the batched
    # and single programs are fused: compared within the floor.)
    floor = 64 * np.finfo(np.float64).eps * float(single[0])
    np.testing.assert_allclose(batched[1], single, rtol=1e-12, atol=floor)
    assert np.isfinite(single[0])
    grads = compiled[0](diagonal, vectors)
    matrix = np.diag(diagonal) - np.eye(n, k=1) - np.eye(n, k=-1)
    expected = jax.jit(
        jax.vmap(jax.grad(lambda b: _loss(jnp.linalg.solve(matrix, b))))
    )(vectors)
    np.testing.assert_allclose(grads, expected, rtol=1e-7)


def test_batched_diagonal_solve_does_not_copy_the_diagonal_to_the_batch():
    # The primal solve tests the operator's arrays with its solution. Under
    # `vmap` over right-hand sides, a diagonal (of the solution's shape) was
    # stacked with the batched solution: a batch x 2 x n copy (6x the time of
    # the solve, CPU), in every derivative of the batched solves too.
    n, batch = 50, 7
    diagonal = np.linspace(1.0, 2.0, n)
    vectors = np.random.default_rng(3).normal(size=(batch, n))

    def loss(d, b):
        solution = lx.linear_solve(lx.DiagonalLinearOperator(d), b, lx.Diagonal())
        return _loss(solution.value)

    compiled = [
        _compile(fn, diagonal, vectors)
        for fn in (
            jax.vmap(jax.grad(loss, 1), (None, 0)),
            jax.grad(lambda d, bs: jnp.sum(jax.vmap(lambda b: loss(d, b))(bs))),
        )
    ]
    for program in compiled:
        hlo = program.as_text()
        assert hlo is not None
        assert _largest_array(hlo) == batch * n
    grads = compiled[0](diagonal, vectors)
    np.testing.assert_allclose(grads, np.cos(vectors / diagonal) / diagonal)
