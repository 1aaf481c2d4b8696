"""`Schur`: solves with a 2×2 block operator through the Schur complement of its
top-left block."""

import functools as ft
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PyTree

from .._misc import (
    HeldArrays,
    power_of_two_normaliser,
    result_dtype,
    Static,
    tree_size,
)
from .._operator.base import (
    AbstractLinearOperator,
    conj,
    flatten_vector,
    unflatten_vector,
)
from .._operator.block import BlockLinearOperator
from .._operator.matrix import MatrixLinearOperator
from .._operator.tagged import unwrap_tagged
from .._operator.tangent import TangentLinearOperator
from .._solution import RESULTS
from ._structured import (
    first_failure,
    mv_flat,
    part_options,
    reads_whole,
    refined,
    solve_columns,
    solve_flat,
    solved_parts,
    solves_to_a_tolerance,
    tangent_parts,
)
from .auto import AutoLinearSolver
from .base import AbstractLinearSolver, check_solver
from .lu import LU, LUState


class SchurState(eqx.Module):
    """State of [`lineax.Schur`][], for `[[A, B], [C, D]]`: the inner solver's
    state for `A`, the LU factorisation of the Schur complement
    `S = D − C A⁻¹ B`, and the off-diagonal blocks (`None` for a zero block).
    Transposing swaps `B` and `C` for `Cᵀ` and `Bᵀ`, and transposes the
    states of `A` and `S`. `operator` is the whole operator solved (transposed
    alike), for the residual of the refinement step."""

    top_left: PyTree
    complement: LUState
    held_upper: HeldArrays  # `B` (arrays as its only leaves: see `HeldArrays`)
    held_lower: HeldArrays  # `C`
    held_operator: HeldArrays  # `[[A, B], [C, D]]`
    # The result of the solves for `A⁻¹ B` (reported by every solve with this
    # state: a Schur complement built from unconverged columns is wrong).
    columns_result: RESULTS
    structures: Static = eqx.field(static=True)

    def __init__(
        self,
        top_left: PyTree,
        complement: LUState,
        upper: AbstractLinearOperator | None,
        lower: AbstractLinearOperator | None,
        operator: AbstractLinearOperator,
        columns_result: RESULTS,
        structures: Static,
    ):
        self.top_left = top_left
        self.complement = complement
        self.held_upper = HeldArrays(upper)
        self.held_lower = HeldArrays(lower)
        self.held_operator = HeldArrays(operator)
        self.columns_result = columns_result
        self.structures = structures

    @property
    def upper(self) -> AbstractLinearOperator | None:
        return self.held_upper.value

    @property
    def lower(self) -> AbstractLinearOperator | None:
        return self.held_lower.value

    @property
    def operator(self) -> AbstractLinearOperator:
        return self.held_operator.value


def _transpose(operator):
    return None if operator is None else operator.transpose()


def _conj(operator):
    return None if operator is None else conj(operator)


def _eliminate(
    inner: AbstractLinearSolver, state: SchurState, b: Array, options: dict
) -> tuple[Array, RESULTS]:
    """`M⁻¹ b` (flat) by block elimination, and the result code."""
    in_structure, out_structure = state.structures.value
    dtype = b.dtype
    b1, b2 = jnp.split(b, [tree_size(out_structure[0])])
    results = [state.columns_result]
    if state.lower is not None:
        y1, result = solve_flat(inner, state.top_left, b1, out_structure[0], options)
        results.append(result)
        b2 = b2 - mv_flat(state.lower, y1, in_structure[0], dtype)
    x2, result, _ = LU().compute(state.complement, b2, {})
    results.append(result)
    if state.upper is not None:
        b1 = b1 - mv_flat(state.upper, x2, in_structure[1], dtype)
    x1, result = solve_flat(inner, state.top_left, b1, out_structure[0], options)
    results.append(result)
    return jnp.concatenate([x1, x2]), first_failure(*results)


class Schur(AbstractLinearSolver[SchurState]):
    """Solves with a 2×2 [`lineax.BlockLinearOperator`][] `[[A, B], [C, D]]` by
    block elimination (Zhang (ed.), "The Schur Complement and Its Applications",
    Springer 2005, section 0.1): with `S = D − C A⁻¹ B`,

    `x₂ = S⁻¹ (b₂ − C A⁻¹ b₁)`, then `x₁ = A⁻¹ (b₁ − B x₂)`.

    `init` factorises `A` with the inner solver, solves with it for the columns
    of `B`, and factorises the dense `S` by LU. Worth it when `A` is large and
    cheap to solve with (diagonal, banded, itself structured) and `D` is small,
    as in saddle-point systems `[[A, Bᵀ], [B, 0]]` (`D` may be `None`). Each
    solve eliminates twice: once, then once more for the residual (a step of
    iterative refinement), as elimination alone loses accuracy to an
    ill-conditioned `A` even where the whole operator is well-conditioned.

    `A` must be square and nonsingular; a singular Schur complement (the whole
    operator singular) gives [`lineax.RESULTS.singular`][]. With a direct inner
    solver, each column of `B` is first rescaled by a power of two (its largest
    entry into `[1, 2)`, undone after `C` is applied), which is exact: `A⁻¹B` of
    a large `B` against a small `C` does not overflow.

    **Arguments:**

    - `inner`: the solver for `A`. Defaults to
        `lx.AutoLinearSolver(well_posed=True)`.

    The `options` are passed to the inner solver, except `y0` and
    `preconditioner` (of the whole operator, not of `A`): `y0` is ignored, and a
    `preconditioner` is ignored by a direct inner solver and an error for an
    iterative one.
    """

    inner: AbstractLinearSolver = AutoLinearSolver(well_posed=True)

    option_keys = frozenset()  # `options` are passed on to the inner solver(s)

    def __check_init__(self):
        check_solver(self.inner, "inner")

    def init(
        self, operator: AbstractLinearOperator, options: dict[str, Any]
    ) -> SchurState:
        operator = unwrap_tagged(operator)
        if (
            not isinstance(operator, BlockLinearOperator)
            or len(operator.blocks) != 2
            or len(operator.blocks[0]) != 2
        ):
            raise ValueError(
                "`lx.Schur` solves only a 2×2 `lx.BlockLinearOperator`, got "
                f"{type(operator).__name__}"
                + (
                    f" with a {len(operator.blocks)}×{len(operator.blocks[0])} grid."
                    if isinstance(operator, BlockLinearOperator)
                    else "."
                )
            )
        (a, b), (c, d) = operator.blocks
        if a is None or a.in_size() != a.out_size():
            raise ValueError(
                "`lx.Schur` needs the top-left block `blocks[0][0]` to be a square "
                "operator (it is solved with), got "
                + ("None." if a is None else f"{a.out_size()}×{a.in_size()}.")
            )
        in_structure = operator.in_structure()
        out_structure = operator.out_structure()
        dtype = result_dtype(in_structure, out_structure)
        options = part_options((self.inner,), options, "Schur")
        top_left = self.inner.init(a, options)
        n2_in = tree_size(in_structure[1])
        n2_out = tree_size(out_structure[1])
        if n2_in != n2_out:
            raise ValueError(
                "`lx.Schur` needs a square bottom-right block position (its Schur "
                f"complement is factorised), got {n2_out}×{n2_in}."
            )
        complement = jnp.zeros((n2_out, n2_in), dtype) if d is None else d.as_matrix()
        columns_result = RESULTS.successful
        if b is not None and c is not None:
            # A⁻¹ B, one solve per column of B, then C A⁻¹ B column by column,
            # for `B` with each column rescaled by the power of two that brings
            # its largest entry into `[1, 2)` (`B S`, `S` diagonal), and `C A⁻¹ B
            # S` by `S⁻¹`: `A⁻¹ B` of a well-scaled operator overflowed where `B`
            # is large and `C` small, and the solve was `singular`. Powers of two
            # scale exactly: in range, this is the unscaled complement, bitwise.
            # (Not for an iterative inner solver: its `atol` would then stop the
            # solves for the columns elsewhere.)
            b_matrix = b.as_matrix()
            scale = None
            if b_matrix.size and not solves_to_a_tolerance(self.inner):
                scale = power_of_two_normaliser(jnp.max(jnp.abs(b_matrix), axis=0))
                b_matrix = b_matrix * scale.astype(b_matrix.dtype)[None, :]
            solved_b, columns_result = solve_columns(
                self.inner, top_left, b_matrix.T, out_structure[0], options
            )
            c_solved_b = jax.vmap(
                lambda x: mv_flat(c, x, in_structure[0], dtype), out_axes=1
            )(solved_b)
            if scale is not None:
                c_solved_b = c_solved_b / scale.astype(c_solved_b.dtype)[None, :]
            complement = complement.astype(dtype) - c_solved_b
        complement_state = LU().init(MatrixLinearOperator(complement), {})
        # The refinement step's residual is that of the operator as solved: with
        # the part of `A` that the inner solver reads (e.g. the diagonal, for a
        # matrix tagged diagonal), on which alone the solution and its
        # derivative depend.
        solved = self.solved_operator(operator)
        return SchurState(
            top_left,
            complement_state,
            b,
            c,
            solved,
            columns_result,
            Static((in_structure, out_structure)),
        )

    def compute(self, state: SchurState, vector, options):
        options = part_options((self.inner,), options, "Schur")
        in_structure, out_structure = state.structures.value
        dtype = result_dtype(in_structure, out_structure)
        # (See `refined`: a saddle point `[[diag(1e-10, 1, 1, 1), B], [Bᵀ, 0]]`,
        # cond 5, float64: relative error 6e-7 -> 3e-13; LU: 2e-16.)
        solve = ft.partial(_eliminate, self.inner, state, options=options)
        x, result = refined(solve, state.operator, flatten_vector(vector, dtype))
        return unflatten_vector(x, in_structure), result, {}

    def transpose(self, state: SchurState, options):
        # [[A, B], [C, D]]ᵀ = [[Aᵀ, Cᵀ], [Bᵀ, Dᵀ]], whose Schur complement is Sᵀ.
        inner_options = part_options((self.inner,), options, "Schur")
        top_left, _ = self.inner.transpose(state.top_left, inner_options)
        complement, _ = LU().transpose(state.complement, {})
        in_structure, out_structure = state.structures.value
        new = SchurState(
            top_left,
            complement,
            _transpose(state.lower),
            _transpose(state.upper),
            state.operator.transpose(),
            state.columns_result,
            Static((out_structure, in_structure)),
        )
        return new, options

    def conj(self, state: SchurState, options):
        inner_options = part_options((self.inner,), options, "Schur")
        top_left, _ = self.inner.conj(state.top_left, inner_options)
        complement, _ = LU().conj(state.complement, {})
        new = SchurState(
            top_left,
            complement,
            _conj(state.upper),
            _conj(state.lower),
            conj(state.operator),
            state.columns_result,
            state.structures,
        )
        return new, options

    def part_read(self, operator, other):
        # The inner solver reads its part of `A` (e.g. the diagonal for
        # `lx.Diagonal`); the other blocks are read whole. The tangent is taken
        # block by block, with `A`'s cut down by the inner solver.
        parts = tangent_parts(operator, other, BlockLinearOperator)
        if parts is None or len(parts[0].blocks) != 2:
            return other
        primal, tangent = parts
        a = primal.blocks[0][0]
        if a is None or reads_whole(self.inner, a):
            return other
        rows: list[list[AbstractLinearOperator | None]] = [
            [
                None if block is None else TangentLinearOperator(block, t_block)
                for block, t_block in zip(row, t_row)
            ]
            for row, t_row in zip(primal.blocks, tangent.blocks)
        ]
        rows[0][0] = self.inner.part_read(
            a, TangentLinearOperator(a, tangent.blocks[0][0])
        )
        return BlockLinearOperator(rows)

    def solved_operator(self, operator):
        solved = solved_parts(operator, BlockLinearOperator)
        if solved is None or len(solved.blocks) != 2:
            return operator
        a = solved.blocks[0][0]
        if a is None or reads_whole(self.inner, a):
            return operator
        rows = [list(row) for row in solved.blocks]
        rows[0][0] = self.inner.solved_operator(a)
        return BlockLinearOperator(rows)

    def assume_full_rank(self) -> bool:
        return True
