"""Quickstart: a linear solve, a least-squares solve and a gradient through a solve.

Run with `python examples/quickstart.py`.
"""

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import jax.random as jr

import lineax as lx


key_a, key_b, key_c = jr.split(jr.key(0), 3)

# 1. A well-posed square system Ax = b. The default solver is
#    `AutoLinearSolver(well_posed=True)`, which picks LU for a general matrix.
matrix = jr.normal(key_a, (4, 4))
vector = jr.normal(key_b, (4,))
operator = lx.MatrixLinearOperator(matrix)
solution = lx.linear_solve(operator, vector)
print("solution x        :", solution.value)
print("residual |Ax - b| :", jnp.linalg.norm(matrix @ solution.value - vector))
print("result            :", solution.result == lx.RESULTS.successful)

# 2. An overdetermined system: 6 equations, 3 unknowns. QR returns the
#    least-squares solution argmin_x |Ax - b|.
tall = jr.normal(key_c, (6, 3))
rhs = jnp.arange(6.0)
lstsq = lx.linear_solve(lx.MatrixLinearOperator(tall), rhs, solver=lx.QR())
print("least squares x   :", lstsq.value)
print("numpy lstsq x     :", jnp.linalg.lstsq(tall, rhs)[0])


# 3. Gradients flow through the solve, in the matrix and in the vector.
@jax.jit
def loss(matrix, vector):
    x = lx.linear_solve(lx.MatrixLinearOperator(matrix), vector).value
    return jnp.sum(x**2)


grad_matrix, grad_vector = jax.grad(loss, argnums=(0, 1))(matrix, vector)
print("d loss / d b      :", grad_vector)
# For comparison: the same gradient with jnp.linalg.solve.
reference = jax.grad(lambda b: jnp.sum(jnp.linalg.solve(matrix, b) ** 2))(vector)
print("max |difference|  :", jnp.max(jnp.abs(grad_vector - reference)))
