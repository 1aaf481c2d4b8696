"""What the structure-exploiting solvers share: solving with an inner solver on
flat vectors, merging the result codes of several inner solves, and
`structured_solver`, the rule that [`lineax.AutoLinearSolver`][] asks first.

The contract: a structured solver never differentiates anything itself. It holds
the states of its inner solvers (each derived from a part of the operator), and
its own `transpose`/`conj` map them with the inner solvers' `transpose`/`conj`,
so reverse mode and the pseudoinverse JVP of `linear_solve_p` work through it
as through any other solver.
"""

import functools as ft
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._operator.base import (
    AbstractLinearOperator,
    flatten_vector,
    is_diagonal,
    is_tridiagonal,
    unflatten_vector,
)
from .._solution import RESULTS
from .base import AbstractLinearSolver


def first_failure(*results: RESULTS) -> RESULTS:
    """One result from several: the first that is not `successful` (in argument
    order), else `successful`."""
    out = RESULTS.successful
    for result in reversed(results):
        out = RESULTS.where(result == RESULTS.successful, out, result)
    return out


def worst_result(result: RESULTS) -> RESULTS:
    """Reduce a batched result (from a `vmap` over right-hand sides) to one: the
    largest code, so any failure survives."""
    return jtu.tree_map(lambda code: jnp.max(code), result)


def solve_flat(
    solver: AbstractLinearSolver,
    state: PyTree,
    flat_vector: Array,
    out_structure: PyTree[jax.ShapeDtypeStruct],
    options: dict[str, Any],
) -> tuple[Array, RESULTS]:
    """Solve with an inner operator whose output structure is `out_structure`, for
    a right-hand side given flat; the solution comes back flat."""
    vector = unflatten_vector(flat_vector, out_structure, keep_dtype=True)
    solution, result, _ = solver.compute(state, vector, options)
    return flatten_vector(solution, flat_vector.dtype), result


def solve_columns(
    solver: AbstractLinearSolver,
    state: PyTree,
    columns: Array,
    out_structure: PyTree[jax.ShapeDtypeStruct],
    options: dict[str, Any],
) -> tuple[Array, RESULTS]:
    """Solve for each row of `columns` (shape `(k, out_size)`): one batched inner
    solve. Returns the solutions as rows, shape `(k, in_size)`, and one result."""
    solve = ft.partial(
        solve_flat, solver, state, out_structure=out_structure, options=options
    )
    solutions, results = jax.vmap(solve)(columns)
    return solutions, worst_result(results)


@ft.singledispatch
def structured_solver(operator: Any) -> AbstractLinearSolver | None:
    """The solver that exploits `operator`'s type (a Kronecker product, a low-rank
    update, a block-diagonal operator), for a well-posed square solve; `None` when
    the type promises nothing beyond the tags. Each structured solver registers
    its operator type in its own file."""
    return None


def cheaper_by_tags(operator: AbstractLinearOperator) -> bool:
    """Whether the tag-based rules already give an O(n) solve (diagonal and
    tridiagonal), which no structured solver beats."""
    return is_diagonal(operator) or is_tridiagonal(operator)
