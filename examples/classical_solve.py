"""A classical, well-posed linear solve Ax = b, done several ways.

Shows: the default solver, naming a solver explicitly, reusing a factorisation
across right-hand sides (`state=`), batching with `jax.vmap`, `lineax.invert`,
and non-raising solves with `throw=False`.
"""

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import jax.random as jr
import numpy as np

import lineax as lx


key_a, key_b, key_batch = jr.split(jr.key(0), 3)
n = 10
matrix = jr.normal(key_a, (n, n)) + 3 * jnp.eye(n)  # comfortably nonsingular
vector = jr.normal(key_b, (n,))
operator = lx.MatrixLinearOperator(matrix)
reference = np.linalg.solve(np.asarray(matrix), np.asarray(vector))

print(f"Solving a {n}x{n} system; max |x - numpy| for each solver:")
solvers = {
    "AutoLinearSolver(well_posed=True)": lx.AutoLinearSolver(well_posed=True),
    "LU()": lx.LU(),
    "QR()": lx.QR(),
    "SVD()": lx.SVD(),
    "GMRES(rtol=1e-10, atol=1e-10)": lx.GMRES(rtol=1e-10, atol=1e-10),
    "BiCGStab(rtol=1e-10, atol=1e-10)": lx.BiCGStab(rtol=1e-10, atol=1e-10),
}
for name, solver in solvers.items():
    solution = lx.linear_solve(operator, vector, solver)
    error = np.max(np.abs(np.asarray(solution.value) - reference))
    extra = ""
    if "num_steps" in solution.stats:
        extra = f"  ({int(solution.stats['num_steps'])} steps)"
    print(f"  {name:34s} {error:.2e}{extra}")

# Factorise once, then solve for many right-hand sides.
solver = lx.LU()
state = solver.init(operator, {})
rhs_many = jr.normal(key_batch, (5, n))
for i, rhs in enumerate(rhs_many[:2]):
    x = lx.linear_solve(operator, rhs, solver, state=state).value
    residual = jnp.linalg.norm(matrix @ x - rhs)
    print(f"reused LU factorisation, rhs {i}: residual {residual:.2e}")

# Or batch over right-hand sides with vmap (the factorisation is not batched).
solve_one = lambda b: lx.linear_solve(operator, b, solver).value
xs = jax.vmap(solve_one)(rhs_many)
print(
    "vmap over 5 right-hand sides: max residual",
    f"{jnp.max(jnp.abs(xs @ matrix.T - rhs_many)):.2e}",
)

# `invert` gives an operator whose matrix-vector product is a solve.
inverse = lx.invert(operator)
print(
    "invert(A).mv(b) equals solve:", bool(jnp.allclose(inverse.mv(vector), reference))
)

# A singular matrix: LU reports failure instead of returning garbage silently.
singular = lx.MatrixLinearOperator(jnp.array([[1.0, 2.0], [2.0, 4.0]]))
failed = lx.linear_solve(singular, jnp.array([1.0, 1.0]), lx.LU(), throw=False)
print(
    "singular system with throw=False: result == RESULTS.singular is",
    bool(failed.result == lx.RESULTS.singular),
)
print("  its message begins:", lx.RESULTS[failed.result].split(". ")[0] + ".")
