"""Complex-valued linear solves, least squares and gradients.

Operators and vectors may be complex. Transposition in lineax is the plain
transpose (not the conjugate transpose): use `lx.conj` where you need A^H.
"""

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import jax.random as jr
import numpy as np

import lineax as lx


def crandn(key, shape):
    kr, ki = jr.split(key)
    return jr.normal(kr, shape) + 1j * jr.normal(ki, shape)


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


k1, k2, k3, k4 = jr.split(jr.key(3), 4)
n = 6
matrix = crandn(k1, (n, n))
vector = crandn(k2, (n,))
operator = lx.MatrixLinearOperator(matrix)
print("dtype of the solution:", lx.linear_solve(operator, vector).value.dtype)

reference = np.linalg.solve(np.asarray(matrix), np.asarray(vector))
for name, solver in [
    ("LU", lx.LU()),
    ("QR", lx.QR()),
    ("SVD", lx.SVD()),
    ("GMRES", lx.GMRES(rtol=1e-12, atol=1e-12)),
]:
    x = lx.linear_solve(operator, vector, solver).value
    print(f"  {name:6s} max |x - numpy| = {max_diff(x, reference):.1e}")

# Hermitian positive definite: Cholesky and CG apply (tag it positive semidefinite).
hpd = matrix @ matrix.conj().T + n * jnp.eye(n)
hpd_op = lx.MatrixLinearOperator(hpd, lx.positive_semidefinite_tag)
ref_hpd = np.linalg.solve(np.asarray(hpd), np.asarray(vector))
for name, solver in [
    ("Cholesky", lx.Cholesky()),
    ("CG", lx.CG(rtol=1e-12, atol=1e-12)),
]:
    x = lx.linear_solve(hpd_op, vector, solver).value
    error = max_diff(x, ref_hpd)
    print(f"  {name:8s} on a Hermitian positive definite matrix: {error:.1e}")

# Complex least squares.
tall = crandn(k3, (2 * n, n))
rhs = crandn(k4, (2 * n,))
x = lx.linear_solve(lx.MatrixLinearOperator(tall), rhs, lx.QR()).value
x_np = np.linalg.lstsq(np.asarray(tall), np.asarray(rhs), rcond=None)[0]
print(f"complex least squares vs numpy lstsq: {max_diff(x, x_np):.1e}")

# conj(A) is the operator with conjugated entries.
print(
    "conj(A).as_matrix() == A.conj():",
    bool(jnp.allclose(lx.conj(operator).as_matrix(), matrix.conj())),
)


# Gradients of a real loss with respect to complex inputs, against jnp.linalg.solve.
def loss_lineax(m, v):
    return jnp.sum(jnp.abs(lx.linear_solve(lx.MatrixLinearOperator(m), v).value) ** 2)


def loss_jnp(m, v):
    return jnp.sum(jnp.abs(jnp.linalg.solve(m, v)) ** 2)


g = jax.grad(loss_lineax, argnums=(0, 1))(matrix, vector)
r = jax.grad(loss_jnp, argnums=(0, 1))(matrix, vector)
print(
    f"gradient vs jnp.linalg.solve: dA {max_diff(g[0], r[0]):.1e},",
    f"db {max_diff(g[1], r[1]):.1e}",
)
