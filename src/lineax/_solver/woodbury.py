"""`Woodbury`: solves with `A + U C V` through a solve with `A` and a `k×k`
factorisation (the Sherman-Morrison-Woodbury identity)."""

import functools as ft
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._misc import HeldArrays, power_of_two_normaliser, Static
from .._operator.arithmetic import ComposedLinearOperator
from .._operator.base import (
    AbstractLinearOperator,
    conj,
    flatten_vector,
    unflatten_vector,
)
from .._operator.low_rank import LowRankUpdateLinearOperator
from .._operator.matrix import MatrixLinearOperator
from .._operator.tagged import unwrap_tagged
from .._operator.tangent import TangentLinearOperator
from .._solution import RESULTS
from ._structured import (
    cheaper_by_tags,
    first_failure,
    mv_flat,
    reads_whole,
    refined,
    solve_columns,
    solve_flat,
    solved_parts,
    solves_to_a_tolerance,
    structured_solver,
    tangent_parts,
)
from .auto import AutoLinearSolver
from .base import AbstractLinearSolver, check_passed_on, check_solver
from .lu import LU, LUState


def _matmul(a: Array, b: Array) -> Array:
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


class WoodburyState(eqx.Module):
    """State of [`lineax.Woodbury`][], for `M = A + U C V` with `W = C V`.

    Named as in Hager, "Updating the inverse of a matrix", SIAM Review 31 (1989):
    `solved_u` is `P = A⁻¹ U` (one column per rank, flattened, shape `(n, k)`),
    and `capacitance` is the LU factorisation of `K = I + C V A⁻¹ U` (`k×k`).
    Both are rescaled by powers of two (see `init`): `solved_u` is `P S` and
    `capacitance` that of `R K S` for diagonal `S` and `R`, with `R`'s diagonal
    in `row_scale` (`None` where nothing is rescaled).
    With `transposed`, the states are those of `Aᵀ` and `Kᵀ`, and `M ᵀ` is solved.
    `columns_result` is the result of the solves for `P` (every solve with this
    state reports it: a `P` that an iterative inner solver did not converge to
    makes every solution wrong). `operator` is the operator solved (`M`, or `Mᵀ`
    with `transposed`), for the residual of the refinement step (held: see
    `HeldArrays`).
    """

    operator_state: PyTree
    solved_u: Array
    capacitance: LUState
    row_scale: Array | None
    cv: AbstractLinearOperator
    held_operator: HeldArrays
    columns_result: RESULTS
    structures: Static = eqx.field(static=True)
    transposed: bool = eqx.field(static=True)

    @property
    def operator(self) -> AbstractLinearOperator:
        return self.held_operator.value


class Woodbury(AbstractLinearSolver[WoodburyState]):
    """Solves with a [`lineax.LowRankUpdateLinearOperator`][] `M = A + U C V` by the
    Woodbury identity, in the form that does not invert `C` (Hager, "Updating the
    inverse of a matrix", SIAM Review 31, 1989):

    `M⁻¹ = A⁻¹ − A⁻¹ U K⁻¹ C V A⁻¹`, with the capacitance matrix
    `K = I + C V A⁻¹ U` (`k×k`).

    `init` solves with `A` for the `k` columns of `U` and factorises `K` by LU;
    each solve is then two solves with `A` and `O(nk)` work: the identity, then
    one step of iterative refinement. The identity alone loses accuracy to an
    ill-conditioned `A` even where `M` is well-conditioned (it is not backward
    stable); the refinement step squares that loss: a relative error of
    `eps·cond(A)` becomes about `(eps·cond(A))²`, down to `M`'s own. For `A`
    diagonal (n = 4000, k = 10) this is about `O(nk²)` against `O(n³)` for dense
    LU. When
    `C` is invertible, `K = C (C⁻¹ + V A⁻¹ U)`, the textbook capacitance matrix.
    With a direct inner solver, each column of `U` is first rescaled by a power
    of two (its largest entry into `[1, 2)`), and the rows of `K` alike, which
    is exact: `A⁻¹U` of a large `U` against a small `V` does not overflow
    (`0.01 I + (3e37 e₁)(3.3e-38 e₁)ᵀ` in float32 is solved), and in range the
    solution is bitwise that of the unscaled identity.

    For a nonsingular `A`, `det M = det A · det K`, so `M` is singular exactly
    when `K` is: a `K` with an exactly zero pivot gives
    [`lineax.RESULTS.singular`][], not NaN.
    A `K` that is only numerically singular (a pivot of rounding size, as for a
    rank-one update that cancels `A` up to rounding) is solved as [`lineax.LU`][]
    solves a numerically singular matrix: the solution is as accurate as the
    condition of `M` allows, i.e. huge and meaningless, and reported successful.
    `A` itself must be nonsingular. A singular `A` (e.g. `diag(1, 2, 0) + e₃e₃ᵀ`)
    gives `singular` from the solve with `A` even where `M` is nonsingular: solve
    such an `M` with [`lineax.LU`][] (on `lx.materialise(M)`), as
    [`lineax.AutoLinearSolver`][] picks `Woodbury` for every low-rank update.
    So does an `A` too ill-conditioned for the dtype (`eps·cond(A) ≳ 1`, e.g.
    `diag(1e-10, 1, 1) + e₁e₁ᵀ` in float32), where the refined solution still
    has no correct digits: its backward error (`|b − M x|` against `|A x| +
    |A z| + |U C V x| + |b|`, `z` being `x` with pseudo-random signs) above
    `eps^(1/4)` is reported as `singular`, not as a
    wrong answer. (Not with an iterative inner solver, whose solution has the
    backward error its tolerance allows.)

    **Arguments:**

    - `inner`: the solver for `A`. Defaults to
        `lx.AutoLinearSolver(well_posed=True)` (e.g. [`lineax.Diagonal`][] for a
        [`lineax.DiagonalLinearOperator`][]).

    The `options` are passed to the inner solver.
    """

    inner: AbstractLinearSolver = AutoLinearSolver(well_posed=True)

    option_keys = frozenset()  # `options` are passed on to the inner solver(s)

    def __check_init__(self):
        check_solver(self.inner, "inner")

    def init(
        self, operator: AbstractLinearOperator, options: dict[str, Any]
    ) -> WoodburyState:
        operator = unwrap_tagged(operator)
        if not isinstance(operator, LowRankUpdateLinearOperator):
            raise ValueError(
                "`lx.Woodbury` solves only a `lx.LowRankUpdateLinearOperator`, got "
                f"{type(operator).__name__}."
            )
        check_passed_on((self.inner,), options, "Woodbury")
        a = operator.operator
        operator_state = self.inner.init(a, options)
        # P = A⁻¹ U, one solve per column of U (batched), for `U` with each
        # column rescaled by the power of two that brings its largest entry into
        # `[1, 2)` (`U S`, `S` diagonal): `P` of a well-conditioned `M`
        # overflowed where `U` is large and `V` small, `0.01 I + (3e37
        # e₁)(3.3e-38 e₁)ᵀ` in float32 (cond(M) = 101), and the solve was
        # `singular`. With `P S` and `K S = S + C V P S` in place of `P` and `K`,
        # `P K⁻¹` (all that `compute` reads of them) is unchanged. Powers of two
        # scale exactly (and LU's pivots do not depend on a column scaling), so
        # in range this is the unscaled solve, bitwise. Column by column, as the
        # columns of `U` may differ in size: one scale for all flushed a column
        # of 0.1 next to one of 3e37 to zero. (Not for an iterative inner solver:
        # its `atol` would then stop the solves for the columns elsewhere.)
        # The rows of `K S` are then rescaled alike (`R K S`, `R` diagonal, and
        # `compute` multiplies `C V A⁻¹ b` by `R`): a row of `C V` far below
        # the others (here `3.3e-38`) made that row of `K S` so small that LU's
        # products with it fell below float32's normal range, and a complex64
        # solve lost 30% to XLA's flushing them to zero.
        u_matrix = operator.u.as_matrix()
        scale = None
        if u_matrix.size and not solves_to_a_tolerance(self.inner):
            scale = power_of_two_normaliser(jnp.max(jnp.abs(u_matrix), axis=0))
            u_matrix = u_matrix * scale.astype(u_matrix.dtype)[None, :]
        solved_u, columns_result = solve_columns(
            self.inner, operator_state, u_matrix.T, a.out_structure(), options
        )
        solved_u = solved_u.T
        cv = ComposedLinearOperator(operator.c, operator.v)
        in_structure = a.in_structure()

        def apply_cv(column):
            x = unflatten_vector(column, in_structure, keep_dtype=True)
            return flatten_vector(cv.mv(x), column.dtype)

        cv_p = jax.vmap(apply_cv, out_axes=1)(solved_u.T)
        row_scale = None
        if scale is None:
            capacitance = jnp.eye(cv_p.shape[0], dtype=cv_p.dtype) + cv_p
        else:
            identity = jnp.eye(cv_p.shape[0], dtype=cv_p.dtype)
            capacitance = identity * scale.astype(cv_p.dtype)[None, :] + cv_p  # K S
            row_scale = power_of_two_normaliser(jnp.max(jnp.abs(capacitance), 1))
            capacitance = capacitance * row_scale.astype(cv_p.dtype)[:, None]
        lu_state = LU().init(MatrixLinearOperator(capacitance), {})
        # The refinement step's residual is that of `M` as solved: with the part
        # of `A` that the inner solver reads (e.g. the diagonal, for a matrix
        # tagged diagonal), on which alone the solution and its derivative
        # depend.
        solved = self.solved_operator(operator)
        structures = Static((a.in_structure(), a.out_structure()))
        return WoodburyState(
            operator_state,
            solved_u,
            lu_state,
            row_scale,
            cv,
            HeldArrays(solved),
            columns_result,
            structures,
            transposed=False,
        )

    def compute(self, state: WoodburyState, vector, options):
        in_structure, _ = state.structures.value
        b = flatten_vector(vector)
        # (See `refined`: `diag(1e-10, 1, ..., 1) + u uᵀ` in float64, cond(M) =
        # 30: relative error 2e-7 -> 5e-13, LU of `M`: 3e-17; float32,
        # `diag(1e-2, 1, ...)`, cond(M) = 5: 4e-6 -> 3e-8, LU: 4e-8.)
        solve = ft.partial(_identity_solve, self.inner, state, options=options)
        x, result = refined(solve, state.operator, b)
        # (Not for an inner solver that stops at a tolerance: its solution is
        # as accurate as asked, and its own result reports a failure to be.)
        if not solves_to_a_tolerance(self.inner):
            no_digits = _no_digits(state.operator, x, b)
            result = first_failure(
                result, RESULTS.where(no_digits, RESULTS.singular, RESULTS.successful)
            )
        return unflatten_vector(x, in_structure), result, {}

    def transpose(self, state: WoodburyState, options):
        # `options` are the inner solver's (see `compute`): transposed by it, a
        # preconditioner of `A` becomes one of `Aᵀ`. (Kept as they were, the
        # transposed solves of reverse mode ran preconditioned by an
        # approximate inverse of `A`, not of `Aᵀ`: `Woodbury(GMRES(max_steps=2,
        # restart=2))` with `lx.invert(A)` as the preconditioner solved, but
        # its gradient failed with `max_steps_reached`.)
        operator_state, options = self.inner.transpose(state.operator_state, options)
        capacitance, _ = LU().transpose(state.capacitance, {})
        in_structure, out_structure = state.structures.value
        new = WoodburyState(
            operator_state,
            state.solved_u,
            capacitance,
            state.row_scale,
            state.cv,
            HeldArrays(state.operator.transpose()),
            state.columns_result,
            Static((out_structure, in_structure)),
            not state.transposed,
        )
        return new, options

    def conj(self, state: WoodburyState, options):
        operator_state, options = self.inner.conj(state.operator_state, options)
        capacitance, _ = LU().conj(state.capacitance, {})
        new = WoodburyState(
            operator_state,
            jnp.conj(state.solved_u),
            capacitance,
            state.row_scale,
            conj(state.cv),
            HeldArrays(conj(state.operator)),
            state.columns_result,
            state.structures,
            state.transposed,
        )
        return new, options

    def part_read(self, operator, other):
        # The inner solver reads its part of `A` (e.g. the diagonal for
        # `lx.Diagonal`); `U`, `C` and `V` are read whole. The tangent of
        # `A + U C V` is that of `A` plus that of the update with `A` held fixed.
        parts = tangent_parts(operator, other, LowRankUpdateLinearOperator)
        if parts is None:
            return other
        primal, tangent = parts
        a, t_a = primal.operator, tangent.operator
        if not jtu.tree_leaves(t_a) or reads_whole(self.inner, a):
            return other
        no_t_a = jtu.tree_map(lambda _: None, t_a)
        update = TangentLinearOperator(
            primal, eqx.tree_at(lambda t: t.operator, tangent, no_t_a)
        )
        return self.inner.part_read(a, TangentLinearOperator(a, t_a)) + update

    def solved_operator(self, operator):
        solved = solved_parts(operator, LowRankUpdateLinearOperator)
        if solved is None or reads_whole(self.inner, solved.operator):
            return operator
        return LowRankUpdateLinearOperator(
            self.inner.solved_operator(solved.operator), solved.u, solved.c, solved.v
        )

    def assume_full_rank(self) -> bool:
        return True


def _no_digits(operator: AbstractLinearOperator, x: Array, b: Array) -> Array:
    """Whether the refined solution `x` of `M x = b` (flat) has a backward error
    too large for it to have any correct digits: `|b − A x − U C V x|` above
    `eps^(1/4)` (float32 2%, float64 1e-4) of `|A x| + |A z| + |U C V x| + |b|`
    (max norms; `z` estimates `|A| |x|`, see below), the sizes whose rounding a
    solution's residual is made of. Where
    `eps·cond(A) ≥ 1`, refinement cannot recover what the identity cancelled:
    `diag(1e-10, 1, 1) + e₁e₁ᵀ` in float32 (cond(M) = 2) was solved as
    `[0, 1, 1]` (answer `[1, 1, 1]`), reported successful, with backward error
    0.5. A numerically singular `M` with a well-conditioned `A` (the solution
    huge and meaningless, as LU's) still passes: its terms are huge too. Costs
    one product with `M`, `O(nk)` beyond `A`'s, and one more with `A`."""
    if b.size == 0 or not isinstance(operator, LowRankUpdateLinearOperator):
        return jnp.array(False)  # (`init` holds the update it was given)
    structure = operator.in_structure()
    y = unflatten_vector(x, structure, keep_dtype=True)
    ax = flatten_vector(operator.operator.mv(y), b.dtype)
    update = operator.u.mv(operator.c.mv(operator.v.mv(y)))
    ucvx = flatten_vector(update, b.dtype)
    residual = jnp.max(jnp.abs(b - ax - ucvx))
    # With `|A z|` for `z = x` with pseudo-random signs: an estimate of
    # `|A| |x|`, which `|A x|` is not for an `x` along `A`'s small singular
    # vectors (an ill-conditioned `M`, whose solution is large there). Without
    # it, a float32 `M` of cond 1.3e6 (`A` 3e7) solved to 7e-4 (LU: 4e-3), or a
    # complex128 one of cond 3e11 (`A` 1e14) to 6e-6, was called singular.
    # (Signs, not `|x|`: `x` along a positive null vector of `A`, as a
    # constant is of a graph Laplacian, gives `A |x| = A x`.)
    z = x * _pseudo_random_signs(x.shape[0], x.dtype)
    az = flatten_vector(
        operator.operator.mv(unflatten_vector(z, structure, keep_dtype=True)),
        b.dtype,
    )
    scale = (
        jnp.max(jnp.abs(ax))
        + jnp.max(jnp.abs(az))
        + jnp.max(jnp.abs(ucvx))
        + jnp.max(jnp.abs(b))
    )
    # (Compared, not divided: a zero scale is a zero solution of a zero `b`.)
    return residual > jnp.finfo(b.dtype).eps ** 0.25 * scale


def _pseudo_random_signs(n: int, dtype: Any) -> Array:
    """`n` signs `±1` (of `dtype`), from a multiplicative hash of the index (the
    golden ratio's, Knuth's): fixed, without a key, and with no pattern that a
    smooth or alternating vector shares."""
    hashed = jax.lax.iota(jnp.uint32, n) * jnp.uint32(0x9E3779B1)
    return (1 - 2 * (hashed >> 31).astype(jnp.int32)).astype(dtype)


def _rows_scaled(state: WoodburyState, vector: Array) -> Array:
    """`R vector`, for the row scaling `R` of the capacitance matrix (see
    `init`)."""
    if state.row_scale is None:
        return vector
    return vector * state.row_scale.astype(vector.dtype)


def _identity_solve(
    inner: AbstractLinearSolver, state: WoodburyState, b: Array, options: dict
) -> tuple[Array, RESULTS]:
    """`M⁻¹ b` (flat) by the Woodbury identity, and the result code."""
    in_structure, out_structure = state.structures.value
    if state.transposed:
        # Mᵀ⁻¹ = A⁻ᵀ (I − Vᵀ Cᵀ K⁻ᵀ Pᵀ): one solve with Aᵀ, after the update.
        s, k_result, _ = LU().compute(
            state.capacitance, _matmul(state.solved_u.T, b), {}
        )
        s = _rows_scaled(state, s)
        k_space = state.cv.out_structure()
        rhs = b - mv_flat(state.cv.transpose(), s, k_space, b.dtype)
        # Aᵀ maps A's output space (`in_structure` here) to its input space.
        x, a_result = solve_flat(
            inner, state.operator_state, rhs, out_structure, options
        )
    else:
        y, a_result = solve_flat(inner, state.operator_state, b, out_structure, options)
        w = mv_flat(state.cv, y, in_structure, None)
        s, k_result, _ = LU().compute(state.capacitance, _rows_scaled(state, w), {})
        x = y - _matmul(state.solved_u, s)
    return x, first_failure(state.columns_result, a_result, k_result)


@structured_solver.register(LowRankUpdateLinearOperator)
def _(operator):
    if cheaper_by_tags(operator):
        return None
    if operator.c.in_size() >= operator.in_size():
        return None  # not low rank: dense LU is as cheap
    return Woodbury()
