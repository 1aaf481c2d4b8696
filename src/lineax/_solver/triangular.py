"""`Triangular`: forward or back substitution."""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jaxtyping import Array

from .._operator.base import (
    AbstractLinearOperator,
    has_unit_diagonal,
    is_lower_triangular,
    is_upper_triangular,
)
from .._solution import RESULTS
from ._packing import (
    pack_structures,
    PackedStructures,
    ravel_vector,
    transpose_packed_structures,
    unravel_solution,
)
from .base import AbstractLinearSolver, check_square, check_tag, numerically_singular


class TriangularState(eqx.Module):
    """State of [`lineax.Triangular`][]: the matrix and how to read it."""

    matrix: Array
    packed_structures: PackedStructures = eqx.field(static=True)
    lower: bool = eqx.field(static=True)
    unit_diagonal: bool = eqx.field(static=True)
    transposed: bool = eqx.field(static=True)


class Triangular(AbstractLinearSolver[TriangularState]):
    """Solves with a triangular operator by substitution (LAPACK `trsv`).

    The operator must be tagged [`lineax.lower_triangular_tag`][] or
    [`lineax.upper_triangular_tag`][]. With [`lineax.unit_diagonal_tag`][] too,
    the diagonal is taken to be ones and never read. A zero on the diagonal gives
    [`lineax.RESULTS.singular`][].

    This solver reads no `options`.
    """

    def init(
        self, operator: AbstractLinearOperator, options: dict[str, Any]
    ) -> TriangularState:
        del options
        check_square(operator, "Triangular")
        lower = is_lower_triangular(operator)
        upper = is_upper_triangular(operator)
        check_tag(
            lower or upper,
            "Triangular",
            "triangular",
            "`lx.lower_triangular_tag` or `lx.upper_triangular_tag`",
        )
        return TriangularState(
            operator.as_matrix(),
            pack_structures(operator),
            lower,
            has_unit_diagonal(operator),
            False,
        )

    def compute(self, state: TriangularState, vector, options):
        del options
        b = ravel_vector(vector, state.packed_structures)
        x = jsl.solve_triangular(
            state.matrix,
            b,
            trans=1 if state.transposed else 0,
            lower=state.lower,
            unit_diagonal=state.unit_diagonal,
            check_finite=False,
        )
        if state.unit_diagonal:
            result = RESULTS.successful
        else:
            singular = numerically_singular(jnp.diagonal(state.matrix))
            result = RESULTS.where(singular, RESULTS.singular, RESULTS.successful)
        return unravel_solution(x, state.packed_structures), result, {}

    def transpose(self, state: TriangularState, options):
        new = TriangularState(
            state.matrix,
            transpose_packed_structures(state.packed_structures),
            state.lower,
            state.unit_diagonal,
            not state.transposed,
        )
        return new, options

    def conj(self, state: TriangularState, options):
        new = TriangularState(
            jnp.conj(state.matrix),
            state.packed_structures,
            state.lower,
            state.unit_diagonal,
            state.transposed,
        )
        return new, options

    def assume_full_rank(self) -> bool:
        return True
