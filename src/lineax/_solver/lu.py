"""`LU`: Gaussian elimination with partial pivoting."""

from typing import Any

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jaxtyping import Array, Int

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
    """State of [`lineax.LU`][]: the packed factors `L` (unit lower) and `U` (upper)
    of `A[permutation] = L U`, and whether to solve with the transpose."""

    lu: Array
    permutation: Int[Array, " n"]
    packed_structures: PackedStructures = eqx.field(static=True)
    transposed: bool = eqx.field(static=True)


class LU(AbstractLinearSolver[LUState]):
    """LU decomposition with partial pivoting (LAPACK `getrf`).

    For square, nonsingular operators. A zero pivot, or one below `n * eps` relative
    to the largest, gives [`lineax.RESULTS.singular`][]; nearly singular matrices
    are otherwise solved as accurately as their condition number allows.

    This solver reads no `options`.
    """

    def init(
        self, operator: AbstractLinearOperator, options: dict[str, Any]
    ) -> LUState:
        del options
        check_square(operator, "LU")
        # Keep the permutation (not LAPACK's sequence of row swaps), so that each
        # solve is one gather instead of a loop over the pivots.
        lu, _, permutation = lax.linalg.lu(operator.as_matrix())
        return LUState(lu, permutation, pack_structures(operator), False)

    def compute(self, state: LUState, vector, options):
        del options
        b = ravel_vector(vector, state.packed_structures)
        lu, perm = state.lu, state.permutation
        if state.transposed:
            # A = P^T L U, so A^T = U^T L^T P: solve U^T y = b, L^T z = y, P x = z.
            y = jsl.solve_triangular(lu, b, trans=1, lower=False)
            z = jsl.solve_triangular(lu, y, trans=1, lower=True, unit_diagonal=True)
            x = jnp.zeros_like(z).at[perm].set(z)
        else:
            y = jsl.solve_triangular(lu, b[perm], lower=True, unit_diagonal=True)
            x = jsl.solve_triangular(lu, y, lower=False)
        singular = numerically_singular(jnp.diagonal(lu))
        result = RESULTS.where(singular, RESULTS.singular, RESULTS.successful)
        return unravel_solution(x, state.packed_structures), result, {}

    def transpose(self, state: LUState, options):
        new = LUState(
            state.lu,
            state.permutation,
            transpose_packed_structures(state.packed_structures),
            not state.transposed,
        )
        return new, options

    def conj(self, state: LUState, options):
        new = LUState(
            jnp.conj(state.lu),
            state.permutation,
            state.packed_structures,
            state.transposed,
        )
        return new, options

    def assume_full_rank(self) -> bool:
        return True
