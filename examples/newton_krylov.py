"""Newton–Krylov for a nonlinear reaction–diffusion problem on a 2-D grid.

    -Δu + κ(x) (u + u³) = f   on the unit square,   u = 0 on the boundary,

on a 48 × 48 grid of interior points, where the reaction coefficient κ varies
over four orders of magnitude from cell to cell (a heterogeneous medium). Each
Newton step solves `J δ = -F(u)` with GMRES, where the Jacobian

    J = -Δ + diag(κ (1 + 3u²))

is never formed: `lx.JacobianLinearOperator` applies it through JVPs. Its
diagonal is known in closed form, so a Jacobi preconditioner costs nothing to
build, and since the reaction term dominates the diagonal in most cells, it cuts
GMRES's steps severalfold.

1. A Newton loop written with lineax directly, with and without the Jacobi
   preconditioner, printing the residual and the GMRES steps of each Newton step.
2. The same problem through Optimistix (`optx.root_find` with `optx.Newton` and a
   GMRES linear solver). Optimistix 0.1.0's Newton calls `lx.linear_solve`
   without `options`, so it cannot pass a preconditioner: this one runs
   unpreconditioned, and gives the same solution.
"""

import functools as ft
import time

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import numpy as np
import optimistix as optx

import lineax as lx


n = 48
h = 1.0 / (n + 1)
x = jnp.linspace(h, 1 - h, n)
xx, yy = jnp.meshgrid(x, x, indexing="ij")
kappa = jnp.asarray(10.0 ** np.random.default_rng(0).uniform(1, 5, size=(n, n)))
f = 1e3 * jnp.sin(jnp.pi * xx) * jnp.sin(2 * jnp.pi * yy)


def neg_laplacian(u):
    padded = jnp.pad(u, 1)
    neighbours = (
        padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    )
    return (4 * u - neighbours) / h**2


def residual(u, args):
    kappa, f = args
    return neg_laplacian(u) + kappa * (u + u**3) - f


def norm(v):
    return float(jnp.max(jnp.abs(v)))


# --- 1. Newton's method with lineax -------------------------------------------
gmres = lx.GMRES(rtol=1e-8, atol=1e-8, restart=30, max_steps=20_000)


@ft.partial(jax.jit, static_argnums=1)
def newton_step(u, precondition):
    args = (kappa, f)
    jacobian = lx.JacobianLinearOperator(residual, u, args)
    fx = residual(u, args)
    if precondition:
        # diag(J) = 4/h² + κ(1 + 3u²), in closed form; Jacobi inverts it.
        diagonal = 4 / h**2 + kappa * (1 + 3 * u**2)
        precond = lx.JacobiPreconditioner(lx.DiagonalLinearOperator(diagonal))
        options = {"preconditioner": precond}
    else:
        options = {}
    sol = lx.linear_solve(jacobian, fx, gmres, options=options, throw=False)
    return u - sol.value, sol.stats["num_steps"], sol.result == lx.RESULTS.successful


solutions = {}
for precondition in (False, True):
    label = "Jacobi-preconditioned GMRES" if precondition else "plain GMRES"
    print(f"Newton with {label}:")
    u = jnp.zeros((n, n))
    start = time.perf_counter()
    k, total = 0, 0
    res = norm(residual(u, (kappa, f)))
    while res > 1e-8 * norm(f) and k < 20:
        u, steps, ok = newton_step(u, precondition)
        total += int(steps)
        print(f"  step {k}: max |F(u)| = {res:.3e}, GMRES steps {int(steps)}, ok={ok}")
        res = norm(residual(u, (kappa, f)))
        k += 1
    print(
        f"  converged after {k} Newton steps, {total} GMRES steps in all, "
        f"max |F(u)| = {res:.2e} ({time.perf_counter() - start:.1f} s with compile)"
    )
    assert res <= 1e-8 * norm(f), res
    solutions[precondition] = u

# --- 2. The same through Optimistix (no preconditioner) ------------------------
# Newton stops when both the step and the residual are small against
# `atol + rtol·|·|` elementwise: `atol` is in the units of F (here ~1e3).
solver = optx.Newton(
    rtol=1e-8,
    atol=1e-6,
    linear_solver=lx.GMRES(rtol=1e-8, atol=1e-8, restart=30, max_steps=20_000),
)
start = time.perf_counter()
sol = optx.root_find(
    residual, solver, jnp.zeros((n, n)), args=(kappa, f), max_steps=50, throw=False
)
res = norm(residual(sol.value, (kappa, f)))
print(
    f"optx.root_find with optx.Newton + GMRES: {int(sol.stats['num_steps'])} Newton "
    f"steps, result ok={sol.result == optx.RESULTS.successful}, max |F(u)| = "
    f"{res:.2e} ({time.perf_counter() - start:.1f} s with compile)"
)
assert sol.result == optx.RESULTS.successful
assert res <= 1e-6 * norm(f), res
difference = norm(sol.value - solutions[True]) / norm(solutions[True])
print(f"relative difference, Optimistix vs lineax solution: {difference:.1e}")
assert difference < 1e-6
