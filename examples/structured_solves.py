"""Structured and sparse operators, each solved by the solver that exploits its
structure, timed against the dense path (LU of the materialised matrix).

`lx.AutoLinearSolver` picks the structured solver from the operator's type at
trace time; the answers agree with the dense ones. Small sizes, so that this
runs in seconds; `benchmarks/structured.py` has the full-size comparison.
"""

import time

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import scipy.sparse

import lineax as lx


def timed(fn, *args):
    """Median wall time of a jitted function (after its compiling call)."""
    jitted = jax.jit(fn)
    out = jax.block_until_ready(jitted(*args))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        times.append(time.perf_counter() - start)
    return out, float(np.median(times))


def dense_solve(matrix, vector):
    return jnp.linalg.solve(matrix, vector)


def report(name, ours, dense):
    (x, t), (x_ref, t_ref) = ours, dense
    error = float(jnp.max(jnp.abs(x - x_ref)) / jnp.max(jnp.abs(x_ref)))
    print(
        f"{name:38s} structured {t * 1e3:8.3f} ms   dense {t_ref * 1e3:8.3f} ms   "
        f"speed-up {t_ref / t:6.1f}x   rel. difference {error:.1e}"
    )
    assert error < 1e-3, error


keys = iter(jr.split(jr.key(0), 12))

# Kronecker product of two 24x24 factors (n = 576).
m = 24
a = jr.normal(next(keys), (m, m)) + 10 * jnp.eye(m)
b = jr.normal(next(keys), (m, m)) + 10 * jnp.eye(m)
rhs = jr.normal(next(keys), (m * m,))


def kronecker(a, b, rhs):
    op = lx.KroneckerLinearOperator(
        lx.MatrixLinearOperator(a), lx.MatrixLinearOperator(b)
    )
    return lx.linear_solve(op, rhs).value


report(
    "Kronecker 24x24 (x) 24x24",
    timed(kronecker, a, b, rhs),
    timed(dense_solve, jnp.kron(a, b), rhs),
)

# Diagonal plus rank 5 (n = 800), by the Woodbury identity.
n, k = 800, 5
d = jr.uniform(next(keys), (n,), minval=1.0, maxval=2.0)
u = jr.normal(next(keys), (n, k)) / n**0.5
c = jr.normal(next(keys), (k, k))
v = jr.normal(next(keys), (k, n)) / n**0.5
rhs = jr.normal(next(keys), (n,))


def woodbury(d, u, c, v, rhs):
    op = lx.LowRankUpdateLinearOperator(lx.DiagonalLinearOperator(d), u, c, v)
    return lx.linear_solve(op, rhs).value


report(
    "diagonal + rank 5, n = 800",
    timed(woodbury, d, u, c, v, rhs),
    timed(dense_solve, jnp.diag(d) + u @ c @ v, rhs),
)

# 20 independent 30x30 blocks.
blocks = jr.normal(next(keys), (20, 30, 30)) + 8 * jnp.eye(30)
rhs = jr.normal(next(keys), (20, 30))


def block_diagonal(blocks, rhs):
    op = lx.BlockDiagonalLinearOperator([lx.MatrixLinearOperator(x) for x in blocks])
    return jnp.concatenate(lx.linear_solve(op, tuple(rhs)).value)


dense_blocks = jax.scipy.linalg.block_diag(*blocks)
report(
    "block diagonal, 20 blocks of 30x30",
    timed(block_diagonal, blocks, rhs),
    timed(dense_solve, dense_blocks, rhs.reshape(-1)),
)

# A sparse 2-D Poisson matrix from SciPy (n = 40^2), by CG, matrix-free.
side = 40
one = scipy.sparse.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(side, side))
eye = scipy.sparse.eye(side)
poisson = (scipy.sparse.kron(one, eye) + scipy.sparse.kron(eye, one)).astype(np.float32)
operator = lx.SparseLinearOperator(poisson, lx.positive_semidefinite_tag)
rhs = jr.normal(next(keys), (side * side,))
# Tolerances suited to float32.
cg = lx.CG(rtol=1e-4, atol=1e-4)


def sparse_cg(operator, rhs):
    return lx.linear_solve(operator, rhs, cg).value


report(
    "sparse Poisson 40^2 (BCSR), CG",
    timed(sparse_cg, operator, rhs),
    timed(dense_solve, jnp.asarray(poisson.toarray()), rhs),
)
