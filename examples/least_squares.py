"""Least squares and minimum-norm solutions, and their gradients.

`linear_solve` always returns the pseudoinverse solution x = A⁺b:
  * tall A (more equations than unknowns): the least-squares solution;
  * wide A (fewer equations than unknowns): the minimum-norm solution;
  * rank-deficient A: both at once (needs SVD, or AutoLinearSolver(well_posed=False)).
Gradients through these solves are compared with `jnp.linalg.lstsq` / `pinv`.
"""

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import jax.random as jr

import lineax as lx


def max_diff(a, b):
    return float(jnp.max(jnp.abs(a - b)))


key_tall, key_wide, key_b, key_u, key_v = jr.split(jr.key(1), 5)

# --- Overdetermined: 8 equations, 3 unknowns -------------------------------
tall = jr.normal(key_tall, (8, 3))
b = jr.normal(key_b, (8,))
reference = jnp.linalg.lstsq(tall, b)[0]
print("Overdetermined 8x3, max |x - jnp.linalg.lstsq|:")
for name, solver in [
    ("QR()", lx.QR()),
    ("SVD()", lx.SVD()),
    ("LSMR(rtol=1e-12, atol=1e-12)", lx.LSMR(rtol=1e-12, atol=1e-12)),
    ("AutoLinearSolver(well_posed=None)", lx.AutoLinearSolver(well_posed=None)),
]:
    x = lx.linear_solve(lx.MatrixLinearOperator(tall), b, solver).value
    print(f"  {name:36s} {max_diff(x, reference):.1e}")

# --- Underdetermined: 3 equations, 8 unknowns -> minimum-norm solution -----
wide = tall.T
c = b[:3]
x_wide = lx.linear_solve(lx.MatrixLinearOperator(wide), c, lx.QR()).value
print(
    "Underdetermined 3x8: |Ax - b| =",
    f"{jnp.linalg.norm(wide @ x_wide - c):.1e};",
    "max |x - pinv(A) b| =",
    f"{max_diff(x_wide, jnp.linalg.pinv(wide) @ c):.1e}",
)

# --- Rank deficient: a 6x5 matrix of rank 2 ---------------------------------
low_rank = jr.normal(key_u, (6, 2)) @ jr.normal(key_v, (2, 5))
d = jnp.arange(6.0)
x_rd = lx.linear_solve(lx.MatrixLinearOperator(low_rank), d, lx.SVD()).value
print(
    "Rank-deficient 6x5 (rank 2) with SVD: max |x - pinv(A) b| =",
    f"{max_diff(x_rd, jnp.linalg.pinv(low_rank) @ d):.1e}",
)


# --- Gradients ---------------------------------------------------------------
def loss_lineax(matrix, vector, solver):
    x = lx.linear_solve(lx.MatrixLinearOperator(matrix), vector, solver).value
    return jnp.sum(jnp.sin(x))


def loss_lstsq(matrix, vector):
    return jnp.sum(jnp.sin(jnp.linalg.lstsq(matrix, vector)[0]))


def loss_pinv(matrix, vector):
    return jnp.sum(jnp.sin(jnp.linalg.pinv(matrix) @ vector))


grad = jax.jit(jax.grad(loss_lineax, argnums=(0, 1)), static_argnums=2)
ref_grad = jax.jit(jax.grad(loss_lstsq, argnums=(0, 1)))
pinv_grad = jax.jit(jax.grad(loss_pinv, argnums=(0, 1)))

gA, gb = grad(tall, b, lx.QR())
rA, rb = ref_grad(tall, b)
print(
    "Gradient through least squares (QR) vs jnp.linalg.lstsq:",
    f"dA {max_diff(gA, rA):.1e}, db {max_diff(gb, rb):.1e}",
)

gA, gb = grad(wide, c, lx.QR())
rA, rb = pinv_grad(wide, c)
print(
    "Gradient through minimum norm (QR) vs pinv:",
    f"dA {max_diff(gA, rA):.1e}, db {max_diff(gb, rb):.1e}",
)

gA, gb = grad(low_rank, d, lx.SVD())
rA, rb = pinv_grad(low_rank, d)
print(
    "Gradient through rank-deficient solve (SVD) vs pinv:",
    f"dA {max_diff(gA, rA):.1e}, db {max_diff(gb, rb):.1e}",
)

# Forward mode works too: a JVP in the matrix direction.
tangent = jnp.ones_like(tall)


@jax.jit
def jvps(m, t):
    _, jvp_lx = jax.jvp(lambda m: loss_lineax(m, b, lx.QR()), (m,), (t,))
    _, jvp_np = jax.jvp(lambda m: loss_lstsq(m, b), (m,), (t,))
    return jvp_lx, jvp_np


jvp_lx, jvp_np = jvps(tall, tangent)
print(
    f"JVP through least squares: lineax {float(jvp_lx):.6f},",
    f"jnp.linalg.lstsq {float(jvp_np):.6f}",
)
