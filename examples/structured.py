"""Structured operators and tags, and what `AutoLinearSolver` picks for them.

Structure is declared, not detected: `AutoLinearSolver` reads the operator's type
and tags at trace time (it never inspects the values), so a tag is a promise
that you make about your operator.
"""

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import jax.random as jr
import numpy as np
import scipy.linalg

import lineax as lx


key1, key2, key3 = jr.split(jr.key(2), 3)
n = 5
b = jnp.arange(1.0, n + 1)

diag = jnp.array([1.0, 2.0, 4.0, 8.0, 16.0])
lower = jnp.tril(jr.normal(key1, (n, n))) + 3 * jnp.eye(n)
spd_factor = jr.normal(key2, (n, n))
spd = spd_factor @ spd_factor.T + n * jnp.eye(n)
tall = jr.normal(key3, (n + 2, n))

operators = {
    "DiagonalLinearOperator": lx.DiagonalLinearOperator(diag),
    "TridiagonalLinearOperator": lx.TridiagonalLinearOperator(
        jnp.full(n, 4.0), jnp.full(n - 1, -1.0), jnp.full(n - 1, 2.0)
    ),
    "Matrix + lower_triangular_tag": lx.MatrixLinearOperator(
        lower, lx.lower_triangular_tag
    ),
    "Matrix + upper_triangular_tag + unit_diagonal_tag": lx.MatrixLinearOperator(
        jnp.triu(lower, 1) + jnp.eye(n), (lx.upper_triangular_tag, lx.unit_diagonal_tag)
    ),
    "Matrix + positive_semidefinite_tag": lx.MatrixLinearOperator(
        spd, (lx.symmetric_tag, lx.positive_semidefinite_tag)
    ),
    "Matrix + symmetric_tag only": lx.MatrixLinearOperator(spd, lx.symmetric_tag),
    "Matrix, no tags": lx.MatrixLinearOperator(spd),
    "Diagonal matrix, diagonal_tag": lx.MatrixLinearOperator(
        jnp.diag(diag), lx.diagonal_tag
    ),
}

auto = lx.AutoLinearSolver(well_posed=True)
print("AutoLinearSolver(well_posed=True) picks, and max |x - numpy|:")
for name, operator in operators.items():
    picked = auto.select_solver(operator)
    x = lx.linear_solve(operator, b, auto).value
    reference = np.linalg.solve(np.asarray(operator.as_matrix()), np.asarray(b))
    error = np.max(np.abs(x - reference))
    print(f"  {name:50s} -> {type(picked).__name__:12s} {error:.1e}")

print("Non-square or possibly singular problems:")
tall_op = lx.MatrixLinearOperator(tall)
for well_posed in (None, False):
    picked = lx.AutoLinearSolver(well_posed=well_posed).select_solver(tall_op)
    label = f"tall {n + 2}x{n}, well_posed={well_posed}"
    print(f"  {label:36s} -> {type(picked).__name__}")
picked = lx.AutoLinearSolver(well_posed=False).select_solver(
    operators["DiagonalLinearOperator"]
)
print(f"  {'diagonal, well_posed=False':36s} -> {picked!r}")
try:
    auto.select_solver(tall_op)
except ValueError as e:
    label = f"tall {n + 2}x{n}, well_posed=True"
    print(f"  {label:36s} -> ValueError: {str(e).splitlines()[0][:60]}")

# Predicates read tags and operator types, and functions extract structure.
tri = operators["TridiagonalLinearOperator"]
print(
    "is_tridiagonal:",
    lx.is_tridiagonal(tri),
    "| is_symmetric:",
    lx.is_symmetric(tri),
    "| is_diagonal:",
    lx.is_diagonal(operators["DiagonalLinearOperator"]),
)
d, lo, up = lx.tridiagonal(tri)
print("tridiagonal(op) ->", d.tolist(), lo.tolist(), up.tolist())
print(
    "diagonal(lower-triangular op) ->",
    np.round(
        np.asarray(lx.diagonal(operators["Matrix + lower_triangular_tag"])), 3
    ).tolist(),
)

# Transposing an operator transposes its tags: lower becomes upper triangular.
lower_op = operators["Matrix + lower_triangular_tag"]
print(
    "lower.T is upper triangular:",
    lx.is_upper_triangular(lower_op.T),
    "| transpose_tags:",
    sorted(str(t) for t in lx.transpose_tags(frozenset({lx.lower_triangular_tag}))),
)

# The tridiagonal solve agrees with scipy's banded solver.
banded = np.stack(
    [np.r_[0.0, np.asarray(up)], np.asarray(d), np.r_[np.asarray(lo), 0.0]]
)
x_tri = lx.linear_solve(tri, b, lx.Tridiagonal()).value
x_scipy = scipy.linalg.solve_banded((1, 1), banded, np.asarray(b))
error = np.max(np.abs(x_tri - x_scipy))
print(f"Tridiagonal vs scipy.linalg.solve_banded: max diff {error:.1e}")

# A diagonal operator with zeros: Diagonal(well_posed=False) gives the pseudoinverse.
zeros = lx.DiagonalLinearOperator(jnp.array([2.0, 0.0, 4.0]))
x_pinv = lx.linear_solve(
    zeros, jnp.array([1.0, 1.0, 1.0]), lx.Diagonal(well_posed=False)
).value
print("pseudoinverse of diag(2, 0, 4) applied to ones:", x_pinv.tolist())
