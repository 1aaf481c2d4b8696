"""`BlockDiagonal`: solves with a block-diagonal operator block by block."""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

from .._operator.base import AbstractLinearOperator
from .._operator.block_diagonal import BlockDiagonalLinearOperator
from ._structured import (
    cheaper_by_tags,
    first_failure,
    structured_solver,
    worst_result,
)
from .auto import AutoLinearSolver
from .base import AbstractLinearSolver, rank_flags


class BlockDiagonalState(eqx.Module):
    """State of [`lineax.BlockDiagonal`][]. If `stacked`, the blocks were alike
    (one type, shapes and static data) and `states` is the inner solver's state
    for all of them, batched along a leading axis; otherwise it is a tuple with
    one state per block."""

    states: PyTree
    stacked: bool = eqx.field(static=True)


def _stack(blocks: tuple) -> tuple[PyTree, PyTree] | None:
    """`(stacked arrays, shared static part)` if the blocks differ only in the
    values of their arrays, else None."""
    parts = [eqx.partition(block, eqx.is_array) for block in blocks]
    dynamic0, static0 = parts[0]
    shapes0 = [(x.shape, x.dtype) for x in jtu.tree_leaves(dynamic0)]
    for dynamic, static in parts[1:]:
        if jtu.tree_structure(dynamic) != jtu.tree_structure(dynamic0):
            return None
        if [(x.shape, x.dtype) for x in jtu.tree_leaves(dynamic)] != shapes0:
            return None
        if not eqx.tree_equal(static, static0):
            return None
    stacked = jtu.tree_map(lambda *xs: jnp.stack(xs), *(d for d, _ in parts))
    return stacked, static0


def _unstack(tree: PyTree, count: int) -> tuple:
    return tuple(jtu.tree_map(lambda x, i=i: x[i], tree) for i in range(count))


class BlockDiagonal(AbstractLinearSolver[BlockDiagonalState]):
    """Solves with a [`lineax.BlockDiagonalLinearOperator`][] by solving with each
    block separately: the cost is the sum of the blocks' costs.

    When the blocks are alike (one operator type, and the same shapes, dtypes and
    tags), they are stacked and solved by one `vmap`ped solver, so that 100
    blocks of 50×50 cost what `jax.vmap(jnp.linalg.solve)` costs, and compile as
    one block. Otherwise each block is traced separately.

    The solution is the pseudoinverse solution if every block's solver gives
    one, so blocks may be rectangular or rank-deficient when the inner solver
    allows it (e.g. `lx.BlockDiagonal(lx.AutoLinearSolver(well_posed=None))` for
    least squares in each block).

    **Arguments:**

    - `solver`: the solver for every block (default
        `lx.AutoLinearSolver(well_posed=True)`, which picks per block from its
        tags), or a tuple with one solver per block.

    The `options` are passed to every block's solver, so only options that make
    sense for all blocks may be given.
    """

    solver: AbstractLinearSolver | tuple[AbstractLinearSolver, ...] = AutoLinearSolver(
        well_posed=True
    )

    def _solvers(self, count: int) -> tuple[AbstractLinearSolver, ...]:
        if isinstance(self.solver, AbstractLinearSolver):
            return (self.solver,) * count
        if len(self.solver) != count:
            raise ValueError(
                f"`solver` is a tuple of {len(self.solver)} solvers, but the "
                f"operator has {count} blocks: give one solver per block, or one "
                "solver for all."
            )
        return tuple(self.solver)

    def init(
        self, operator: AbstractLinearOperator, options: dict[str, Any]
    ) -> BlockDiagonalState:
        if not isinstance(operator, BlockDiagonalLinearOperator):
            raise ValueError(
                "`lx.BlockDiagonal` solves only a `lx.BlockDiagonalLinearOperator`, "
                f"got {type(operator).__name__}."
            )
        blocks = operator.blocks
        solvers = self._solvers(len(blocks))
        stacked = (
            _stack(blocks) if isinstance(self.solver, AbstractLinearSolver) else None
        )
        if stacked is not None and len(blocks) > 1:
            dynamic, static = stacked
            solver = solvers[0]

            def init_one(dynamic):
                return solver.init(eqx.combine(dynamic, static), options)

            return BlockDiagonalState(eqx.filter_vmap(init_one)(dynamic), True)
        states = tuple(s.init(b, options) for s, b in zip(solvers, blocks))
        return BlockDiagonalState(states, False)

    def compute(self, state: BlockDiagonalState, vector, options):
        count = len(vector)
        solvers = self._solvers(count)
        if state.stacked:
            solver = solvers[0]
            stacked = jtu.tree_map(lambda *xs: jnp.stack(xs), *vector)

            def compute_one(inner_state, b):
                solution, result, _ = solver.compute(inner_state, b, options)
                return solution, result

            solution, result = eqx.filter_vmap(compute_one)(state.states, stacked)
            return _unstack(solution, count), worst_result(result), {}
        solutions, results = [], []
        for solver, inner_state, b in zip(solvers, state.states, vector):
            solution, result, _ = solver.compute(inner_state, b, options)
            solutions.append(solution)
            results.append(result)
        return tuple(solutions), first_failure(*results), {}

    def _map_states(self, state: BlockDiagonalState, method: str, options):
        if state.stacked:
            solver = self._solvers(1)[0]
            fn = lambda s: getattr(solver, method)(s, options)[0]
            return BlockDiagonalState(eqx.filter_vmap(fn)(state.states), True)
        solvers = self._solvers(len(state.states))
        states = tuple(
            getattr(solver, method)(s, options)[0]
            for solver, s in zip(solvers, state.states)
        )
        return BlockDiagonalState(states, False)

    def transpose(self, state: BlockDiagonalState, options):
        return self._map_states(state, "transpose", options), options

    def conj(self, state: BlockDiagonalState, options):
        return self._map_states(state, "conj", options), options

    def allow_dependent_rows(self, operator: AbstractLinearOperator) -> bool:
        return self._rank_flag(operator, 0)

    def allow_dependent_columns(self, operator: AbstractLinearOperator) -> bool:
        return self._rank_flag(operator, 1)

    def _rank_flag(self, operator: AbstractLinearOperator, which: int) -> bool:
        if not isinstance(operator, BlockDiagonalLinearOperator):
            return True  # be safe: the general JVP is valid for any rank
        blocks = operator.blocks
        return any(
            rank_flags(solver, block)[which]
            for solver, block in zip(self._solvers(len(blocks)), blocks)
        )


@structured_solver.register(BlockDiagonalLinearOperator)
def _(operator):
    if cheaper_by_tags(operator):
        return None
    if any(b.in_size() != b.out_size() for b in operator.blocks):
        return None
    return BlockDiagonal()
