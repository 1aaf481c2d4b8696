"""Regression tests from a review of the memory lineax's compiled solves need, as
XLA reports it (`compiled.memory_analysis()`, deterministic), against the
closest JAX-native call and against what the algorithm needs.

Reviewed, and found in line with JAX (no test here): dense LU, Cholesky, QR and
SVD solves (n = 500-2000, float32 and float64: the same temporary bytes as
`jnp.linalg.solve`, `cho_solve` and `lstsq`, or fewer), their `vmap` over the
operator, the vector or both (batch 200, n = 100), their gradients with respect
to the matrix (QR, Cholesky and SVD, square and tall); Kronecker `mv`, `T.mv`,
`diagonal` and solves (nothing of the size of the product formed);
block-diagonal, tridiagonal, diagonal and Woodbury solves; the Krylov solvers'
residual history (capped, whatever `max_steps`), and their memory under `grad`.
What was found: copies that XLA made of a batched Krylov solve's largest carried
arrays (the GMRES basis, the residual history) on every iteration. What a
guarantee costs is in the review's report.
"""

import jax
import jax.numpy as jnp
import numpy as np

import lineax as lx


def _temp_bytes(fn, *args) -> int:
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    assert analysis is not None
    return analysis.temp_size_in_bytes


def test_gmres_holds_no_extra_copy_of_its_basis():
    # A batched GMRES copied its whole Krylov basis on every step (the write of
    # the new vector was a scatter, read with the old basis by the batched
    # loop's `select`), and its solution copied the basis' first `restart`
    # rows. Measured, in bases of `(restart + 1) n` entries: unbatched 2.34 ->
    # 1.65, per element of a batch of 8: 3.77 -> 2.77.
    n, restart, batch = 256, 16, 8

    def stencil(x):
        return 2.5 * x - jnp.roll(x, 1) - jnp.roll(x, -1)

    structure = jax.ShapeDtypeStruct((n,), jnp.float64)

    def solve(b):
        operator = lx.FunctionLinearOperator(stencil, structure)
        solver = lx.GMRES(rtol=1e-8, atol=1e-8, restart=restart)
        return lx.linear_solve(operator, b, solver, throw=False).value

    basis = (restart + 1) * n * 8
    unbatched = _temp_bytes(solve, structure)
    batched = _temp_bytes(
        jax.vmap(solve), jax.ShapeDtypeStruct((batch, n), jnp.float64)
    )
    assert unbatched < 2 * basis
    assert batched / batch < 3.25 * basis


def test_batched_krylov_holds_one_residual_history():
    # Under `vmap` the history's write at a batched position was a scatter that
    # the batched loop's `select` read with the old history: XLA copied the whole
    # history first, a second one per element (CG, `max_steps=10000`, in
    # histories of 10000 entries: unbatched 1.05, per element of a batch of 8:
    # 2.08 -> 1.08).
    n, batch = 64, 8
    structure = jax.ShapeDtypeStruct((n,), jnp.float64)

    def history(b):
        operator = lx.FunctionLinearOperator(
            lambda x: 2 * x - 0.5 * jnp.roll(x, 1) - 0.5 * jnp.roll(x, -1),
            structure,
            lx.positive_semidefinite_tag,
        )
        solver = lx.CG(rtol=1e-6, atol=1e-6, max_steps=10_000)
        solution = lx.linear_solve(operator, b, solver, throw=False)
        return solution.stats["residual_history"]

    length = jax.eval_shape(history, structure).shape[0]
    assert length == 10_000
    batched = _temp_bytes(
        jax.vmap(history), jax.ShapeDtypeStruct((batch, n), jnp.float64)
    )
    assert batched / batch < 1.5 * length * 8


def test_forward_mode_through_a_batched_krylov_loop():
    # The in-place batched write (`_krylov.update_rows`, a `custom_vmap`) broke
    # `vmap` of `jvp` through a solver's `compute`, as a user-defined solver
    # wrapping GMRES runs it: JAX's JVP of a `custom_vmap` under `vmap` raised
    # "dot_general requires contracting dimensions to have the same shape". The
    # solve is linear in `b`, so its JVP in `b` is the solve of the tangent.
    n = 12
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((n, n)) + 6 * np.eye(n)
    b, t = rng.standard_normal((2, 3, n))
    solver = lx.GMRES(rtol=1e-12, atol=1e-12, restart=5)

    def compute(b):
        operator = lx.MatrixLinearOperator(matrix)
        return solver.compute(solver.init(operator, {}), b, {})[0]

    tangents = jax.vmap(lambda b, t: jax.jvp(compute, (b,), (t,))[1])(b, t)
    np.testing.assert_allclose(tangents, np.linalg.solve(matrix, t.T).T, atol=1e-9)
