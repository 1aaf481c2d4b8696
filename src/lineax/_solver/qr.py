"""`QR`: least squares (tall) and minimum norm (wide) by a thin QR decomposition."""

import functools as ft
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.lax as lax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir
from jaxtyping import Array

from .._misc import diagonal, lowering_for_export, power_of_two_normaliser
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
    inf_at_zero_pivots,
    is_own_array,
    norm1,
    operator_is_finite,
    rcond_estimate,
)


class QRState(eqx.Module):
    """State of [`lineax.QR`][]: a Householder QR factorisation `A = QR` as LAPACK's
    `geqrf` leaves it (`R` in the upper triangle of `reflectors`, the reflectors
    of `Q` below it, and their scalar factors `taus`). If `wide`, it factorises
    the conjugate transpose `A^H` of the operator; otherwise `A` itself. A
    non-square `M` (`A` or `A^H`) is factorised with its rows in the order
    `perm` (each column's largest entry first, see `_row_order`), `M[perm] =
    QR`, and `scale` is `None`; a square one with its rows scaled by powers of
    two (see `_row_scale`), `diag(scale) M = QR`, and `perm` is `None`. And
    whether every entry of `A` is finite."""

    reflectors: Array
    taus: Array
    perm: Array | None
    scale: Array | None
    finite: Array
    packed_structures: PackedStructures = eqx.field(static=True)
    wide: bool = eqx.field(static=True)


class QR(AbstractLinearSolver[QRState]):
    """QR decomposition (Householder, thin).

    - Square or tall operators of full column rank: the least-squares solution
        `argmin_x |Ax - b|`, as `R^{-1} Q^H b` from `A = QR`.
    - Wide operators of full row rank: the minimum-norm solution, as
        `Q R^{-H} b` from `A^H = QR`.

    `Q` is kept as its Householder reflectors (LAPACK `geqrf`) and applied with
    `ormqr`, never formed: forming it (`orgqr`) costs more than the
    factorisation, and every solve of a gradient (the primal, the transposed
    solve of reverse mode and the residual term of the least-squares JVP) needs
    only its action on one vector.

    Householder QR alone is normwise but not row-wise stable: rows scaled over
    many orders of magnitude, as in a weighted least-squares problem or a
    system whose equations have different units, lost up to six digits to LU
    at `10^±6`. So a square operator's rows are first scaled by powers of two
    (exactly) to a largest entry in `[1, 2)`, which changes no solution; the
    rows of a non-square `A` (of `A^H` for a wide operator), whose weights
    define its least-squares (minimum-norm) solution, are reordered instead,
    row `j` the one with the largest entry in column `j` (Powell and Reid's
    row pivoting, read in `A`).

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

    option_keys = frozenset()

    def init(
        self, operator: AbstractLinearOperator, options: dict[str, Any]
    ) -> QRState:
        check_lapack_dtype(operator, "QR")
        del options
        matrix = operator.as_matrix()
        own = is_own_array(matrix, operator)  # (see the finiteness test below)
        m, n = matrix.shape
        wide = n > m
        if wide:
            matrix = jnp.conj(matrix.T)
        # `mode="raw"` is LAPACK's `geqrf` output, transposed. (With gradients
        # stopped: JAX has no JVP rule for `geqrf`, and the state's derivative
        # is never used, as `linear_solve` differentiates with respect to the
        # operator and ignores the tangent of a state passed to it. A state made
        # by the user's own `init` under `jax.jvp` or `jax.grad`, to reuse with
        # `state=`, failed with "Differentiation rule for 'geqrf' not
        # implemented", as in lineax 0.1.1.)
        matrix = lax.stop_gradient(matrix)
        if m == n:
            perm, scale = None, _row_scale(matrix)
            scaled = matrix * scale.astype(matrix.dtype)[:, None]
        else:
            perm, scale = _row_order(matrix), None
            scaled = matrix[perm]
        reflectors, taus = jnp.linalg.qr(scaled, mode="raw")
        # The finiteness test reads the factors, not the matrix, unless the
        # matrix is the operator's own array (see `is_own_array`). Householder
        # QR never turns a non-finite entry finite: the updates of the trailing
        # columns add to each entry (`a - tau v w`: inf or NaN plus anything is
        # inf or NaN), a reflector's column is scaled by a finite nonzero or by
        # zero (inf * 0 is NaN) and a non-finite diagonal entry makes a
        # non-finite norm, hence `R`'s entry.
        return QRState(
            reflectors.mT,
            taus,
            perm,
            scale,
            operator_is_finite(matrix if own else reflectors),
            pack_structures(operator),
            wide,
        )

    def compute(self, state: QRState, vector, options):
        del options
        b = ravel_vector(vector, state.packed_structures)
        a, taus, perm, scale = state.reflectors, state.taus, state.perm, state.scale
        m, n = a.shape
        r = a[:n]  # `R` is its upper triangle, which is all the solves read
        if state.wide:
            # A^H = P^T Q R, so A = R^H Q^H P: the minimum norm solution is
            # x = P^T Q R^{-H} b (`x[perm] = Q R^{-H} b`). For a square one,
            # A^H = S^{-1} Q R, so A = R^H Q^H S^{-1} and x = S Q R^{-H} b.
            y = jsl.solve_triangular(r, b, trans="C", lower=False)
            y = inf_at_zero_pivots(y, diagonal(r))
            y = jnp.concatenate([y, jnp.zeros((m - n,), y.dtype)])
            if n == 0:
                # No reflectors: `Q` is the identity. (LAPACK's `ormqr` on the
                # `(m, 0)` reflectors of an operator with no rows, e.g. the
                # transpose of a tall one with no columns, killed the process
                # with SIGFPE in XLA:CPU's compiled solve.)
                x = y
            else:
                x = _ormqr(a, taus, y[:, None])[:, 0]
            if perm is not None:
                # (`x[perm] = z` as the values of a sort keyed by `perm`, as
                # in `lu_solve`: XLA:CPU compiles a scatter into larger
                # kernels.)
                x = lax.sort_key_val(perm, x)[1]
            if scale is not None:
                x = x * scale.astype(x.dtype)
        elif n == 0:
            x = jnp.zeros((0,), a.dtype)
        else:
            # P A = Q R: the least-squares solution is x = R^{-1} Q^H P b; for
            # a square one, S A = Q R and x = R^{-1} Q^H S b.
            if perm is not None:
                b = b[perm]
            if scale is not None:
                b = b * scale.astype(b.dtype)
            qhb = _ormqr_transposed(a, taus, b[:, None].astype(a.dtype))
            x = jsl.solve_triangular(r, qhb[:n, 0], lower=False)
            x = inf_at_zero_pivots(x, diagonal(r))

        stats = {
            "rcond": rcond_estimate(
                norm1(jnp.triu(r)),
                r,
                solve=_rcond_solve,
                static=None,
                n=n,
                dtype=r.dtype,
            )
        }
        return unravel_solution(x, state.packed_structures), RESULTS.successful, stats

    def transpose(self, state: QRState, options):
        # If A = QR then A^T = conj(A^H)... more precisely (A^T)^H = conj(A) =
        # conj(Q) conj(R): the transpose is factorised by the conjugated factors
        # (a reflector `I - tau v v^H` conjugates to `I - conj(tau) conj(v)
        # conj(v)^H`), with the roles of "tall" and "wide" swapped.
        # (The rows of `A` are the columns of `A^T`, i.e. the rows of `(A^T)^H`:
        # the same order `perm`, or the same real `scale`.)
        new = QRState(
            jnp.conj(state.reflectors),
            jnp.conj(state.taus),
            state.perm,
            state.scale,
            state.finite,
            transpose_packed_structures(state.packed_structures),
            not state.wide,
        )
        return new, options

    def conj(self, state: QRState, options):
        new = QRState(
            jnp.conj(state.reflectors),
            jnp.conj(state.taus),
            state.perm,
            state.scale,
            state.finite,
            state.packed_structures,
            state.wide,
        )
        return new, options

    def recorded_operator_finite(self, state: QRState) -> Array:
        return state.finite

    def assume_full_rank(self) -> bool:
        return True


# `_ormqr_p.bind(a, taus, c, transpose)` is `lax.linalg.ormqr(a, taus, c,
# transpose=transpose)` (leading batch dimensions allowed), lowered to LAPACK's
# `ormqr`, except in a program lowered for `jax.export`: that custom call has no
# compatibility guarantee, so `jax.export` refuses it ("Cannot serialize code with
# custom calls whose targets have no compatibility guarantees"), and every QR
# solve, hence `AutoLinearSolver` on every non-square operator, could not be
# exported. There the reflectors are applied one by one in a loop of plain
# StableHLO (the same products, in a few kernels per reflector).
_ormqr_p = Primitive("lineax_ormqr")


def _ormqr_impl(a, taus, c, *, transpose):
    return lax.linalg.ormqr(a, taus, c, transpose=transpose)


def _ormqr_abstract_eval(a, taus, c, *, transpose):
    del a, taus, transpose
    return jax.core.ShapedArray(c.shape, c.dtype)


def _ormqr_batch(operands, dims, *, transpose):
    size = next(x.shape[d] for x, d in zip(operands, dims) if d is not None)
    operands = [
        jnp.broadcast_to(x, (size, *x.shape)) if d is None else jnp.moveaxis(x, d, 0)
        for x, d in zip(operands, dims)
    ]
    return _ormqr_p.bind(*operands, transpose=transpose), 0


def _ormqr_by_reflectors(a, taus, c, *, transpose):
    """`Q c` (or `Q^H c`) for `Q = H_1 ... H_k`, `H_i = I - tau_i v_i v_i^H`, with
    `v_i` below the diagonal of column `i` of `a` and 1 on it (LAPACK's layout)."""
    k = taus.shape[-1]
    rows = jnp.arange(a.shape[-2])
    if transpose:
        taus = jnp.conj(taus)

    def reflect(step, c):
        # `Q^H c` applies `H_1^H` first, `Q c` applies `H_k` first.
        i = step if transpose else k - 1 - step
        column = lax.dynamic_index_in_dim(a, i, axis=-1, keepdims=False)
        v = jnp.where(rows == i, 1, jnp.where(rows > i, column, 0)).astype(c.dtype)
        tau = lax.dynamic_index_in_dim(taus, i, axis=-1, keepdims=True)
        vhc = jnp.einsum(
            "...m,...mp->...p", jnp.conj(v), c, precision=lax.Precision.HIGHEST
        )
        return c - tau[..., None] * v[..., :, None] * vhc[..., None, :]

    return lax.fori_loop(0, k, reflect, c)


def _ormqr_lowering(ctx, a, taus, c, *, transpose):
    if lowering_for_export(ctx):
        fun = _ormqr_by_reflectors
    else:
        fun = _ormqr_impl
    lowering = mlir.lower_fun(ft.partial(fun, transpose=transpose), False)
    return lowering(ctx, a, taus, c)


_ormqr_p.def_impl(_ormqr_impl)
_ormqr_p.def_abstract_eval(_ormqr_abstract_eval)
batching.primitive_batchers[_ormqr_p] = _ormqr_batch
mlir.register_lowering(_ormqr_p, _ormqr_lowering)


def _ormqr_of(transpose: bool):
    """`lax.linalg.ormqr(a, taus, c, transpose=transpose)` (`Q c` or `Q^H c`),
    with a batching rule that keeps one `Q` for many right-hand sides: under
    `vmap` over the vector only (one factorisation, many solves) the batch
    becomes columns of `c`. JAX's own rule broadcasts the reflectors to the batch
    (a copy of the whole factorisation per right-hand side, and one `ormqr` per
    element): for 400 right-hand sides of a 400x400 QR, 330 -> 6.4 ms of CPU and
    a 512 MB copy less. (No reverse mode through it: the solve's derivatives are
    solves themselves, never derivatives of `compute`.)"""

    @jax.custom_batching.custom_vmap
    def apply(a, taus, c):
        return _ormqr_p.bind(a, taus, c, transpose=transpose)

    @apply.def_vmap
    def rule(axis_size, in_batched, a, taus, c):
        a_batched, taus_batched, c_batched = in_batched
        if a_batched or taus_batched:
            # (Many factorisations: one `ormqr` per element.)
            axes = [0 if batched else None for batched in in_batched]
            batched_ormqr = jax.vmap(
                lambda a, taus, c: _ormqr_p.bind(a, taus, c, transpose=transpose),
                in_axes=axes,
            )
            return batched_ormqr(a, taus, c), True
        # (The batch is moved into the columns by `apply` itself, so that an
        # enclosing `vmap` meets this rule again.)
        _, m, k = c.shape
        columns = jnp.moveaxis(c, 0, 1).reshape(m, axis_size * k)
        out = apply(a, taus, columns).reshape(m, axis_size, k)
        return jnp.moveaxis(out, 1, 0), True

    return apply


_ormqr = _ormqr_of(False)
_ormqr_transposed = _ormqr_of(True)


def _row_scale(matrix: Array) -> Array:
    """For a square `matrix`, the powers of two `s` (real) that bring each row's
    largest entry into `[1, 2)` (see `power_of_two_normaliser`): `diag(s) A x =
    diag(s) b` has the solution of `A x = b`, and both products are exact.

    Householder QR of the rows so equilibrated is backward stable row by row
    (its normwise backward error is small against each row, each of size about
    one), and, as Householder QR is invariant under a scaling of the columns,
    the rows and columns of `D1 B D2` with `B` well-conditioned are as good as
    undone. Measured, float32, 30x30, largest relative error of a solution
    component, geometric mean over 8 seeds, rows scaled / sorted by size (the
    order of the earlier `_rows_by_decreasing_size`) / chosen per column
    (`_row_order`): rows scaled by `10^U(-6, 6)` 1.5e-4 / 3.8e-4 / 3.6e-4;
    with a unit upper triangular `T` in place of a dense matrix, 4.4e-7 / 390 /
    4.4e-7; `D T D^-1`, `D` of `10^U(-6, 6)`, 4.1e-7 / 1.8 / 4.1e-7; its
    transpose 6.4e-5 / 2.5e-4 / 1.1e-2; `D B D^-1`, `B` dense, 2.8e-4 / 6.3e-4 /
    6.5e-4. Cheaper too: a reduction and a product, where an order costs a
    loop, a sort and gathers. (Not for a non-square operator: there a row
    scaling is a weighting, which changes the least-squares or minimum-norm
    solution.)"""
    size = jnp.max(jnp.abs(matrix), axis=1, initial=0)
    return power_of_two_normaliser(size)


def _row_order(matrix: Array) -> Array:
    """The order of `matrix`'s rows for the factorisation: row `j` (of the first
    `min(m, n)`) is the row not yet chosen with the largest entry in column `j`
    of `matrix` (as partial pivoting chooses, but read in `matrix` itself, not
    updated); the rows left (a tall matrix's last `m - n`) follow by decreasing
    largest entry. For a non-square matrix: a square one has its rows scaled
    instead (`_row_scale`), more accurate and cheaper; the measurements below
    were made on square ones, with this order.

    Householder QR is normwise backward stable, but not row-wise: a row much
    smaller than the others, factorised after larger rows, is perturbed
    relative to the largest ones, so a system with rows scaled over many orders
    of magnitude (a weighted least-squares problem, or a square system whose
    equations have different units) loses the accuracy its row scaling does not
    cost in exact arithmetic. Powell and Reid (1969) choose each Householder
    step's pivot row as the largest in its column; Cox and Higham (1998,
    "Stability of Householder QR factorization for weighted least squares
    problems") prove row-wise stability with the rows sorted by decreasing size
    instead, and column pivoting. Without column pivoting (LAPACK's `geqrf`),
    sorting the rows by size is not enough: a step whose column's only large
    entries lie in a small row reflects that row into a large one, which
    rounds it away. The rows of a triangular matrix scaled on both sides
    (`D T D^-1`: `I - h J` of an implicit ODE step whose state components are in
    different units), sorted by size, lost every digit of the small solution
    components (float32, 30x30, `D` of `10^U(-6, 6)`: relative errors 0.03 to
    10, once `singular`; 3x3: 0.99, and Diffrax's
    `VeryChord(linear_solver=lx.QR())` reached `max_steps`) where the unsorted
    factorisation (lineax 0.1.1's) and LU are exact to 1e-6. Chosen per column,
    a triangular matrix keeps its order and a dense one with scaled rows is
    sorted by size, as before. Float32, largest relative error of a component
    (geometric mean over seeds), unsorted / sorted by size / chosen per
    column: rows scaled by `10^U(-6, 6)` 30x30 67 / 2.9e-4 / 2.3e-4, 200x100
    2.1e-2 / 1.3e-5 / 1.5e-5 (normwise); `D T D^-1` 3.5e-7 / 2.1 / 3.5e-7; its
    transpose 33 / 2.5e-4 / 5.8e-3; `D B D^-1`, `B` dense, 90 / 7.2e-4 /
    6.6e-4.

    The cost is a loop over the columns in `init` (each step an `argmax` over
    the rows, `O(mn)` in all), a sort of the row keys and a gather of the
    matrix, and a gather (tall) or a sort (wide) of the vector in each solve."""
    magnitude = jnp.abs(matrix)
    m, n = matrix.shape
    k = min(m, n)

    # Row `j` of the order is the unchosen row with the largest entry in column
    # `j` (ties: the first), read in `A` itself, not updated as the
    # factorisation updates it.
    def choose(j, carry):
        chosen, position = carry
        column = lax.dynamic_index_in_dim(magnitude, j, axis=1, keepdims=False)
        row = jnp.argmax(jnp.where(chosen, -1, column))
        return chosen.at[row].set(True), position.at[row].set(j)

    # Each row's largest entry, for the rows left.
    largest = jnp.max(magnitude, axis=1, initial=0)
    if k == 0:
        # No loop without rows or columns: a column of an `(m, 0)` matrix
        # cannot be sliced, even in a loop of no steps.
        chosen, position = jnp.zeros((m,), bool), jnp.full((m,), k, jnp.int32)
    else:
        # The start made from the matrix (`largest < 0` is false, NaN
        # included), not as constants: inside `jax.shard_map` with
        # `check_vma=True` a constant start is invariant over the mesh axes
        # where the loop's output, made from the matrix, varies, and the loop
        # failed to trace ("carry input and carry output must have equal
        # types"). (From `largest`, which is computed anyway: from a column of
        # the matrix, XLA computed a Jacobian given as the matrix once more,
        # for that column.)
        none = largest < 0
        start = (none, jnp.where(none, 0, k).astype(jnp.int32))
        chosen, position = lax.fori_loop(0, k, choose, start)
    # The rows not chosen (a tall matrix's last `m - n`) follow, by decreasing
    # largest entry.
    size = jnp.where(chosen, 0, largest)
    # Sorted as integers: the bits of a non-negative float (NaN included) order
    # as it does, and an integer sort's comparator is one comparison where a
    # float's (`jnp.argsort`) handles NaN and signed zeros (26 -> 11 StableHLO
    # operations). The order is unsigned, whose gathers skip the wrapping of
    # negative indices (9 -> 3 operations each).
    bits = lax.bitcast_convert_type(size, _SIGNED_OF_SIZE[size.dtype.itemsize])
    rows = lax.iota(jnp.uint32, m)
    return lax.sort((position, lax.neg(bits), rows), num_keys=2, is_stable=True)[2]


_SIGNED_OF_SIZE = {4: jnp.int32, 8: jnp.int64}


def _rcond_solve(r: Array, static: None, matrix: Array, adjoint: bool) -> Array:
    del static
    return jsl.solve_triangular(r, matrix, trans="C" if adjoint else 0)
