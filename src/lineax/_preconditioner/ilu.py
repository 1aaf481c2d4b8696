"""`ILUPreconditioner`: the incomplete LU factorisation ILU(0) of a sparse matrix."""

from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

from .._misc import jit_when_eager, Static
from .._operator.base import (
    AbstractLinearOperator,
    concrete_arrays,
    is_cacheable,
    reads_every_leaf,
)
from .base import (
    AbstractPreconditioner,
    apply_flat,
    concrete_number,
    replace_fields,
)
from .incomplete import (
    eliminate,
    Elimination,
    elimination,
    index_array,
    make_pattern,
    scatter_values,
    slots_of,
    solve_triangular,
    sparse_operator_of,
    stored_entries,
    triangular_factor,
    triangular_layout,
    TriangularFactor,
    TriangularLayout,
)


def check_shift(shift: Any, dtype: Any) -> Any:
    """`shift`, checked, as a JAX array: a Python number would be a static argument
    of the jitted factorisation, compiled again for each value when built eagerly.
    A number becomes an array of the real dtype of `dtype` (the matrix's): with
    x64 enabled, a float64 one would be a float64 input of a float32
    factorisation, slow on a GPU and an error on a TPU. (`jax.device_put`, unlike
    `jnp.asarray`, compiles nothing.)"""
    if isinstance(shift, jax.core.Tracer):
        return shift
    number = concrete_number(shift, "shift")
    # (A complex shift, `1j`, was taken as its real part, 0, and its imaginary
    # part dropped without a word.)
    value = number.real
    if number.imag or not value >= 0:
        raise ValueError(f"`shift` must be a real, non-negative number, got {shift!r}.")
    if isinstance(shift, jax.Array):
        return shift
    return jax.device_put(np.asarray(value, jnp.finfo(dtype).dtype))


def shifted_diagonal(
    values: Array, diagonal_slots: Int[Array, " size"], shift: Any
) -> Array:
    """The values with the diagonal scaled by `1 + shift` (Manteuffel's shift,
    "An incomplete factorization technique for positive definite linear systems",
    Math. Comp. 34, 1980): a larger shift makes the factorisation more stable and
    a worse approximation."""
    # (In the values' dtype: a float64 shift, given as an array, is not promoted.)
    scale = 1 + jnp.asarray(shift).astype(values.dtype)
    # The diagonal's slots are distinct, and saying so matters: JAX differentiates
    # a `scatter_mul` in its multiplier only for unique indices, so a traced shift
    # (e.g. scaled to the values being differentiated) raised NotImplementedError
    # under `jax.grad`.
    return values.at[diagonal_slots].multiply(scale, unique_indices=True)


class ILUPreconditioner(AbstractPreconditioner):
    """The ILU(0) preconditioner of a sparse matrix: `P = U⁻¹ L⁻¹`, where `L`
    (unit lower triangular) and `U` (upper triangular) have the sparsity pattern of
    the matrix `A` and `LU` equals `A` on that pattern (Saad, "Iterative Methods for
    Sparse Linear Systems", 2nd ed., §10.3.2, Algorithm 10.4). For a matrix whose
    exact LU factors fit its pattern (tridiagonal, banded with full bands) it is
    the exact inverse.

    The pattern is read from the operator's index arrays when the preconditioner is
    built, and everything that depends only on the pattern (the order of the
    eliminations, the levels of the triangular solves) is computed then, on the
    host; the values may be traced, so it works under `jit`, `vmap` and `grad` over
    the matrix's values. The index arrays must be concrete: build the operator from
    index arrays closed over by the jitted function, or build the preconditioner
    outside it. Each application is a sparse lower and upper triangular solve, each
    a loop over the *levels* of the triangular factor (rows that can be solved at
    once), one vectorised gather and segment sum per level: about `2√n` levels for
    a 2-D grid of `n` unknowns in natural order.

    Stored duplicates are summed; diagonal entries not stored count as zeros.

    **Breakdown.** A zero pivot `u_kk` (possible for any matrix that is not an
    M-matrix or diagonally dominant) makes the factors non-finite. The
    preconditioner then records `breakdown = True` and applies as NaN, which the
    Krylov solvers report as a failed solve; pass `shift > 0` to factorise
    `A + shift·diag(A)` instead, which moves the pivots away from zero. (A zero
    diagonal entry of `A` itself, stored or not, stays zero under the shift: the
    first pivot of its row is then zero whatever the shift, unless eliminations
    fill it; reorder the unknowns, or use another preconditioner.)

    The transpose is `L⁻ᵀ U⁻ᵀ`, the ILU(0) preconditioner of `Aᵀ` (used by the
    transposed solve of reverse-mode differentiation). No tags are claimed:
    `U⁻¹ L⁻¹` is not symmetric even for a symmetric `A`; use
    [`lineax.IncompleteCholeskyPreconditioner`][] for that.

    **Arguments:**

    - `operator`: a square [`lineax.SparseLinearOperator`][] (BCSR or BCOO), or a
        [`lineax.TaggedLinearOperator`][] wrapping one.
    - `shift`: a non-negative number; the diagonal is multiplied by `1 + shift`
        before factorising. Default 0.

    **Attributes:**

    - `breakdown`: a boolean scalar, `True` if a pivot was zero or the factors are
        not finite.
    """

    breakdown: Bool[Array, ""]
    # (L, U), and (Uᵀ, Lᵀ) for the transpose.
    factors: tuple[TriangularFactor, TriangularFactor]
    transposed_factors: tuple[TriangularFactor, TriangularFactor]
    input_structure: Static = eqx.field(static=True)
    output_structure: Static = eqx.field(static=True)
    tags: frozenset = eqx.field(static=True)

    def __init__(self, operator: AbstractLinearOperator, shift: Any = 0.0):
        who = "ILUPreconditioner"
        sparse, operator = sparse_operator_of(operator, who)
        shift = check_shift(shift, sparse.matrix.dtype)
        n = sparse.matrix.shape[0]
        rows, columns = stored_entries(sparse.matrix, who)
        valid = rows < n
        pattern = make_pattern(rows[valid] * n + columns[valid], n)
        prow, pcol = pattern.rows, pattern.columns
        lower = np.flatnonzero(pcol < prow)
        upper = np.flatnonzero(pcol > prow)

        def layout(rows, columns, slots, lower):
            return triangular_layout(n, rows, columns, slots, pattern.nnz, lower=lower)

        self.breakdown, self.factors, self.transposed_factors = _factorise(
            sparse.matrix.data,
            shift,
            index_array(slots_of(pattern, rows, columns)),
            index_array(pattern.diagonal),
            elimination(pattern),
            (
                layout(prow[lower], pcol[lower], lower, True),
                layout(prow[upper], pcol[upper], upper, False),
                # Uᵀ (lower, with U's diagonal), then Lᵀ (upper, unit): the same
                # slots with rows and columns swapped.
                layout(pcol[upper], prow[upper], upper, True),
                layout(pcol[lower], prow[lower], lower, False),
            ),
            pattern.nnz,
        )
        self.input_structure = Static(sparse.out_structure())
        self.output_structure = Static(sparse.in_structure())
        self.tags = frozenset()

    def mv(self, vector):
        def apply(x: Array) -> Array:
            for factor in self.factors:
                x = solve_triangular(factor, x.astype(factor.values.dtype))
            return x

        return apply_flat(apply, vector, self.out_structure())

    def transpose(self):
        return replace_fields(
            self,
            factors=self.transposed_factors,
            transposed_factors=self.factors,
            input_structure=self.output_structure,
            output_structure=self.input_structure,
        )


# The value-dependent part of the construction; see `incomplete.py`. `layouts` are
# those of L, U, Uᵀ and Lᵀ.
@jit_when_eager
def _factorise(
    data: Array,
    shift: Any,
    slots: Int[Array, " entries"],
    diagonal_slots: Int[Array, " size"],
    schedule: Elimination,
    layouts: tuple[TriangularLayout, ...],
    nnz: int,
) -> tuple[
    Bool[Array, ""],
    tuple[TriangularFactor, TriangularFactor],
    tuple[TriangularFactor, TriangularFactor],
]:
    values = scatter_values(data, slots, nnz)
    values = shifted_diagonal(values, diagonal_slots, shift)
    values = eliminate(schedule, values)
    diagonal = values[diagonal_slots]
    breakdown = ~(jnp.all(jnp.isfinite(values)) & jnp.all(diagonal != 0))
    values = jnp.where(breakdown, jnp.nan, values)
    diagonal = jnp.where(breakdown, jnp.nan, diagonal)
    lower, upper, upper_t, lower_t = layouts
    return (
        breakdown,
        (
            triangular_factor(lower, values, None),
            triangular_factor(upper, values, diagonal),
        ),
        (
            triangular_factor(upper_t, values, diagonal),
            triangular_factor(lower_t, values, None),
        ),
    )


is_cacheable.register(ILUPreconditioner)(concrete_arrays)
reads_every_leaf.register(ILUPreconditioner)(lambda p: True)
