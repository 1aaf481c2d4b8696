"""`LU`: Gaussian elimination with partial pivoting."""

from typing import Any

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jaxtyping import Array, Int

from .._misc import diagonal, select
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
    check_square,
    inf_at_zero_pivots,
    is_own_array,
    norm1,
    operator_is_finite,
    rcond_estimate,
    rcond_is_exact,
)


class LUState(eqx.Module):
    """State of [`lineax.LU`][]: the packed factors `L` (unit lower) and `U` (upper)
    of `A[permutation] = L U`, whether to solve with the transpose, the 1-norm
    of `A` (for the condition estimate; `None` where it is computed from the
    factors instead, see `LU.init`), and whether every entry of `A` is
    finite."""

    lu: Array
    permutation: Int[Array, " n"]
    norm: Array | None
    finite: Array
    packed_structures: PackedStructures = eqx.field(static=True)
    transposed: bool = eqx.field(static=True)


class LU(AbstractLinearSolver[LUState]):
    """LU decomposition with partial pivoting (LAPACK `getrf`).

    For square, nonsingular operators. An exactly zero pivot, or non-finite
    output, gives [`lineax.RESULTS.singular`][] (as LAPACK's `getrf` reports);
    nearly singular matrices are otherwise solved as accurately as their condition
    number allows. `stats["rcond"]` holds an estimate of the reciprocal 1-norm
    condition number of `A` (as LAPACK's `gecon`): a value near machine epsilon
    means the solution may have no correct digits. A solve with the transpose
    from the same factors (the cotangent solve of reverse mode) reports the same
    number, which is the infinity-norm condition number of the transpose.

    This solver reads no `options`.
    """

    option_keys = frozenset()

    def init(
        self, operator: AbstractLinearOperator, options: dict[str, Any]
    ) -> LUState:
        check_lapack_dtype(operator, "LU")
        del options
        check_square(operator, "LU")
        # Keep the permutation (not LAPACK's sequence of row swaps), so that each
        # solve is one gather instead of a loop over the pivots.
        matrix = operator.as_matrix()
        lu, _, permutation = lax.linalg.lu(matrix)
        # The finiteness test reads the factors, not the matrix, unless the
        # matrix is one of the operator's own arrays (see `is_own_array`).
        # Each entry of `lu` is its entry of `P A` updated (`a - l u`, divided by
        # a pivot), so a NaN or inf in `A` stays non-finite there (divided by an
        # infinite pivot: NaN). Reading a matrix that is computed made XLA
        # recompute it for the test (Diffrax's ImplicitEuler, n = 100: 196 ->
        # 172 ms for 1978 steps; 0.1.1: 159 ms).
        # Reading LAPACK's column-major factor made XLA:CPU transpose it into an
        # n x n copy of its own before its (row-major) library reduction: one n^2
        # temporary more than the matrix's test (`lx.invert(op).mv` under `jit`,
        # n = 100: 3.02 -> 2.04 n^2; `lu_solve(lu_factor(A), b)`: 2.02).
        own = is_own_array(matrix, operator)
        # The 1-norm of `A`, which only the condition estimate reads, from `A`
        # where reading it is free: the operator's own matrix, or a large one
        # (whose estimate is O(n^2): the norm of `L U` would be O(n^3)). Of a
        # small computed matrix (a Jacobian's: Optimistix's Newton, Diffrax's
        # implicit solvers) it is `|L U|_1`, computed by `compute`, so that
        # XLA removes it with the estimate wherever `stats` is not read. Read
        # here, it made XLA compute the matrix a second time for it (`getrf`
        # overwrites its own copy), kept with the state in the caller's loops
        # whether read or not: Diffrax's Kvaerno5 on Robertson's problem,
        # 82 -> 78 kernels compiled, the Jacobian twice in every `init`.
        norm = norm1(matrix) if own or not rcond_is_exact(lu.shape[0]) else None
        return LUState(
            lu,
            permutation,
            norm,
            operator_is_finite(matrix if own else lu),
            pack_structures(operator),
            False,
        )

    def compute(self, state: LUState, vector, options):
        del options
        b = ravel_vector(vector, state.packed_structures)
        x = lu_solve(
            state.lu, state.permutation, b, state.transposed, diagonal(state.lu)
        )

        # The condition number of `A` also for a solve with its transpose: no
        # second norm of `A` in every factorisation for it (the 1-norm of `Aᵀ`,
        # a pass over `A` of its own), which no user sees (a transposed state
        # is made inside reverse mode only). The un-jitted 10 x 10 solve: 1122 ->
        # 9xx flops by XLA's estimate, under the 1000 above which XLA:CPU hands
        # a program to its thread pool and back (about 15 us).
        norm = _factors_norm(state.lu) if state.norm is None else state.norm
        stats = {
            "rcond": rcond_estimate(
                norm,
                (state.lu, state.permutation),
                solve=_rcond_solve,
                static=False,
                n=state.lu.shape[0],
                dtype=state.lu.dtype,
                inverse=_rcond_inverse,
            )
        }
        return unravel_solution(x, state.packed_structures), RESULTS.successful, stats

    def transpose(self, state: LUState, options):
        new = LUState(
            state.lu,
            state.permutation,
            state.norm,
            state.finite,
            transpose_packed_structures(state.packed_structures),
            not state.transposed,
        )
        return new, options

    def conj(self, state: LUState, options):
        new = LUState(
            jnp.conj(state.lu),
            state.permutation,
            state.norm,
            state.finite,
            state.packed_structures,
            state.transposed,
        )
        return new, options

    def recorded_operator_finite(self, state: LUState) -> Array:
        return state.finite

    def assume_full_rank(self) -> bool:
        return True


def lu_solve(
    lu: Array, perm: Array, b: Array, transposed: bool, pivots: Array | None = None
) -> Array:
    """Solve `A x = b` (or `A^T x = b`) from `A[perm] = L U`; `b` is 1-D or 2-D.
    With `pivots` (the diagonal of `U`), infinity where a pivot is zero (see
    `inf_at_zero_pivots`)."""
    if transposed:
        # A = P^T L U, so A^T = U^T L^T P: solve U^T y = b, L^T z = y, P x = z.
        z = _factors_solve(lu, b, transposed)
        if pivots is not None:
            # Before the permutation, not after: the infinity only has to be
            # somewhere in `x`, and here XLA fuses it into the kernel that reads
            # the triangular solve's output, where after the permutation's sort it
            # was a kernel of its own (`jax.grad` of an LU solve, n = 100).
            z = _inf_at_zero(z, pivots)
        if z.ndim == 1:
            # `x[perm] = z`, as the values of a sort keyed by `perm` (as JAX's
            # `lu_solve` inverts the permutation): XLA:CPU compiles the scatter
            # into larger kernels. (`jax.grad` of an LU solve, n = 100: 26 -> 23
            # kernels, compile time -12%.)
            return lax.sort_key_val(perm, z)[1]
        return jnp.zeros_like(z).at[perm].set(z)
    x = _factors_solve(lu, b[perm], transposed)
    if pivots is None:
        return x
    return _inf_at_zero(x, pivots)


def _inf_at_zero(x: Array, pivots: Array) -> Array:
    """`inf_at_zero_pivots` of a solution `x` of `lu_solve`, 1-D or 2-D (the
    pivots along its rows)."""
    return inf_at_zero_pivots(x, pivots if x.ndim == 1 else pivots[:, None])


def _factors_solve(lu: Array, b: Array, transposed: bool) -> Array:
    """`(L U)^{-1} b`, or `(L U)^{-T} b`: the triangular solves of `lu_solve`."""
    if transposed:
        y = jsl.solve_triangular(lu, b, trans=1, lower=False)
        return jsl.solve_triangular(lu, y, trans=1, lower=True, unit_diagonal=True)
    y = jsl.solve_triangular(lu, b, lower=True, unit_diagonal=True)
    return jsl.solve_triangular(lu, y, lower=False)


def _factors_norm(lu: Array) -> Array:
    """`|A|_1` from the factors of `A[permutation] = L U`: `|L U|_1`, as a
    permutation of the rows changes no column sum. (Equal to the norm of `A` up
    to the rounding of the product: `L U` is `A[permutation]` up to the
    backward error of the factorisation.) Of a state's own conjugate or
    transpose alike (`conj` conjugates `L` and `U`; a transposed state reports
    the condition number of the matrix factored, see `LU`)."""
    # (One pair of iotas for both masks: `jnp.tril`, `jnp.triu` and `jnp.eye`
    # make theirs each, traced and lowered with every solve.)
    row = lax.broadcasted_iota(jnp.int32, lu.shape, 0)
    column = lax.broadcasted_iota(jnp.int32, lu.shape, 1)
    lower = select(row > column, lu, (row == column).astype(lu.dtype))
    upper = select(row <= column, lu, jnp.zeros((), lu.dtype))
    return norm1(jnp.matmul(lower, upper, precision=lax.Precision.HIGHEST))


def _rcond_inverse(arrays, transposed: bool, identity: Array) -> Array:
    # `A^{-1} = U^{-1} L^{-1} P` and `A^{-T} = P^T L^{-T} U^{-T}`, whose 1-norms
    # are those of `U^{-1} L^{-1}` and `L^{-T} U^{-T}`: a permutation of the
    # columns (rows) changes no maximum column sum.
    lu, _ = arrays
    return _factors_solve(lu, identity, transposed)


def _rcond_solve(arrays, transposed: bool, matrix: Array, adjoint: bool) -> Array:
    lu, perm = arrays
    if adjoint:
        # A^{-H} X = conj(A^{-T} conj(X)).
        return jnp.conj(lu_solve(lu, perm, jnp.conj(matrix), not transposed))
    return lu_solve(lu, perm, matrix, transposed)
