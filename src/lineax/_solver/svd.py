"""`SVD`: the pseudoinverse solution of any system, by singular value
decomposition."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from .._misc import select
from .._operator.base import AbstractLinearOperator
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
    check_lapack_dtype,
    check_rcond,
    embed_like,
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
        default `None` means `2 * eps * max(m, n)` for the dtype's machine epsilon,
        as in the published lineax 0.1.1 (`jnp.linalg.lstsq` and
        `numpy.linalg.lstsq` cut at half that, and keep a singular value between
        the two).

    Derivatives are those of the solution returned. With the default `rcond`,
    that is the pseudoinverse's (equation (1) of the paper): the singular values
    cut off are zero to working precision. A larger `rcond` that cuts off
    nonzero singular values (a truncated SVD, as regularisation) solves with the
    best approximation of rank `k` (the number kept), `A_k`, and the derivative
    is that of `A_k^+ b`, exact: equation (1) for `A_k`, along the derivative of
    `A_k`, which couples the kept and cut-off singular vectors by terms in
    `1 / (s_kept² - s_cut²)`. (`jnp.linalg.pinv`'s derivative leaves those
    terms out: a relative error of the order of `s_cut / s_kept`.) It is
    defined where no singular value equals the cutoff, as the truncation jumps
    there.

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
        u, s, vh = _thin_svd(matrix)
        return SVDState(u, s, vh, operator_is_finite(matrix), pack_structures(operator))

    def compute(self, state: SVDState, vector, options):
        del options
        b = ravel_vector(vector, state.packed_structures)
        u, s, vh = state.u, state.s, state.vh
        keep, smax, smin = self._kept(u, s, vh)
        safe_s = select(keep, s, 1).astype(u.dtype)
        # `u^H b` as `b^T conj(u)` and `V c` as `c^T conj(vh)`: see `init`.
        coeffs = jnp.matmul(b.astype(u.dtype), jnp.conj(u), precision=_HI) / safe_s
        coeffs = select(keep, coeffs, 0)
        x = jnp.matmul(coeffs.astype(vh.dtype), jnp.conj(vh), precision=_HI)
        rcond = select(smax == 0, jnp.zeros_like(smin), smin / smax)
        # `rank` as the published lineax reports it: the singular values kept.
        stats = {"rcond": rcond, "rank": jnp.sum(keep)}
        return unravel_solution(x, state.packed_structures), RESULTS.successful, stats

    def _kept(self, u: Array, s: Array, vh: Array) -> tuple[Array, Array, Array]:
        """Which singular values are kept; the largest and smallest."""
        m, n = u.shape[0], vh.shape[1]
        if self.rcond is None:
            # (The published lineax's default, which Optimistix's solvers were
            # tuned with: NumPy's `eps * max(m, n)` kept a singular value 5.5e-6 of
            # the largest in a float32 fit, and
            # `IndirectLevenbergMarquardt` ran to its 200-step limit where lineax
            # 0.1.1 converges in 10.)
            rcond = 2 * jnp.finfo(s.dtype).eps * max(m, n)
        else:
            rcond = self.rcond
        # LAPACK's `gesdd` returns the singular values in descending order: the
        # largest is the first (as `jnp.linalg.lstsq` reads it), not a reduction,
        # which XLA:CPU would compile as two kernels of their own.
        if s.shape[-1] == 0:
            smax = smin = jnp.zeros((), s.dtype)
        else:
            smax, smin = s[0], s[-1]
        return s > rcond * smax, smax, smin

    def solved_operator(self, operator):
        # With the default cutoff the singular values cut off are zero to working
        # precision, and the operator is solved as it is. A larger `rcond` solves
        # with the best approximation of rank k, `A_k = U_k diag(s_k) V_k^H`:
        # equation (1) of the JVP must multiply by that, as its solves are with
        # `A_k^+`.
        if self.rcond is None:
            return operator
        u, s, vh = _thin_svd(operator.as_matrix())
        keep, _, _ = self._kept(u, s, vh)
        kept_s = select(keep, s, 0).astype(u.dtype)
        truncated = jnp.matmul(u * kept_s[None, :], vh, precision=_HI)
        return embed_like(operator, MatrixLinearOperator(truncated))

    def has_full_rank(self, state: SVDState):
        # (Float32, rows and columns graded by 10^-4, the error of `jax.grad` of
        # a solve with respect to `A`: tall 20 x 6 1.2e-4 -> 1.4e-6, wide 6 x 20
        # 7.3e-5 -> 2.1e-6; `jnp.linalg.lstsq`'s 4.7e-7 and 7.1e-7. A square
        # operator's gradient was as accurate as `jnp.linalg.pinv`'s already,
        # float32 8 x 8 5.8e-6 against 6.2e-6: left as it was.)
        if state.u.shape[0] == state.vh.shape[1]:
            return None
        return jnp.all(self._kept(state.u, state.s, state.vh)[0])

    def part_read(self, operator, other):
        # With a larger `rcond`, the tangent of `A_k` (see `solved_operator`) along
        # `other`, `dA`: the JVP then differentiates `A_k^+ b` exactly. In the basis
        # of the thin SVD `A = U diag(s) V^H`, with `P = U^H dA V`, entry (a, b) of
        # `dA_k` is `P_ab` for a and b both kept, 0 for both cut off, and for one
        # kept (singular value `q`) and one cut off (`p`)
        #   (q^2 P_ab + s_a s_b conj(P_ba)) / (q^2 - p^2),
        # from the derivative of the projection onto the kept left singular vectors
        # (eigenvectors of `A A^H`), as `A_k = U_k U_k^H A`. (Where the values cut
        # off are zero this is `P_ab`, and `dA_k` is the pseudoinverse's tangent
        # cut down to the kept singular vectors.) A tall `A` adds
        # `(I - U U^H) dA V_k V_k^H`, a wide one `U_k U_k^H dA (I - V V^H)`. The
        # denominator is positive: a kept singular value exceeds the cutoff, which a
        # cut-off one does not.
        if self.rcond is None:
            return other
        u, s, vh = _thin_svd(operator.as_matrix())
        keep, _, _ = self._kept(u, s, vh)
        d = other.as_matrix()
        m, n = d.shape
        r = s.shape[0]
        s = s.astype(u.dtype)
        u_h_d = jnp.matmul(jnp.conj(u).T, d, precision=_HI)
        p = jnp.matmul(u_h_d, jnp.conj(vh).T, precision=_HI)
        mixed = keep[:, None] != keep[None, :]
        q2 = jnp.square(select(keep, s, 0))
        q2 = q2[:, None] + q2[None, :]
        p2 = jnp.square(select(keep, 0, s))
        p2 = p2[:, None] + p2[None, :]
        coupled = (q2 * p + s[:, None] * s[None, :] * jnp.conj(p).T) / select(
            mixed, q2 - p2, 1
        )
        both = keep[:, None] & keep[None, :]
        block = select(both, p, select(mixed, coupled, 0))
        tangent = jnp.matmul(jnp.matmul(u, block, precision=_HI), vh, precision=_HI)
        kept = keep.astype(u.dtype)
        if m > r:
            d_v = jnp.matmul(d, jnp.conj(vh).T, precision=_HI)
            left = (d_v - jnp.matmul(u, p, precision=_HI)) * kept[None, :]
            tangent = tangent + jnp.matmul(left, vh, precision=_HI)
        if n > r:
            right = u_h_d - jnp.matmul(p, vh, precision=_HI)
            tangent = tangent + jnp.matmul(u * kept[None, :], right, precision=_HI)
        return embed_like(operator, MatrixLinearOperator(tangent))

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


_HI = jax.lax.Precision.HIGHEST


def _thin_svd(matrix: Array) -> tuple[Array, Array, Array]:
    """`(u, s, vh)` with `matrix = u diag(s) vh`, thin: for `init`, and again for
    the derivative of a truncated solve (XLA merges the two decompositions)."""
    # LAPACK reads column-major matrices, and `matrix` is row-major: in memory,
    # its transpose in column-major order. Decomposing `matrix.T = vh^T diag(s)
    # u^T` hands LAPACK those bytes (XLA copies them, as LAPACK overwrites its
    # input), where decomposing `matrix` had XLA transpose them first; and
    # `compute`'s products, written against the factors as LAPACK returns them,
    # fuse with their change of layout. XLA's compile time of a solve (n = 100,
    # float32, CPU): 1.13x -> 0.99x that of `jnp.linalg.lstsq`, which decomposes
    # `matrix`.
    # Not for a tall `matrix`: LAPACK's decomposition of `matrix.T`, wide, loses
    # accuracy that one of `matrix` keeps when the columns differ in scale (the
    # Jacobian of a least-squares fit whose unknowns have different units).
    # Float32, columns scaled by 10^U(-3, 3), 60 matrices of each shape: the
    # solution's relative error (geometric mean) 9.9e-7 -> 3.2e-7 for 4x2
    # (worst 2.1e-3 -> 1.5e-5), 8.6e-6 -> 3.2e-6 for 10x3, 1.0e-4 -> 5.8e-5 for
    # 30x5. The Newton step of Optimistix's `IndirectLevenbergMarquardt` on a 4x2
    # Jacobian with columns of norms 17 and 1e7 was 0.23% off (see
    # tests/test_clients.py). Lineax 0.1.1 and `jnp.linalg.lstsq` decompose
    # `matrix` (XLA's layout copy is back: the compile of a 200x100 solve 0.10 ->
    # 0.17 s, `jnp.linalg.lstsq`'s 0.12-0.17 s). Square and wide matrices keep
    # the transpose: for a wide one it is the tall orientation, and for a square
    # one neither is better (columns scaled favour `matrix`, rows `matrix.T`).
    if matrix.shape[0] > matrix.shape[1]:
        u, s, vh = jnp.linalg.svd(matrix, full_matrices=False)
        return u, s, vh
    vh_t, s, u_t = jnp.linalg.svd(matrix.T, full_matrices=False)
    return u_t.T, s, vh_t.T
