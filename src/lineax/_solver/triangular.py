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
from .._operator.matrix import MatrixLinearOperator
from .._solution import RESULTS
from ._packing import (
    pack_structures,
    PackedStructures,
    ravel_vector,
    transpose_packed_structures,
    unravel_solution,
)
from .base import (
    AbstractLinearSolver,
    check_square,
    check_tag,
    embed_like,
    inf_at_zero_pivots,
    norm1,
    operator_is_finite,
    rcond_estimate,
)


class TriangularState(eqx.Module):
    """State of [`lineax.Triangular`][]: the matrix, whether every entry of it is
    finite, and how to read it."""

    matrix: Array
    finite: Array
    packed_structures: PackedStructures = eqx.field(static=True)
    lower: bool = eqx.field(static=True)
    unit_diagonal: bool = eqx.field(static=True)
    transposed: bool = eqx.field(static=True)


class Triangular(AbstractLinearSolver[TriangularState]):
    """Solves with a triangular operator by substitution (LAPACK `trsv`).

    The operator must be tagged [`lineax.lower_triangular_tag`][] or
    [`lineax.upper_triangular_tag`][]. With [`lineax.unit_diagonal_tag`][] too,
    the diagonal is taken to be ones and never read. An exactly zero diagonal
    entry, or non-finite output, gives [`lineax.RESULTS.singular`][] (as
    LAPACK's `trtrs`). `stats["rcond"]` holds an estimate of the reciprocal 1-norm
    condition number (as LAPACK's `trcon`).

    This solver reads no `options`.
    """

    option_keys = frozenset()

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
        matrix = operator.as_matrix()
        # The test of a matrix computed from finite parts, which can overflow:
        # substitution divides by an infinite pivot to a finite 0. (XLA removes
        # it where `linear_solve` tests the operator's own arrays instead. The
        # whole matrix, as the probe of a function operator's action, which this
        # replaces, read it.)
        return TriangularState(
            matrix,
            operator_is_finite(matrix),
            pack_structures(operator),
            lower,
            has_unit_diagonal(operator),
            False,
        )

    def compute(self, state: TriangularState, vector, options):
        del options
        b = ravel_vector(vector, state.packed_structures)
        x = _triangular_solve(state.matrix, _flags(state), b, state.transposed)
        triangle = jnp.tril(state.matrix) if state.lower else jnp.triu(state.matrix)
        n = triangle.shape[0]
        if state.unit_diagonal:
            triangle = triangle.at[jnp.arange(n), jnp.arange(n)].set(1)
        else:
            x = inf_at_zero_pivots(x, jnp.diagonal(triangle))
        stats = {
            "rcond": rcond_estimate(
                norm1(triangle.T if state.transposed else triangle),
                state.matrix,
                solve=_rcond_solve,
                static=(_flags(state), state.transposed),
                n=n,
                dtype=triangle.dtype,
            )
        }
        return unravel_solution(x, state.packed_structures), RESULTS.successful, stats

    def transpose(self, state: TriangularState, options):
        new = TriangularState(
            state.matrix,
            state.finite,
            transpose_packed_structures(state.packed_structures),
            state.lower,
            state.unit_diagonal,
            not state.transposed,
        )
        return new, options

    def conj(self, state: TriangularState, options):
        new = TriangularState(
            jnp.conj(state.matrix),
            state.finite,
            state.packed_structures,
            state.lower,
            state.unit_diagonal,
            state.transposed,
        )
        return new, options

    def part_read(self, operator, other):
        return _triangle(operator, other, with_unit_diagonal=False)

    def recorded_operator_finite(self, state: TriangularState) -> Array:
        return state.finite

    def solved_operator(self, operator):
        # The operator as solved has the unit diagonal, which its tangents do not
        # have. (Without it `lx.Woodbury` and `lx.Schur`, whose refinement step
        # takes its residual with this, solved `I + L + u vᵀ` as if it were
        # `L + u vᵀ`: a relative error of 3 for n = 4.)
        unit = has_unit_diagonal(operator)
        return _triangle(operator, operator, with_unit_diagonal=unit)

    def assume_full_rank(self) -> bool:
        return True


def _flags(state: TriangularState) -> tuple[bool, bool]:
    return state.lower, state.unit_diagonal


def _triangular_solve(
    matrix: Array, flags: tuple[bool, bool], b: Array, transposed: bool
) -> Array:
    lower, unit_diagonal = flags
    return jsl.solve_triangular(
        matrix,
        b,
        trans=1 if transposed else 0,
        lower=lower,
        unit_diagonal=unit_diagonal,
        check_finite=False,
    )


def _rcond_solve(matrix: Array, static, b: Array, adjoint: bool) -> Array:
    flags, transposed = static
    if adjoint:
        # T^{-H} X = conj(T^{-T} conj(X)).
        return jnp.conj(_triangular_solve(matrix, flags, jnp.conj(b), not transposed))
    return _triangular_solve(matrix, flags, b, transposed)


def _triangle(operator, other, with_unit_diagonal: bool) -> AbstractLinearOperator:
    """`other` cut down to what `Triangular` reads of `operator`: one triangle
    (lower if tagged both, as `init` chooses), less the diagonal under
    `unit_diagonal_tag`; plus the identity if `with_unit_diagonal`."""
    offset = 1 if has_unit_diagonal(operator) else 0
    matrix = other.as_matrix()
    if is_lower_triangular(operator):
        matrix = jnp.tril(matrix, -offset)
    else:
        matrix = jnp.triu(matrix, offset)
    if with_unit_diagonal:
        matrix = matrix + jnp.eye(matrix.shape[0], dtype=matrix.dtype)
    return embed_like(operator, MatrixLinearOperator(matrix))
