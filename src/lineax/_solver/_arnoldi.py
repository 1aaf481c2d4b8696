"""What GMRES and FGMRES share: the basis arithmetic, the Arnoldi step with CGS2 and
Givens rotations, the cycle's least-squares solution and its restart.

The two differ only in where the update of a cycle lives. GMRES builds it as
`P V y`, FGMRES stores the preconditioned vectors `Z = [P v_0, ...]` and builds
`Z y` (Saad, Algorithm 9.6), so `AbstractArnoldiSolver.flexible` decides whether a
cycle carries `Z`."""

import functools as ft
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import jax.tree_util as jtu
import numpy as np
from equinox import AbstractVar
from jaxtyping import Array, ArrayLike, PyTree, Scalar

from .._misc import select
from .._operator.base import AbstractLinearOperator
from .._solution import RESULTS, results_where
from ._krylov import (
    AbstractKrylovSolver,
    AbstractStackedScalars,
    apply,
    FLOOR_GAP,
    FLOOR_PATIENCE,
    iterate,
    Iteration,
    KrylovState,
    MAX_INT32,
    norm2,
    safe_div,
    tree_scale,
    tree_sub,
    update_rows,
)


_HIGHEST = lax.Precision.HIGHEST
# The step indices are in range by construction (`0 <= j < m`), so they are used
# with `lax.dynamic_*` without the wrapping of negative indices (and not as
# `x[j]`/`x.at[j].set`, which would add it and a scatter's bounds test): each is
# a few kernels more per step to compile. (Rows are read and written with
# `dynamic_slice_in_dim` and `dynamic_update_slice_in_dim`: the `_index_in_dim`
# versions are nested `jit`s.)
_IN_RANGE = {"allow_negative_indices": False}


#
# Vectors `V` stored as PyTree leaves with a leading axis.
#


def basis_dot(basis: PyTree[Array], w: PyTree[Array]) -> Array:
    """`V^H w` for vectors `V` stored as leaves with a leading axis."""
    terms = [
        jnp.tensordot(jnp.conj(v), x, axes=x.ndim, precision=_HIGHEST)
        for v, x in zip(jtu.tree_leaves(basis), jtu.tree_leaves(w))
    ]
    return sum(terms[1:], terms[0])


def basis_combine(basis: PyTree[Array], h: Array) -> PyTree[Array]:
    """`V h` for vectors `V` stored as leaves with a leading axis."""
    return jtu.tree_map(
        lambda v: jnp.tensordot(h.astype(v.dtype), v, axes=1, precision=_HIGHEST), basis
    )


def basis_set(basis: PyTree[Array], j: Array, x: PyTree[Array]) -> PyTree[Array]:
    """`V` with its `j`-th vector replaced by `x`."""
    return jtu.tree_map(
        lambda v, xi: update_rows(v, lax.expand_dims(xi.astype(v.dtype), (0,)), j),
        basis,
        x,
    )


def basis_get(basis: PyTree[Array], j: Array) -> PyTree[Array]:
    """The `j`-th vector of `V`."""
    return jtu.tree_map(
        lambda v: lax.squeeze(lax.dynamic_slice_in_dim(v, j, 1, 0, **_IN_RANGE), (0,)),
        basis,
    )


#
# One restarted cycle.
#


class _Cycle(eqx.Module):
    """One cycle of (flexible) GMRES. The Arnoldi relation is `A P V_k = V_{k+1} H_k`
    (GMRES), or `A Z_k = V_{k+1} H_k` with `z_j = P_j v_j` for whatever `P_j` the
    preconditioner was at step `j` (FGMRES)."""

    x: PyTree[Array]  # the iterate the cycle started from
    beta: Scalar  # 2-norm of its residual
    basis: PyTree[Array]  # V: leaves of shape (m + 1, *leaf_shape); unused rows 0
    # Z: (m, *leaf_shape); None for GMRES, and for FGMRES without a preconditioner.
    directions: PyTree[Array] | None
    rotations: Array  # (m + 1, m + 1): the product Q of the Givens rotations so far
    # (m, m): the transpose of R = Q H (upper triangular; its triangle is read),
    # column `j` of R in row `j`, for the columns in use; the identity's rows in
    # the others. Transposed because LAPACK's triangular solve reads R in
    # column-major order, which is R^T in XLA's row-major one: carried as R, XLA
    # made a transposing copy of it before every solve, a kernel of its own.
    r_factor: Array
    # The cycle's scalars, a packed `_CycleScalars` (read with `_scalars_of`).
    scalars: Array


class _CycleScalars(AbstractStackedScalars):
    """A cycle's scalars, stacked (see `AbstractStackedScalars`), as floats: the
    counts and flags are small integers, exact in them. Carried one by one, the
    four a step changes were four kernels at the end of every step (XLA:CPU
    compiles each, about 40 ms), and the three a restart sets three more."""

    k: ArrayLike  # number of basis vectors (columns of H) in use
    estimate: ArrayLike  # |last entry of Q beta e_1| = 2-norm of the residual
    invariant: ArrayLike  # h_{k+1,k} = 0: the cycle can go no further
    degenerate: ArrayLike  # the new column made the Hessenberg matrix singular
    # No further progress is possible: a cycle could not make its first step
    # (a breakdown), or `FLOOR_PATIENCE` cycles ended below the floor (stagnation).
    # (One flag: the inner loop tests it at every step.)
    halt: ArrayLike
    # The float32 floor (see `restart` in `compute`): the 2-norm of the true
    # residual when it last halved, and the cycles since then that ended with the
    # estimate more than `FLOOR_GAP` below the true residual. The reference is
    # -1 until the first restart sets it (it is never negative), and reads as
    # infinity: stacked, an infinite reference was an error under
    # `jax_debug_infs` outside `jit` (as in `iterate`).
    floor_ref: ArrayLike
    floor_hits: ArrayLike

    def pack(self, dtype) -> Array:
        # At least single precision: `k` counts to the restart length exactly.
        wide = dtype if jnp.finfo(dtype).bits >= 32 else jnp.float32
        return super().pack(wide)


# (The layout: every field is carried.)
_LAYOUT = _CycleScalars(0, 0, 0, 0, 0, 0, 0)


def _scalars_of(c: _Cycle) -> Any:
    """The fields of `c.scalars`, each sliced once when first read; floats of the
    packed dtype (the flags are 0 or 1)."""
    return _LAYOUT.unpack(c.scalars)


def _givens(a, b, cdtype):
    """The complex Givens rotation `[[cs, sn], [-conj(sn), cs]]` with real `cs` that
    maps `(a, b)` to `(rho, 0)`: `(cs, sn, rho, |rho|)`."""
    if not jnp.issubdtype(cdtype, jnp.complexfloating):
        # The real case without the phase of `a` (`cs` may be negative): the same
        # rotation up to the sign of both its rows, which changes `Q` and `R` by
        # the same signs and the least-squares solution not at all (exactly: a
        # sign is exact), with fewer operations to compile into every step.
        denom = jnp.sqrt(a**2 + b**2)
        safe_denom = select(denom == 0, 1, denom)
        return a / safe_denom, b / safe_denom, denom, denom
    abs_a = jnp.abs(a)
    denom = jnp.sqrt(abs_a**2 + jnp.abs(b) ** 2)
    safe_denom = select(denom == 0, 1, denom).astype(cdtype)
    phase = select(abs_a == 0, 1, a / select(abs_a == 0, 1, abs_a).astype(cdtype))
    cs = abs_a.astype(cdtype) / safe_denom
    sn = phase * jnp.conj(b) / safe_denom
    return cs, sn, phase * denom.astype(cdtype), denom


# The largest identity matrix (entries) written into the program as a constant.
_CONSTANT_IDENTITY = 128 * 128


def _identity(n: int, dtype: Any) -> Array:
    """The `n x n` identity: a constant of the program up to `_CONSTANT_IDENTITY`
    entries (no kernel: XLA:CPU made `jnp.eye` one for each of the two identities
    of a cycle, about 40 ms of compile time each), else `jnp.eye` (a constant
    that large would make the program itself large)."""
    if n * n <= _CONSTANT_IDENTITY:
        return jnp.asarray(np.eye(n, dtype=dtype))
    return jnp.eye(n, dtype=dtype)


def _kept(keep: Array, x: PyTree[Array]) -> PyTree[Array]:
    """`x` where `keep`, else zeros (not `0 * x`, which is NaN where `x` is)."""
    return jtu.tree_map(lambda xi: select(keep, xi, jnp.zeros_like(xi)), x)


class AbstractArnoldiSolver(AbstractKrylovSolver):
    """Restarted GMRES with a right preconditioner: `init`, the cycle and its
    restart. A concrete solver sets `flexible` (store `Z`, so the preconditioner may
    change from step to step) and the fields below."""

    restart: AbstractVar[int]
    stagnation_iters: AbstractVar[int]

    # Whether a cycle stores the preconditioned vectors `Z` (FGMRES).
    flexible = False

    def __check_init__(self):
        for name in ("restart", "stagnation_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")

    def resolve_max_steps(self, operator: AbstractLinearOperator) -> int:
        # `None`: 10 × the size *cycles* (of `min(restart, size)` steps), the
        # budget of lineax 0.1.1's GMRES and of SciPy's `gmres`, whose `maxiter`
        # counts restarts. (10 × the size steps, as for the other solvers, was a
        # twentieth of it: restarted GMRES on a symmetric indefinite 25 x 25 of
        # condition 316, which needs 420-720 steps, failed with
        # `max_steps_reached` where 0.1.1 succeeded.) Capped at int32, in
        # which steps are counted.
        steps = super().resolve_max_steps(operator)
        if self.max_steps is not None:
            return steps
        cycle = max(min(self.restart, operator.in_size()), 1)
        return min(steps * cycle, MAX_INT32)

    def init(
        self, operator: AbstractLinearOperator, options: dict[str, Any]
    ) -> KrylovState:
        return self.square_state(operator, options)

    def compute(
        self, state: KrylovState, vector: PyTree[Array], options: dict[str, Any]
    ):
        operator = state.operator
        precond, problem = self.scaled_problem(state, vector, options)
        structure = operator.in_structure()
        # (At least 1: a problem of size 0 still runs, trivially, one cycle.)
        size = operator.in_size()
        # (A symbolic size, from `jax.export.symbolic_shape`, is at least 1; a
        # basis longer than it ends its cycle at the Arnoldi breakdown.)
        m = max(min(self.restart, size), 1) if isinstance(size, int) else self.restart
        cdtype = jnp.result_type(*[x.dtype for x in jtu.tree_leaves(structure)])
        stored = precond if self.flexible and precond is not None else None
        new_cycle = ft.partial(_new_cycle, m=m, cdtype=cdtype, stored=stored)
        method = Iteration(
            step=ft.partial(
                _arnoldi_step,
                m=m,
                precond=precond,
                mv=problem.mv,
                eps=problem.eps,
                cdtype=cdtype,
            ),
            estimate=ft.partial(_estimate, rdtype=problem.rdtype),
            solution=ft.partial(_solution, m=m, precond=precond, cdtype=cdtype),
            restart=ft.partial(_restart, new_cycle=new_cycle, fixed=problem.fixed),
            halted=_halted,
            halt_result=_halt_result,
            ends_pass=_ends_pass,
            pass_length=m,
            patience=self.stagnation_iters,
        )
        r0 = problem.r0
        unset = jnp.full((), -1, problem.rdtype)
        cycle = new_cycle(problem.x0, r0, False, unset, 0, norm2(r0))
        return iterate(self, problem, method, cycle)


# The steps of `AbstractArnoldiSolver.compute`, as `Iteration` takes them: `m` is
# the cycle's length, `mv` and `precond` the scaled problem's (see
# `AbstractKrylovSolver.scaled_problem`), `cdtype` the dtype of the basis.


def _arnoldi_step(
    c: _Cycle,
    m: int,
    precond: AbstractLinearOperator | None,
    mv: Callable,
    eps: float,
    cdtype: Any,
) -> _Cycle:
    s = _scalars_of(c)
    j = s.k.astype(jnp.int32)
    z = apply(precond, basis_get(c.basis, j))
    w = mv(z)
    # CGS2: classical Gram-Schmidt twice against the whole (zero-padded) basis: as
    # accurate as modified Gram-Schmidt in practice, and two matrix products
    # instead of a sequential loop.
    h = basis_dot(c.basis, w)
    w = tree_sub(w, basis_combine(c.basis, h))
    h2 = basis_dot(c.basis, w)
    w = tree_sub(w, basis_combine(c.basis, h2))
    hnext = norm2(w)
    # The new column of H: `h + h2` with `hnext` in entry `j + 1` (zero before: the
    # basis rows from `j + 1` on are zero). As a select, not a
    # `dynamic_update_slice`: that updated a copy of `h + h2` in place for the
    # rotation's product and was computed again for the norm below (two kernels
    # and a copy); elementwise, it is fused into its readers.
    below = jnp.arange(m + 1, dtype=j.dtype) == j + 1
    column = select(below, hnext.astype(h.dtype), h + h2)
    # `norm2(column)` is the norm of `A P v_j` (Pythagoras: the column holds its
    # components in the basis and orthogonal to it), without another pass over
    # that vector.
    column_norm = norm2(column)
    # The new direction is numerically in the span of the basis. For GMRES the
    # space is invariant and this cycle's solution is final; for FGMRES that holds
    # only when H_k is nonsingular (Saad, Proposition 9.2): the `degenerate` test
    # below catches the other case. The cycle ends either way.
    invariant = hnext <= eps * column_norm
    # (HIGHEST: on a GPU a float32 product defaults to TF32, 10 bits.)
    rotated = jnp.matmul(c.rotations, column, precision=_HIGHEST)
    pair = lax.dynamic_slice_in_dim(rotated, j, 2, **_IN_RANGE)
    cs, sn, rho, denom = _givens(pair[0], pair[1], cdtype)
    degenerate = ~(denom > eps * column_norm)
    # A degenerate column is not used: the cycle ends with the basis so far. The
    # rows written below are zero and R's column is the identity's until written,
    # so "not used" means writing those (and the Givens pair as it was).
    keep = ~degenerate
    v_new = tree_scale(select(invariant, 0, safe_div(1, hnext)), w)
    basis = basis_set(c.basis, j + 1, _kept(keep, v_new))
    directions = c.directions
    if directions is not None:
        directions = basis_set(directions, j, _kept(keep, z))
    rows = lax.dynamic_slice_in_dim(c.rotations, j, 2, **_IN_RANGE)
    rotated_rows = jnp.stack(
        [cs * rows[0] + sn * rows[1], -jnp.conj(sn) * rows[0] + cs * rows[1]]
    )
    rows = select(keep, rotated_rows, rows)
    rotations = lax.dynamic_update_slice_in_dim(c.rotations, rows, j, 0, **_IN_RANGE)
    diagonal = jnp.arange(m, dtype=j.dtype) == j
    r_column = select(diagonal, select(keep, rho, 1), rotated[:m])
    r_column = select(keep | diagonal, r_column, 0)
    r_factor = lax.dynamic_update_slice_in_dim(
        c.r_factor, r_column[None, :], j, 0, **_IN_RANGE
    )
    estimate = select(
        keep, jnp.abs(rows[1, 0]) * c.beta, s.estimate.astype(c.beta.dtype)
    )
    scalars = _CycleScalars(
        select(keep, s.k + 1, s.k), estimate, invariant, degenerate,
        s.halt, s.floor_ref, s.floor_hits,
    ).pack(c.beta.dtype)  # fmt: skip
    return _Cycle(c.x, c.beta, basis, directions, rotations, r_factor, scalars)


def _solution(
    c: _Cycle, m: int, precond: AbstractLinearOperator | None, cdtype: Any
) -> PyTree[Array]:
    # Solve R y = Q beta e_1 on the k columns in use (R holds the identity's
    # columns in the others, and their coefficients are 0), then x + P V y or
    # x + Z y.
    k = _scalars_of(c).k
    used = jnp.arange(m, dtype=k.dtype) < k
    g = select(used, c.beta.astype(cdtype) * c.rotations[:m, 0], 0)
    # (`r_factor.T` is R: a transpose that XLA makes a change of layout, no copy,
    # the column-major R that LAPACK reads.)
    y = jsl.solve_triangular(c.r_factor.T, g, lower=False)
    if c.directions is None:
        # GMRES, or FGMRES without a preconditioner (`apply` is then `V y`). `V y`
        # from the whole basis, with a zero coefficient for its last vector: the
        # first `m` rows of a batch of bases (under `vmap`) are not contiguous, and
        # as `V[:m]` XLA copied them (GMRES, restart 30, unbatched: 73 -> 48
        # vectors of temporary memory, measured).
        y_padded = jnp.concatenate([y, jnp.zeros((1,), y.dtype)])
        update = apply(precond, basis_combine(c.basis, y_padded))
    else:
        update = basis_combine(c.directions, y)
    return jtu.tree_map(lambda xi, d: xi + d, c.x, update)


def _new_cycle(
    x, r, halt, floor_ref, floor_hits, beta, m: int, cdtype: Any, stored: Any
) -> _Cycle:
    """A cycle from the iterate `x` and its residual `r` (of 2-norm `beta`);
    `stored` is the preconditioner whose outputs the cycle stores (FGMRES), or
    `None`."""
    inv_beta = safe_div(1, beta)
    basis = jtu.tree_map(
        lambda r: (
            jnp.zeros((m + 1,) + r.shape, r.dtype)
            .at[0]
            .set(r * inv_beta.astype(r.dtype))
        ),
        r,
    )
    if stored is not None:
        directions = jtu.tree_map(
            lambda s: jnp.zeros((m,) + s.shape, s.dtype), stored.out_structure()
        )
    else:
        directions = None
    scalars = _CycleScalars(0, beta, False, False, halt, floor_ref, floor_hits).pack(
        beta.dtype
    )
    return _Cycle(
        x,
        beta,
        basis,
        directions,
        _identity(m + 1, cdtype),
        _identity(m, cdtype),
        scalars,
    )


def _restart(c: _Cycle, x, r, passed, new_cycle: Callable, fixed: bool) -> _Cycle:
    del passed
    beta = norm2(r)
    s = _scalars_of(c)
    floor_ref, floor_hits = s.floor_ref.astype(beta.dtype), s.floor_hits
    if not fixed:
        # The estimate is the 2-norm of the residual, exact but for rounding: a
        # cycle that ends with it more than `FLOOR_GAP` below the true residual ran
        # on rounding errors (the tolerance is below what the dtype can reach,
        # about eps cond(A)). `FLOOR_PATIENCE` such cycles without the true
        # residual halving stop the solve with `stagnation`, as CG's residual
        # replacements do. The rule of `stagnation_iters` restarts without a new
        # best alone took 15-40 cycles past the floor (the true residual there sets
        # a new best by chance now and then), more than the default step budget of
        # a problem of size 300 or less. (The test compares 2-norms, whatever the
        # solver's norm; a fixed-iteration solve makes all its steps.)
        # (`beta <= inf` for an unset reference: `beta == beta`.)
        halved = select(floor_ref < 0, beta == beta, beta <= 0.5 * floor_ref)
        floor_ref = select(halved, beta, floor_ref)
        hit = beta > FLOOR_GAP * s.estimate.astype(beta.dtype)
        hits = hit.astype(floor_hits.dtype)
        floor_hits = select(halved, 0, floor_hits) + hits
    # No progress at all is possible from here: the first new direction was already
    # degenerate (e.g. A P r = 0).
    halt = ((s.degenerate > 0) & (s.k == 0)) | (floor_hits >= FLOOR_PATIENCE)
    return new_cycle(x, r, halt, floor_ref, floor_hits, beta)


def _estimate(c: _Cycle, rdtype: Any) -> Array:
    return _scalars_of(c).estimate.astype(rdtype)


def _halted(c: _Cycle) -> Array:
    return _scalars_of(c).halt > 0


def _halt_result(c: _Cycle) -> RESULTS:
    floor = _scalars_of(c).floor_hits >= FLOOR_PATIENCE
    return results_where(floor, RESULTS.stagnation, RESULTS.breakdown)


def _ends_pass(c: _Cycle) -> Array:
    s = _scalars_of(c)
    return (s.invariant > 0) | (s.degenerate > 0)
