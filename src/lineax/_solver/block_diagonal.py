"""`BlockDiagonal`: solves with a block-diagonal operator block by block."""

from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

from .._misc import describe
from .._operator.base import AbstractLinearOperator
from .._operator.block_diagonal import (
    BlockDiagonalLinearOperator,
    square_blocks,
    stack_vectors,
    unstack_vectors,
)
from .._operator.tagged import unwrap_tagged
from .._operator.tangent import TangentLinearOperator
from ._structured import (
    AbstractPartwiseSolver,
    cheaper_by_tags,
    first_failure,
    part_options,
    reads_whole,
    solved_parts,
    structured_solver,
    tangent_parts,
    worst_result,
)
from .auto import AutoLinearSolver
from .base import AbstractLinearSolver, check_solver


def _structure_of(tree: PyTree) -> PyTree[jax.ShapeDtypeStruct]:
    return jtu.tree_map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), tree
    )


class BlockDiagonalState(eqx.Module):
    """State of [`lineax.BlockDiagonal`][]. If `stacked`, the operator stored its
    blocks stacked (they are alike) and `states` is the inner solver's state for
    all of them, batched along a leading axis; otherwise it is a tuple with one
    state per block."""

    states: PyTree
    stacked: bool = eqx.field(static=True)


class BlockDiagonal(AbstractPartwiseSolver[BlockDiagonalState]):
    """Solves with a [`lineax.BlockDiagonalLinearOperator`][] by solving with each
    block separately: the cost is the sum of the blocks' costs.

    When the blocks are alike (one operator type, and the same shapes, dtypes and
    tags), the operator stores them stacked and they are solved by one `vmap`ped
    solver, so that 100 blocks of 50×50 cost what `jax.vmap(jnp.linalg.solve)`
    costs, and the program's size does not grow with the number of blocks.
    Otherwise each block is traced separately.

    The solution is the pseudoinverse solution if every block's solver gives
    one, so blocks may be rectangular or rank-deficient when the inner solver
    allows it (e.g. `lx.BlockDiagonal(lx.AutoLinearSolver(well_posed=None))` for
    least squares in each block).

    **Arguments:**

    - `solver`: the solver for every block (default
        `lx.AutoLinearSolver(well_posed=True)`, which picks per block from its
        tags), or a tuple with one solver per block (which solves block by block,
        even for alike blocks).

    The `options` are passed to every block's solver, so only options that make
    sense for all blocks may be given; `y0` is a tuple with one initial guess per
    block, each passed to its block's solver (`None` for a block without one). A
    `preconditioner` (of the whole operator, not of a block) is ignored by direct
    block solvers and an error for iterative ones.
    """

    solver: AbstractLinearSolver | tuple[AbstractLinearSolver, ...] = AutoLinearSolver(
        well_posed=True
    )

    option_keys = frozenset()  # `options` are passed on to the inner solver(s)
    kind: ClassVar[type] = BlockDiagonalLinearOperator

    def __check_init__(self):
        if isinstance(self.solver, (tuple, list)):
            for i, solver in enumerate(self.solver):
                check_solver(solver, f"solver[{i}]")
        else:
            check_solver(self.solver, "solver")

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
        operator = unwrap_tagged(operator)
        if not isinstance(operator, BlockDiagonalLinearOperator):
            raise ValueError(
                "`lx.BlockDiagonal` solves only a `lx.BlockDiagonalLinearOperator`, "
                f"got {type(operator).__name__}."
            )
        stacked = operator.stacked
        solvers = (
            (self.solver,)
            if isinstance(self.solver, AbstractLinearSolver)
            else self.solver
        )
        options = part_options(solvers, options, "BlockDiagonal")
        if stacked is not None and isinstance(self.solver, AbstractLinearSolver):
            solver = self.solver
            init = eqx.filter_vmap(lambda block: solver.init(block, options))
            return BlockDiagonalState(init(stacked), True)
        blocks = operator.blocks
        solvers = self._solvers(len(blocks))
        states = tuple(s.init(b, options) for s, b in zip(solvers, blocks))
        return BlockDiagonalState(states, False)

    def compute(self, state: BlockDiagonalState, vector, options):
        count = len(vector)
        # Each block gets its own entry of `y0` (a tuple, one per block).
        y0 = options.get("y0", None)
        if y0 is not None and not (isinstance(y0, tuple) and len(y0) == count):
            raise ValueError(
                "The `y0` option of `lx.BlockDiagonal` must be a tuple with one "
                f"initial guess per block ({count}), as the solution is; got "
                + (
                    f"a tuple of length {len(y0)}."
                    if isinstance(y0, tuple)
                    else f"{describe(_structure_of(y0))}."
                )
            )
        if state.stacked:
            solver = self._solvers(1)[0]
            options = part_options((solver,), options, "BlockDiagonal")

            def compute_one(inner_state, b, guess):
                inner = options if guess is None else {**options, "y0": guess}
                solution, result, _ = solver.compute(inner_state, b, inner)
                return solution, result

            if y0 is not None and any(guess is None for guess in y0):
                # Blocks without a guess (`None`, as the unstacked path accepts)
                # start from zero, as they would without `y0`; the blocks are
                # alike, so any given guess has their structure.
                given = [guess for guess in y0 if guess is not None]
                y0 = (
                    None
                    if not given
                    else tuple(
                        jtu.tree_map(jnp.zeros_like, given[0])
                        if guess is None
                        else guess
                        for guess in y0
                    )
                )
            guesses = None if y0 is None else stack_vectors(y0)
            solution, result = eqx.filter_vmap(compute_one)(
                state.states, stack_vectors(vector), guesses
            )
            return unstack_vectors(solution, count), worst_result(result), {}
        solvers = self._solvers(count)
        options = part_options(solvers, options, "BlockDiagonal")
        guesses = (None,) * count if y0 is None else y0
        solutions, results = [], []
        for solver, inner_state, b, guess in zip(
            solvers, state.states, vector, guesses
        ):
            inner = options if guess is None else {**options, "y0": guess}
            solution, result, _ = solver.compute(inner_state, b, inner)
            solutions.append(solution)
            results.append(result)
        return tuple(solutions), first_failure(*results), {}

    def _map_states(self, state: BlockDiagonalState, method: str, options):
        count = 1 if state.stacked else len(state.states)
        options = part_options(self._solvers(count), options, "BlockDiagonal")
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
        # (`y0`, a guess for this solve, is not one for the transposed solve.)
        new = {k: v for k, v in options.items() if k != "y0"}
        return self._map_states(state, "transpose", options), new

    def conj(self, state: BlockDiagonalState, options):
        new = {k: v for k, v in options.items() if k != "y0"}
        return self._map_states(state, "conj", options), new

    def part_read(self, operator, other):
        # Each block's solver reads its part of the block (e.g. the diagonal for
        # `lx.Diagonal`): the tangent of each block is cut down by that solver.
        parts = tangent_parts(operator, other, self.kind)
        if parts is None:
            return other
        primal, tangent = parts
        pairs = self.solver_parts(primal)
        if all(reads_whole(solver, block) for solver, block in pairs):
            return other
        blocks = primal.blocks
        return BlockDiagonalLinearOperator(
            [
                solver.part_read(block, TangentLinearOperator(block, t_block))
                for solver, block, t_block in zip(
                    self._solvers(len(blocks)), blocks, tangent.blocks
                )
            ]
        )

    def solved_operator(self, operator):
        solved = solved_parts(operator, self.kind)
        if solved is None:
            return operator
        pairs = list(zip(self._solvers(len(solved.blocks)), solved.blocks))
        if all(reads_whole(solver, block) for solver, block in pairs):
            return operator
        return BlockDiagonalLinearOperator(
            [solver.solved_operator(block) for solver, block in pairs]
        )

    def initial_guess(self, operator, y0):
        # Each block's solver uses its entry of `y0` as it says; a block without
        # a guess (`None`, or one its solver ignores) starts from zero.
        primal = unwrap_tagged(operator)
        if not isinstance(primal, BlockDiagonalLinearOperator) or not (
            isinstance(y0, tuple) and len(y0) == len(primal.in_structure())
        ):
            return None
        blocks = primal.blocks
        guesses = [
            None if guess is None else solver.initial_guess(block, guess)
            for solver, block, guess in zip(self._solvers(len(blocks)), blocks, y0)
        ]
        if all(guess is None for guess in guesses):
            return None
        return tuple(
            jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), block.in_structure())
            if guess is None
            else guess
            for block, guess in zip(blocks, guesses)
        )

    def solver_parts(self, operator: BlockDiagonalLinearOperator):
        if isinstance(self.solver, AbstractLinearSolver):
            # One solver for all: alike blocks need asking only once.
            return [(self.solver, b) for b in operator.representatives()]
        return zip(self._solvers(len(operator.blocks)), operator.blocks)


@structured_solver.register(BlockDiagonalLinearOperator)
def _(operator):
    if cheaper_by_tags(operator):
        return None
    if not square_blocks(operator):
        return None
    return BlockDiagonal()
