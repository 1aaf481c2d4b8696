"""Adversarial checks of the performance changes of 2026-11-27 (fast operator
construction, cached lowering, closure conversion of callable Modules, Krylov
output-side operator scaling): each test a case where one of them gave a wrong
answer or an error that the code before it did not."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

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
