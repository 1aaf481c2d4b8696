"""What the structure-exploiting solvers share: solving with an inner solver on
flat vectors, merging the result codes of several inner solves, the refinement
step of the solvers built on block identities, and
`structured_solver`, the rule that [`lineax.AutoLinearSolver`][] asks first.

The contract: a structured solver never differentiates anything itself. It holds
the states of its inner solvers (each derived from a part of the operator), and
its own `transpose`/`conj` map them with the inner solvers' `transpose`/`conj`,
so reverse mode and the pseudoinverse JVP of `linear_solve_p` work through it
as through any other solver.
"""

import abc
import dataclasses
import functools as ft
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PyTree

from .._misc import is_inexact_array
from .._operator.base import (
    AbstractLinearOperator,
    flatten_vector,
    is_diagonal,
    is_tridiagonal,
    unflatten_vector,
)
from .._operator.tagged import TaggedLinearOperator, unwrap_tagged
from .._operator.tangent import TangentLinearOperator
from .._solution import (
    concrete_code,
    concrete_value,
    is_successful,
    RESULTS,
    results_where,
)
from .base import AbstractLinearSolver, check_passed_on, rank_flags


def first_failure(*results: RESULTS) -> RESULTS:
    """One result from several: the first that is not `successful` (in argument
    order), else `successful`. (A concrete code, such as a direct solver's
    constant success, is decided at trace time: see `results_where`.)"""
    out = RESULTS.successful
    for result in reversed(results):
        out = results_where(is_successful(result), out, result)
    return out


def worst_result(result: RESULTS) -> RESULTS:
    """Reduce a batched result (from a `vmap` over right-hand sides) to one: the
    largest code, so any failure survives. An empty batch (a rank-0 update, a
    factor of size 0) is `successful` (code 0)."""
    return jtu.tree_map(_worst_code, result)


def _worst_code(code: Any) -> Any:
    concrete = concrete_value(code)
    if concrete is None:
        return jnp.max(code, initial=0)
    # Reduced in NumPy (see `concrete_value`); Schur's `columns_result` in a
    # state made by an eager `init`.
    return concrete_code(np.asarray(np.max(concrete, initial=0)))


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


def refined(
    solve: Callable[[Array], tuple[Array, RESULTS]],
    operator: AbstractLinearOperator,
    b: Array,
) -> tuple[Array, RESULTS]:
    """`solve(b)` (flat in, flat out, with a result code), then one step of
    fixed-precision iterative refinement: `x + solve(b − M x)`, the residual from
    `operator` (`M`).

    For the solvers built on a block identity (Woodbury's, block elimination),
    which is exact but not backward stable: its terms are as large as the inverse
    of the block it solves with (`A⁻¹ b`, `A⁻¹ U`, `A⁻¹ B`) and cancel down to
    `M⁻¹ b`, so an ill-conditioned `A` loses digits that a well-conditioned `M`
    never had. A refinement step multiplies the error by about `eps·cond(A)`
    (Skeel, "Iterative refinement implies numerical stability for Gaussian
    elimination", Math. Comp. 35, 1980; Higham, "Accuracy and Stability of
    Numerical Algorithms", 2nd ed., section 12.2), for one more solve and one
    product with `M`. The result stays linear in `b` (`2W − W M W` for the solve
    `W`), so the transposed solve is the same step with `Mᵀ`."""
    x, result = solve(b)
    mx = mv_flat(operator, x, operator.in_structure(), b.dtype)
    correction, refine_result = solve(b - mx)
    return x + correction, first_failure(result, refine_result)


def mv_flat(
    operator: AbstractLinearOperator, x: Array, in_structure: PyTree, dtype: Any
) -> Array:
    """`operator.mv` of the flat vector `x` (of `in_structure`), flattened in
    `dtype` (`None`: the output's own)."""
    out = operator.mv(unflatten_vector(x, in_structure, keep_dtype=True))
    return flatten_vector(out, dtype)


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


def reads_whole(solver: AbstractLinearSolver, operator: Any) -> bool:
    """Whether `solver` reads the whole of `operator`: whether its `part_read` of
    a tangent of `operator` is that tangent unchanged. Traced abstractly (with
    `operator`'s own arrays as the tangent), so that nothing of it enters the
    computation being traced."""

    def test(operator):
        # (As a JVP's tangent: arrays where the operator has inexact arrays, `None`
        # elsewhere, e.g. for a closure-converted function's jaxpr.)
        tangent = jtu.tree_map(lambda x: x if is_inexact_array(x) else None, operator)
        tangent = TangentLinearOperator(operator, tangent)
        return solver.part_read(operator, tangent) is tangent

    return eqx.filter_eval_shape(test, operator)


def tangent_parts(
    operator: AbstractLinearOperator, other: AbstractLinearOperator, kind: type
) -> tuple[Any, Any] | None:
    """`(primal, tangent)` of a structured solver's `part_read`: `operator`, and the
    tangent PyTree that `other` differentiates it along, both without their tags,
    if `other` is a [`lineax.TangentLinearOperator`][] of an operator of type
    `kind`; else `None` (the tangent is then taken whole)."""
    if not isinstance(other, TangentLinearOperator):
        return None
    primal = unwrap_tagged(other.primal)
    if not isinstance(primal, kind):
        return None
    return primal, unwrap_tagged(other.tangent)


def solved_parts(operator: AbstractLinearOperator, kind: type) -> Any:
    """For a structured solver's `solved_operator`: `operator` without its tags
    if of type `kind`, else `None`. The operator as solved is then made of its
    parts as their solvers solve them (`inner.solved_operator(part)`): a unit
    triangular block, say, with the unit diagonal that its tangents lack."""
    primal = unwrap_tagged(operator)
    return primal if isinstance(primal, kind) else None


_State = TypeVar("_State")


class AbstractPartwiseSolver(AbstractLinearSolver[_State]):
    """A solver of a structured operator that solves it part by part (blocks,
    factors), each part with an inner solver (`solver_parts`). Its rank flags are
    those of some part: with a pseudoinverse inner solver (e.g. `lx.SVD()`) a
    singular part makes the whole a pseudoinverse of a rank-deficient operator,
    whose derivative needs the general JVP. (Its `part_read` asks the same
    parts' solvers what they read.)"""

    # The class of operator it solves.
    kind: ClassVar[type]

    @abc.abstractmethod
    def solver_parts(
        self, operator: Any
    ) -> Iterable[tuple[AbstractLinearSolver, AbstractLinearOperator]]:
        """Each (inner solver, part) of `operator`, an operator of class
        `kind`."""

    def allow_dependent_rows(self, operator: AbstractLinearOperator) -> bool:
        return self._rank_flag(operator, 0)

    def allow_dependent_columns(self, operator: AbstractLinearOperator) -> bool:
        return self._rank_flag(operator, 1)

    def _rank_flag(self, operator: AbstractLinearOperator, which: int) -> bool:
        operator = unwrap_tagged(operator)
        if not isinstance(operator, self.kind):
            return True  # be safe: the general JVP is valid for any rank
        parts = self.solver_parts(operator)
        return any(rank_flags(solver, part)[which] for solver, part in parts)


def part_options(
    solvers: tuple[AbstractLinearSolver, ...], options: dict[str, Any], who: str
) -> dict[str, Any]:
    """The `options` passed on to the solvers of the parts (factors, blocks) of a
    structured operator `who` solves with.

    `y0` and `preconditioner` are of the whole operator, with its structure, not
    a part's: passed on, they failed the part's check with a message about
    structures the user never wrote. An initial guess is only a hint, which a
    direct solver ignores too: `y0` is dropped (`lx.BlockDiagonal` passes each
    block its own entry instead). A `preconditioner` is dropped too where the
    parts' solvers would not read it (direct solvers), and is an error where they
    would, rather than solving unpreconditioned behind the user's back.
    """
    check_passed_on(solvers, options, who)
    options = {k: v for k, v in options.items() if k != "y0"}
    if "preconditioner" in options:
        keys = [solver.option_keys for solver in solvers]
        if any(k is not None and "preconditioner" in k for k in keys):
            raise ValueError(
                f"`lx.{who}` solves with the parts of the operator (its factors or "
                "blocks) separately, so the `preconditioner` option, an approximate "
                "inverse of the whole operator, cannot be used by their solvers. "
                "Drop it, or solve the whole operator with a Krylov solver instead."
            )
        if all(k is not None for k in keys):
            # (A solver that does not declare its keys gets it, as it did.)
            del options["preconditioner"]
    return options


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


@structured_solver.register(TaggedLinearOperator)
def _(operator):
    # The tags may make a cheaper rule apply (e.g. a diagonal tag); otherwise the
    # wrapped operator's structure decides.
    if cheaper_by_tags(operator):
        return None
    return structured_solver(operator.operator)


def solves_to_a_tolerance(solver: Any) -> bool:
    """Whether `solver`, or one inside it (`Normal`'s, `BlockDiagonal`'s, another
    `Woodbury`'s), is iterative: stops at a tolerance `rtol`. Its refined solution
    has the backward error it was asked for, not rounding's: `CG(rtol=1e-3,
    atol=1e-3)` as the inner solver of a well-conditioned float64 `M` (30x30,
    rank 3) solved it to 4e-4, above `_no_digits`' 1e-4, and was called
    singular."""
    if hasattr(solver, "rtol"):
        return True
    if isinstance(solver, eqx.Module):
        parts = [
            getattr(solver, field.name, None) for field in dataclasses.fields(solver)
        ]
    elif isinstance(solver, (tuple, list)):
        parts = solver
    else:
        return False
    return any(solves_to_a_tolerance(part) for part in parts)
