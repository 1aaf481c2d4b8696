"""`Tridiagonal`: the Thomas algorithm for tridiagonal operators."""

from typing import Any

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array

from .._misc import tree_all_finite
from .._operator.base import AbstractLinearOperator, is_tridiagonal, tridiagonal
from .._operator.tridiagonal_operator import TridiagonalLinearOperator
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
    check_square,
    check_tag,
    embed_like,
    rcond_estimate,
)
from .lu import lu_solve


class TridiagonalState(eqx.Module):
    """State of [`lineax.Tridiagonal`][]: the three bands, padded to length `n` as
    `jax.lax.linalg.tridiagonal_solve` expects, and whether they are finite."""

    diagonal: Array
    lower: Array  # lower[0] = 0, lower[i] = A[i, i - 1]
    upper: Array  # upper[n - 1] = 0, upper[i] = A[i, i + 1]
    finite: Array
    packed_structures: PackedStructures = eqx.field(static=True)


class Tridiagonal(AbstractLinearSolver[TridiagonalState]):
    """Solves with a tridiagonal operator in O(n) by the Thomas algorithm
    (`jax.lax.linalg.tridiagonal_solve`; LAPACK `gtsv` on CPU, cuSPARSE on GPU).

    The operator must be tagged [`lineax.tridiagonal_tag`][] (or be a
    [`lineax.TridiagonalLinearOperator`][]). Elimination pivots by rows on CPU
    (`gtsv`) and GPU (`gtsv2`; up to n = 2 a dense LU), so a zero on the
    diagonal is no obstacle there; other platforms (TPU) run JAX's Thomas
    algorithm without pivoting, for which the operator should be e.g. diagonally
    dominant or definite. Non-finite output gives [`lineax.RESULTS.singular`][].
    `stats["rcond"]` holds an estimate of the reciprocal 1-norm condition number
    (as LAPACK's `gtcon`), from O(n) solves.

    This solver reads no `options`.
    """

    option_keys = frozenset()

    def init(
        self, operator: AbstractLinearOperator, options: dict[str, Any]
    ) -> TridiagonalState:
        check_lapack_dtype(operator, "Tridiagonal")
        del options
        check_square(operator, "Tridiagonal")
        check_tag(
            is_tridiagonal(operator),
            "Tridiagonal",
            "tridiagonal",
            "`lx.tridiagonal_tag`",
        )
        diag, lower, upper = tridiagonal(operator)
        zero = jnp.zeros((1,), diag.dtype)
        n = diag.shape[0]
        # (Cut to `n`: the bands of an operator of size 0 have size 0, not -1.)
        # The test of the bands, for those of an operator computed from finite
        # parts, which can overflow: elimination divides by an infinite entry to
        # a finite 0. (XLA removes it where `linear_solve` tests the operator's
        # own arrays instead.)
        return TridiagonalState(
            diag,
            jnp.concatenate([zero, lower.astype(diag.dtype)])[:n],
            jnp.concatenate([upper.astype(diag.dtype), zero])[:n],
            tree_all_finite((diag, lower, upper)),
            pack_structures(operator),
        )

    def compute(self, state: TridiagonalState, vector, options):
        del options
        b = ravel_vector(vector, state.packed_structures)
        x = _solve(state.lower, state.diagonal, state.upper, b[:, None])[:, 0]
        # Column j of A holds upper[j - 1], diagonal[j] and lower[j + 1].
        upper = jnp.abs(jnp.roll(state.upper, 1))
        lower = jnp.abs(jnp.roll(state.lower, -1))
        norm = jnp.max(jnp.abs(state.diagonal) + upper + lower, initial=0)
        stats = {
            "rcond": rcond_estimate(
                norm,
                (state.lower, state.diagonal, state.upper),
                solve=_rcond_solve,
                static=None,
                n=state.diagonal.shape[0],
                dtype=state.diagonal.dtype,
            )
        }
        return unravel_solution(x, state.packed_structures), RESULTS.successful, stats

    def transpose(self, state: TridiagonalState, options):
        lower, upper = _transpose_bands(state.lower, state.upper)
        new = TridiagonalState(
            state.diagonal,
            lower,
            upper,
            state.finite,
            transpose_packed_structures(state.packed_structures),
        )
        return new, options

    def conj(self, state: TridiagonalState, options):
        new = TridiagonalState(
            jnp.conj(state.diagonal),
            jnp.conj(state.lower),
            jnp.conj(state.upper),
            state.finite,
            state.packed_structures,
        )
        return new, options

    def recorded_operator_finite(self, state: TridiagonalState) -> Array:
        return state.finite

    def part_read(self, operator, other):
        # The solve reads the three bands only. (An operator of size 0 has no
        # part to drop, and no `TridiagonalLinearOperator`.)
        if operator.in_size() == 0:
            return other
        return embed_like(operator, TridiagonalLinearOperator(*tridiagonal(other)))

    def assume_full_rank(self) -> bool:
        return True


def _transpose_bands(lower: Array, upper: Array) -> tuple[Array, Array]:
    """The padded (lower, upper) bands of the transpose: the new lower band is the
    old upper one, shifted to the padding convention, and vice versa."""
    zero = jnp.zeros((1,), lower.dtype)
    n = lower.shape[0]
    return (
        jnp.concatenate([zero, upper[:-1]])[:n],
        jnp.concatenate([lower[1:], zero])[:n],
    )


def _solve(lower: Array, diagonal: Array, upper: Array, b: Array) -> Array:
    b = b.astype(diagonal.dtype)
    n = diagonal.shape[0]
    # (A symbolic size, from `jax.export.symbolic_shape`, is solved as a large one:
    # on a GPU, one that is 1 or 2 at run time meets the unpivoted case below.)
    if isinstance(n, int) and n <= 2:
        # On GPUs, `tridiagonal_solve` runs cuSPARSE's pivoting `gtsv2` only from
        # n = 3: below, JAX lowers it to the Thomas algorithm without pivoting,
        # which divides by `diagonal[0]`, so a well-conditioned `[[0, 1], [1, 0]]`
        # gave NaN there (reported singular), where LAPACK's `gtsv` on the CPU
        # pivots. A dense LU with partial pivoting of at most 2x2 is as cheap, and
        # the same on every platform (and needs no case for n = 0).
        matrix = jnp.diag(diagonal)
        if n == 2:
            matrix = matrix.at[0, 1].set(upper[0]).at[1, 0].set(lower[1])
        # (Not `jnp.linalg.solve`, whose `custom_linear_solve` holds products of
        # default precision.)
        lu, _, permutation = lax.linalg.lu(matrix)
        return lu_solve(lu, permutation, b, transposed=False)
    return lax.linalg.tridiagonal_solve(lower, diagonal, upper, b)


def _rcond_solve(bands, static: None, b: Array, adjoint: bool) -> Array:
    del static
    lower, diagonal, upper = bands
    if adjoint:
        lower, upper = _transpose_bands(jnp.conj(lower), jnp.conj(upper))
        diagonal = jnp.conj(diagonal)
    return _solve(lower, diagonal, upper, b)
