"""`SVD`: the pseudoinverse solution of any system, by singular value
decomposition."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._misc import select
from .._operator.base import AbstractLinearOperator
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
    check_lapack_dtype,
    check_rcond,
    operator_is_finite,
    static_number,
)


class SVDState(eqx.Module):
    """State of [`lineax.SVD`][]: the thin SVD `A = U diag(s) Vh`, and whether
    every entry of `A` is finite."""

    u: Array
    s: Array
    vh: Array
    finite: Array
    packed_structures: PackedStructures = eqx.field(static=True)


class SVD(AbstractLinearSolver[SVDState]):
    """Singular value decomposition: `x = V diag(1/s) U^H b` over the singular
    values above a cutoff, i.e. the pseudoinverse solution.

    Handles any operator: square, tall (least squares), wide (minimum norm) and
    rank-deficient (both). The most robust and the most expensive dense solver.
    `stats["rcond"]` holds the reciprocal 2-norm condition number
    `min(s) / max(s)` (exact, over all `min(m, n)` singular values, including
    those treated as zero), and `stats["rank"]` the numerical rank: the number
    of singular values kept.

    **Arguments:**

    - `rcond`: singular values `s <= rcond * max(s)` are treated as zero. The
        default `None` means `eps * max(m, n)` for the dtype's machine epsilon, as
        in `jnp.linalg.lstsq` and `numpy.linalg.lstsq`.

    Derivatives are those of the pseudoinverse (equation (1) of the paper),
    exact where the singular values treated as zero are zero. A larger `rcond`
    that cuts off nonzero singular values (a truncated SVD, as regularisation)
    gives the derivative of the truncated solution only up to a relative error
    of the order of `s_cut / s_kept` (the largest singular value cut off over
    the smallest kept; 0.085 measured for 0.05 / 0.3), as `jnp.linalg.pinv`
    does: the exact one couples the kept and cut-off singular vectors by terms
    in `1 / (s_kept² - s_cut²)`, which no solve with the truncated
    pseudoinverse gives.

    This solver reads no `options`.
    """

    rcond: float | None = static_number(float | None, default=None)

    option_keys = frozenset()

    def __check_init__(self):
        check_rcond(self.rcond)

    def init(
        self, operator: AbstractLinearOperator, options: dict[str, Any]
    ) -> SVDState:
        check_lapack_dtype(operator, "SVD")
        del options
        matrix = operator.as_matrix()
        # LAPACK reads column-major matrices, and `matrix` is row-major: in
        # memory, its transpose in column-major order. Decomposing `matrix.T =
        # vh^T diag(s) u^T` hands LAPACK those bytes (XLA copies them, as LAPACK
        # overwrites its input), where decomposing `matrix` had XLA transpose
        # them first; and `compute`'s products, written against the factors as
        # LAPACK returns them, fuse with their change of layout. XLA's compile
        # time of a solve (n = 100, float32, CPU): 1.13x -> 0.99x that of
        # `jnp.linalg.lstsq`, which decomposes `matrix`.
        vh_t, s, u_t = jnp.linalg.svd(matrix.T, full_matrices=False)
        u, vh = u_t.T, vh_t.T
        return SVDState(u, s, vh, operator_is_finite(matrix), pack_structures(operator))

    def compute(self, state: SVDState, vector, options):
        del options
        b = ravel_vector(vector, state.packed_structures)
        u, s, vh = state.u, state.s, state.vh
        m, n = u.shape[0], vh.shape[1]
        if self.rcond is None:
            rcond = jnp.finfo(s.dtype).eps * max(m, n)
        else:
            rcond = self.rcond
        hi = jax.lax.Precision.HIGHEST
        # LAPACK's `gesdd` returns the singular values in descending order: the
        # largest is the first (as `jnp.linalg.lstsq` reads it), not a reduction,
        # which XLA:CPU would compile as two kernels of their own.
        if s.shape[-1] == 0:
            smax = smin = jnp.zeros((), s.dtype)
        else:
            smax, smin = s[0], s[-1]
        keep = s > rcond * smax
        safe_s = select(keep, s, 1).astype(u.dtype)
        # `u^H b` as `b^T conj(u)` and `V c` as `c^T conj(vh)`: see `init`.
        coeffs = jnp.matmul(b.astype(u.dtype), jnp.conj(u), precision=hi) / safe_s
        coeffs = select(keep, coeffs, 0)
        x = jnp.matmul(coeffs.astype(vh.dtype), jnp.conj(vh), precision=hi)
        rcond = select(smax == 0, jnp.zeros_like(smin), smin / smax)
        # `rank` as the published lineax reports it: the singular values kept.
        stats = {"rcond": rcond, "rank": jnp.sum(keep)}
        return unravel_solution(x, state.packed_structures), RESULTS.successful, stats

    def transpose(self, state: SVDState, options):
        # A^T = Vh^T diag(s) U^T.
        new = SVDState(
            state.vh.T,
            state.s,
            state.u.T,
            state.finite,
            transpose_packed_structures(state.packed_structures),
        )
        return new, options

    def conj(self, state: SVDState, options):
        new = SVDState(
            jnp.conj(state.u),
            state.s,
            jnp.conj(state.vh),
            state.finite,
            state.packed_structures,
        )
        return new, options

    def recorded_operator_finite(self, state: SVDState) -> Array:
        return state.finite

    def assume_full_rank(self) -> bool:
        return False
