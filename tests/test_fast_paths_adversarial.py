"""Adversarial checks of the performance changes of 2026-11-27 (fast operator
construction, cached lowering, closure conversion of callable Modules, Krylov
output-side operator scaling, the inline error branch), each a case where one of
them gave a wrong answer or a worse error than the code before it; and one older
defect met on the way (pickled operators lost their tags)."""

import copy
import pickle

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lineax as lx


_RNG = np.random.default_rng(20261127)
_TALL = _RNG.standard_normal((5, 3))
_B5 = _RNG.standard_normal(5)


def _module_closing_over_its_own_leaf(matrix):
    # The Module's `__call__` reads the traced `matrix` both as its own leaf and
    # through a closure: the closure's reference must be converted, or it escapes
    # the solve's trace.
    class Closing(eqx.Module):
        inner: jax.Array

        def __call__(self, x):
            return self.inner @ x + matrix @ x

    operator = lx.FunctionLinearOperator(
        Closing(matrix),
        jax.ShapeDtypeStruct((3,), matrix.dtype),
        closure_convert=False,
    )
    return lx.linear_solve(operator, jnp.asarray(_B5), lx.LSMR(1e-12, 1e-12)).value


def test_module_closing_over_a_tracer_that_is_also_its_leaf_is_converted():
    # `closure_converted` left a callable Module unconverted where every traced
    # constant it closes over is (by identity) one of its own leaves; one reached
    # through a closure as well then escaped the solve ("No constant handler for
    # type DynamicJaxprTracer" under jit, UnexpectedTracerError under grad/vmap).
    tall = jnp.asarray(_TALL)
    expected = np.linalg.lstsq(2 * _TALL, _B5, rcond=None)[0]
    value = jax.jit(_module_closing_over_its_own_leaf)(tall)
    np.testing.assert_allclose(value, expected, rtol=1e-9, atol=1e-12)

    def loss(matrix):
        return jnp.sum(_module_closing_over_its_own_leaf(matrix))

    def reference(matrix):
        return jnp.sum(jnp.linalg.lstsq(2 * matrix, jnp.asarray(_B5))[0])

    np.testing.assert_allclose(
        jax.grad(loss)(tall), jax.grad(reference)(tall), rtol=1e-7, atol=1e-10
    )


def test_krylov_solves_an_operator_of_tiny_float32_entries():
    # Krylov operator scaling on the output side only (`2^-s (A v)`): for an
    # operator whose entries are ~1e-34 (float32, normal numbers), the products
    # `A v` of the small vectors late in a solve are subnormal, which XLA:CPU
    # flushes to zero: BiCGStab and MINRES stopped on stagnation at 1e-5..1e-2
    # relative error, where scaling the input (`A (2^-s v)`, as before) solved it.
    # (Now the right-hand side is made larger for such an operator, see
    # `_krylov._lift`; MINRES scales the input as well as the output.)
    n = 30
    rng = np.random.default_rng(1)
    base = 4 * np.eye(n) + 0.3 * rng.standard_normal((n, n))
    symmetric = (base + base.T) / 2
    b = rng.standard_normal(n)
    for solver, matrix, tags in [
        (lx.BiCGStab(rtol=1e-5, atol=0.0), base, ()),
        (lx.GMRES(rtol=1e-5, atol=0.0), base, ()),
        (lx.MINRES(rtol=1e-5, atol=0.0), symmetric, lx.symmetric_tag),
    ]:
        for scale in [1e-34, 1e34]:
            operator = lx.MatrixLinearOperator(
                jnp.asarray(scale * matrix, jnp.float32), tags
            )
            sol = lx.linear_solve(
                operator, jnp.asarray(b, jnp.float32), solver, throw=False
            )
            expected = np.linalg.solve(scale * matrix, b)
            error = np.linalg.norm(np.asarray(sol.value, np.float64) - expected)
            assert sol.result == lx.RESULTS.successful, (solver, scale)
            assert error <= 1e-4 * np.linalg.norm(expected), (solver, scale)


def test_unjitted_vmap_of_a_failing_solve_raises_the_equinox_error():
    # The error branch of `throw=True` ran inline whenever its inputs were
    # tracers, to keep nested `jit`s out of the lowering; under an un-jitted
    # `vmap` they are batch tracers of an eager computation, and the failure came
    # out as XLA's `JaxRuntimeError` ("INTERNAL: CpuCallback error ...", a
    # traceback, then the message) instead of Equinox's error with the message.
    singular = jnp.array([[1.0, 2.0], [2.0, 4.0]])
    matrices = jnp.stack([jnp.eye(2), singular])
    vectors = jnp.ones((2, 2))

    def solve(matrix, vector):
        return lx.linear_solve(lx.MatrixLinearOperator(matrix), vector, lx.LU()).value

    with pytest.raises(eqx.EquinoxRuntimeError, match="1 of 2 batch elements"):
        jax.vmap(solve)(matrices, vectors)


def test_pickled_and_deep_copied_operators_keep_their_tags():
    # Tags are singletons compared by identity; pickling or `copy.deepcopy` of an
    # operator (either way it was built) made new tag objects, so the copy was no
    # longer symmetric/positive definite (`lx.Cholesky` then refused it).
    matrix = jnp.asarray([[2.0, 1.0], [1.0, 2.0]])
    tags = (lx.symmetric_tag, lx.positive_semidefinite_tag)
    for operator in [
        lx.MatrixLinearOperator(matrix, tags),
        lx.MatrixLinearOperator(matrix, tags),  # (the cached construction)
    ]:
        for copied in [pickle.loads(pickle.dumps(operator)), copy.deepcopy(operator)]:
            assert copied == operator
            assert lx.is_symmetric(copied) and lx.is_positive_semidefinite(copied)
            value = lx.linear_solve(copied, jnp.ones(2), lx.Cholesky()).value
            np.testing.assert_allclose(value, [1 / 3, 1 / 3], rtol=1e-12)
