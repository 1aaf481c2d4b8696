"""`QR`: least squares (tall) and minimum norm (wide) by a thin QR decomposition."""

from typing import Any

import equinox as eqx
import jax
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
from .base import AbstractLinearSolver, nan_at_zero_pivots, norm1, rcond_estimate


class QRState(eqx.Module):
    """State of [`lineax.QR`][]. If `wide`, `q @ r` factorises the conjugate
    transpose `A^H` of the operator; otherwise it factorises `A` itself."""

    q: Array
    r: Array
    packed_structures: PackedStructures = eqx.field(static=True)
    wide: bool = eqx.field(static=True)


class QR(AbstractLinearSolver[QRState]):
    """QR decomposition (Householder, thin).

    - Square or tall operators of full column rank: the least-squares solution
        `argmin_x |Ax - b|`, as `R^{-1} Q^H b` from `A = QR`.
    - Wide operators of full row rank: the minimum-norm solution, as
        `Q R^{-H} b` from `A^H = QR`.

    Rank-deficient operators are not supported (use [`lineax.SVD`][]): an exactly
    zero diagonal entry of `R`, or non-finite output, gives
    [`lineax.RESULTS.singular`][], but a numerically rank-deficient operator
    gives a (large) answer with no correct digits, as LAPACK's `gels` does.
    `stats["rcond"]` holds an estimate of the reciprocal 1-norm condition number
    of `R` (as LAPACK's `trcon`), which is small in that case. Gradients of
    least-squares solutions use the pseudoinverse JVP (equations (2)/(3) of the
    paper), never differentiating through the factorisation.

    This solver reads no `options`.
    """

    def init(
        self, operator: AbstractLinearOperator, options: dict[str, Any]
    ) -> QRState:
        del options
        matrix = operator.as_matrix()
        m, n = matrix.shape
        wide = n > m
        if wide:
            matrix = jnp.conj(matrix.T)
        q, r = jnp.linalg.qr(matrix, mode="reduced")
        return QRState(q, r, pack_structures(operator), wide)

    def compute(self, state: QRState, vector, options):
        del options
        b = ravel_vector(vector, state.packed_structures)
        q, r = state.q, state.r
        hi = jax.lax.Precision.HIGHEST
        if state.wide:
            # A = R^H Q^H, minimum norm solution x = Q R^{-H} b.
            y = jsl.solve_triangular(r, b, trans="C", lower=False)
            y = nan_at_zero_pivots(y, jnp.diagonal(r))
            x = jnp.matmul(q, y, precision=hi)
        else:
            x = jsl.solve_triangular(
                r, jnp.matmul(jnp.conj(q.T), b, precision=hi), lower=False
            )
            x = nan_at_zero_pivots(x, jnp.diagonal(r))

        stats = {
            "rcond": rcond_estimate(
                norm1(jnp.triu(r)),
                r,
                solve=_rcond_solve,
                static=None,
                n=r.shape[0],
                dtype=r.dtype,
            )
        }
        return unravel_solution(x, state.packed_structures), RESULTS.successful, stats

    def transpose(self, state: QRState, options):
        # If A = QR then A^T = conj(A^H)... more precisely (A^T)^H = conj(A) =
        # conj(Q) conj(R): the transpose is factorised by the conjugated factors,
        # with the roles of "tall" and "wide" swapped.
        new = QRState(
            jnp.conj(state.q),
            jnp.conj(state.r),
            transpose_packed_structures(state.packed_structures),
            not state.wide,
        )
        return new, options

    def conj(self, state: QRState, options):
        new = QRState(
            jnp.conj(state.q), jnp.conj(state.r), state.packed_structures, state.wide
        )
        return new, options

    def assume_full_rank(self) -> bool:
        return True


def _rcond_solve(r: Array, static: None, matrix: Array, adjoint: bool) -> Array:
    del static
    return jsl.solve_triangular(r, matrix, trans="C" if adjoint else 0)
