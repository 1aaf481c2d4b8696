"""lineax as most users run it: JAX's default configuration, x64 disabled (the rest
of the suite enables x64 in conftest), with standard dtype promotion. Reviewed:
every solver through `linear_solve`, `jit`, `vmap`, `grad`, `jvp` and `jacfwd`
on float32 operators built from NumPy float64, integer and boolean arrays and
Python scalars; float16/bfloat16 and complex64 inputs; right-hand sides from 0
to 1e30; unreachable tolerances and tiny `max_steps`; the dtypes of values,
stats, states and gradients. Only the defects found have tests here; values are
compared with NumPy in float64."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np

import lineax as lx


def _float32_user():
    """A default JAX user: x64 disabled, standard dtype promotion."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.enable_x64(False))
    stack.enter_context(jax.numpy_dtype_promotion("standard"))
    return stack


def test_a_structure_declared_with_a_numpy_float64_dtype_is_float32():
    # `ShapeDtypeStruct(x.shape, x.dtype)` for a NumPy float64 `x`: the structure
    # kept float64, which no computation produces with x64 disabled, so every
    # Krylov solver rejected a `FunctionLinearOperator` built with it ("input and
    # output structures ... the same"), and `M + IdentityLinearOperator(struct)`
    # failed; the published lineax solves it.
    with _float32_user():
        matrix = np.array([[3.0, 1.0, 0.0], [1.0, 4.0, 1.0], [0.0, 1.0, 5.0]])
        b = np.array([1.0, -2.0, 0.5])
        struct = jax.ShapeDtypeStruct(b.shape, b.dtype)
        operator = lx.FunctionLinearOperator(
            lambda v: jnp.asarray(matrix, jnp.float32) @ v, struct
        )
        assert operator.in_structure().dtype == jnp.float32
        expected = np.linalg.solve(matrix, b)
        for solver in (lx.GMRES(rtol=1e-6, atol=1e-6), lx.LSMR(rtol=1e-6, atol=1e-6)):
            x = lx.linear_solve(operator, b, solver).value
            assert x.dtype == jnp.float32
            np.testing.assert_allclose(x, expected, rtol=1e-5)
        shifted = lx.MatrixLinearOperator(matrix) + lx.IdentityLinearOperator(struct)
        x = lx.linear_solve(shifted, b).value
        np.testing.assert_allclose(x, np.linalg.solve(matrix + np.eye(3), b), rtol=1e-5)
