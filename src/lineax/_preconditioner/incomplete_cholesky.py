"""`IncompleteCholeskyPreconditioner`: the incomplete Cholesky factorisation IC(0)
of a sparse symmetric matrix."""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Inexact, Int

from .._misc import jit_when_eager, Static
from .._operator.base import (
    AbstractLinearOperator,
    concrete_arrays,
    is_cacheable,
    is_negative_semidefinite,
    is_positive_semidefinite,
    is_symmetric,
    reads_every_leaf,
)
from .base import (
    AbstractPreconditioner,
    apply_flat,
    definite_tags,
    replace_fields,
    usable_pivots,
)
from .ilu import check_shift, shifted_diagonal
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


class IncompleteCholeskyPreconditioner(AbstractPreconditioner):
    """The IC(0) preconditioner of a sparse symmetric matrix: `P = L⁻ᴴ D⁻¹ L⁻¹`,
    where `L` (unit lower triangular) has the sparsity pattern of the lower triangle
    of `A` and `L D Lᴴ` equals `A` on that pattern (Meijerink and van der Vorst,
    "An iterative solution method for linear systems of which the coefficient
    matrix is a symmetric M-matrix", Math. Comp. 31, 1977). `L D^{1/2}` is the
    incomplete Cholesky factor; the square-root-free form is used so that an
    indefinite symmetric `A` can be factorised too. For a matrix whose Cholesky
    factor fits its pattern (tridiagonal, banded) it is the exact inverse.

    Only the lower triangle (and diagonal) of the stored matrix is read, and the
    matrix is taken to be Hermitian (for an operator tagged positive or negative
    semidefinite) or symmetric (otherwise). The factors are computed as for
    [`lineax.ILUPreconditioner`][] (whose notes on `jit`, `vmap`, `grad`, the
    concrete pattern and the level-scheduled triangular solves apply here too).

    **Breakdown.** IC(0) of a positive definite matrix that is not an M-matrix can
    meet a pivot `d_k ≤ 0` (Kershaw's example). A pivot of the wrong sign (for an
    operator tagged positive or negative semidefinite), a zero pivot or non-finite
    factors set `breakdown = True`, and the preconditioner then applies as NaN,
    which the Krylov solvers report as a failed solve. Pass `shift > 0` to
    factorise `A + shift·diag(A)` instead (Manteuffel, 1980): a large enough shift
    always succeeds for a positive definite `A`.

    The preconditioner is symmetric, and positive (negative) semidefinite when the
    operator is tagged so: use it with [`lineax.CG`][] and [`lineax.MINRES`][].

    **Arguments:**

    - `operator`: a square symmetric [`lineax.SparseLinearOperator`][] (tagged
        [`lineax.symmetric_tag`][] or [`lineax.positive_semidefinite_tag`][]), or a
        [`lineax.TaggedLinearOperator`][] wrapping one.
    - `shift`: a non-negative number; the diagonal is multiplied by `1 + shift`
        before factorising. Default 0.

    **Attributes:**

    - `breakdown`: a boolean scalar, `True` if a pivot was zero or of the wrong
        sign, or the factors are not finite.
    """

    diagonal: Inexact[Array, " size"]
    breakdown: Bool[Array, ""]
    # L, and Lᴴ (or Lᵀ).
    lower: TriangularFactor
    upper: TriangularFactor
    hermitian: bool = eqx.field(static=True)
    input_structure: Static = eqx.field(static=True)
    output_structure: Static = eqx.field(static=True)
    tags: frozenset = eqx.field(static=True)

    def __init__(self, operator: AbstractLinearOperator, shift: Any = 0.0):
        who = "IncompleteCholeskyPreconditioner"
        sparse, operator = sparse_operator_of(operator, who)
        if not is_symmetric(operator):
            raise ValueError(
                f"`{who}` needs a symmetric `operator`: tag it `lx.symmetric_tag` "
                "or `lx.positive_semidefinite_tag` if it is. For a nonsymmetric "
                "sparse matrix use `lx.ILUPreconditioner`."
            )
        shift = check_shift(shift, sparse.matrix.dtype)
        positive = is_positive_semidefinite(operator)
        negative = (not positive) and is_negative_semidefinite(operator)
        hermitian = positive or negative
        n = sparse.matrix.shape[0]
        rows, columns = stored_entries(sparse.matrix, who)
        # The lower triangle, mirrored: the matrix the factorisation sees.
        lower = (rows < n) & (columns <= rows)
        strict = lower & (columns < rows)
        keys = np.concatenate(
            [rows[lower] * n + columns[lower], columns[strict] * n + rows[strict]]
        )
        pattern = make_pattern(keys, n)
        nnz = pattern.nnz
        slots = np.where(lower, slots_of(pattern, rows, columns), nnz)
        mirror = np.where(strict, slots_of(pattern, columns, rows), nnz)
        prow, pcol = pattern.rows, pattern.columns
        below = np.flatnonzero(pcol < prow)
        self.diagonal, self.breakdown, self.lower, self.upper = _factorise(
            sparse.matrix.data,
            shift,
            index_array(np.concatenate([slots, mirror])),
            index_array(pattern.diagonal),
            elimination(pattern),
            triangular_layout(n, prow[below], pcol[below], below, nnz, lower=True),
            # Lᴴ (or Lᵀ): the slots of L, rows and columns swapped.
            triangular_layout(n, pcol[below], prow[below], below, nnz, lower=False),
            nnz,
            positive,
            negative,
        )
        self.hermitian = hermitian
        self.input_structure = Static(sparse.out_structure())
        self.output_structure = Static(sparse.in_structure())
        self.tags = definite_tags(operator)

    def mv(self, vector):
        def apply(x: Array) -> Array:
            y = solve_triangular(self.lower, x.astype(self.diagonal.dtype))
            return solve_triangular(self.upper, y / self.diagonal)

        return apply_flat(apply, vector, self.out_structure())

    def transpose(self):
        # (L⁻ᴴ D⁻¹ L⁻¹)ᵀ = conj(L)⁻ᴴ conj(D)⁻¹ conj(L)⁻¹; L⁻ᵀ D⁻¹ L⁻¹ is symmetric.
        if not self.hermitian:
            return replace_fields(
                self,
                input_structure=self.output_structure,
                output_structure=self.input_structure,
            )

        def conj(factor):
            return eqx.tree_at(lambda f: f.values, factor, jnp.conj(factor.values))

        return replace_fields(
            self,
            lower=conj(self.lower),
            upper=conj(self.upper),
            diagonal=jnp.conj(self.diagonal),
            input_structure=self.output_structure,
            output_structure=self.input_structure,
        )


# The value-dependent part of the construction; see `incomplete.py`.
@jit_when_eager
def _factorise(
    data: Array,
    shift: Any,
    slots: Int[Array, " twice_entries"],
    diagonal_slots: Int[Array, " size"],
    schedule: Elimination,
    lower: TriangularLayout,
    upper: TriangularLayout,
    nnz: int,
    positive: bool,
    negative: bool,
) -> tuple[
    Inexact[Array, " size"], Bool[Array, ""], TriangularFactor, TriangularFactor
]:
    hermitian = positive or negative
    mirrored = jnp.conj(data) if hermitian else data
    values = scatter_values(jnp.concatenate([data, mirrored]), slots, nnz)
    values = shifted_diagonal(values, diagonal_slots, shift)
    # ILU(0) of a symmetric matrix on a symmetric pattern is `L (D Lᴴ)`: its
    # lower factor and pivots are those of IC(0); its upper factor is unused.
    # (Twice the work of an IC-only elimination, once, for one schedule.)
    values = eliminate(schedule, values)
    diagonal = values[diagonal_slots]
    pivots_ok = usable_pivots(diagonal, positive, negative)
    breakdown = ~(jnp.all(jnp.isfinite(values)) & jnp.all(pivots_ok))
    values = jnp.where(breakdown, jnp.nan, values)
    return (
        jnp.where(breakdown, jnp.nan, diagonal),
        breakdown,
        triangular_factor(lower, values, None),
        triangular_factor(upper, jnp.conj(values) if hermitian else values, None),
    )


is_cacheable.register(IncompleteCholeskyPreconditioner)(concrete_arrays)
reads_every_leaf.register(IncompleteCholeskyPreconditioner)(lambda p: True)
