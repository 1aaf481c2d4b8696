"""`LU`: Gaussian elimination with partial pivoting."""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jaxtyping import Array

from .._operator.base import AbstractLinearOperator
from .._solution import RESULTS
from ._packing import (
    pack_structures,
    PackedStructures,
    ravel_vector,
    transpose_packed_structures,
    unravel_solution,
)
from .base import AbstractLinearSolver, check_square, numerically_singular


class LUState(eqx.Module):
    """State of [`lineax.LU`][]: the packed LU factors, pivots, and whether to solve
    with the transpose."""

    lu: Array
    pivots: Array
    packed_structures: PackedStructures = eqx.field(static=True)
    transposed: bool = eqx.field(static=True)


class LU(AbstractLinearSolver[LUState]):
    """LU decomposition with partial pivoting (LAPACK `getrf`/`getrs`).

    For square, nonsingular operators. A zero pivot gives
    [`lineax.RESULTS.singular`][]; nearly singular matrices are solved as
    accurately as the condition number allows (check the residual if unsure).

    This solver reads no `options`.
    """

    def init(
        self, operator: AbstractLinearOperator, options: dict[str, Any]
    ) -> LUState:
        del options
        check_square(operator, "LU")
        lu, pivots = jsl.lu_factor(operator.as_matrix(), check_finite=False)
        return LUState(lu, pivots, pack_structures(operator), False)

    def compute(self, state: LUState, vector, options):
        del options
        b = ravel_vector(vector, state.packed_structures)
        x = jsl.lu_solve(
            (state.lu, state.pivots),
            b,
            trans=1 if state.transposed else 0,
            check_finite=False,
        )
        singular = numerically_singular(jnp.diagonal(state.lu))
        result = RESULTS.where(singular, RESULTS.singular, RESULTS.successful)
        return unravel_solution(x, state.packed_structures), result, {}

    def transpose(self, state: LUState, options):
        # A^T = (P L U)^T is solved by `getrs` with trans=1 from the same factors.
        new = LUState(
            state.lu,
            state.pivots,
            transpose_packed_structures(state.packed_structures),
            not state.transposed,
        )
        return new, options

    def conj(self, state: LUState, options):
        new = LUState(
            jnp.conj(state.lu), state.pivots, state.packed_structures, state.transposed
        )
        return new, options

    def assume_full_rank(self) -> bool:
        return True
