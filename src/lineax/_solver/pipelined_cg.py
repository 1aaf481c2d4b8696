"""`PipelinedCG`: conjugate gradients with one global reduction per step
(Chronopoulos and Gear, 1989), for solves sharded over many devices."""

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree, Scalar

from .._misc import select
from .._norm import max_norm
from ._definite import AbstractDefiniteKrylovSolver
from ._krylov import (
    apply,
    FLOOR_GAP,
    iterate,
    Iteration,
    KrylovState,
    safe_div,
    tree_axpy,
    tree_scale,
    tree_sub,
    tree_where,
)
from .base import static_number


class _ChronopoulosGear(eqx.Module):
    """The recurrences, named as in Algorithm 2 of Ghysels and Vanroose (2014)."""

    x: PyTree[Array]
    r: PyTree[Array]  # recursively updated residual
    u: PyTree[Array]  # M r (after a residual replacement: the next direction)
    w: PyTree[Array]  # A u
    p: PyTree[Array]  # search direction of the previous step
    s: PyTree[Array]  # A p, recursively updated
    gamma: Scalar  # <r, M r>
    alpha: Scalar  # step length of the next step
    beta: Scalar  # direction update of the next step
    rnorm: Scalar  # sqrt(<r, r>): the cheap 2-norm estimate
    breakdown: Array
    # After a residual replacement: `<M r', A p>` for the residual `r'` of the next
    # step (known in advance, see `replace_residual`).
    cross: Scalar
    replaced: Array


# The recursive residual is replaced by the true one where they differ by more than
# `_REPLACE_GAP` (relative to the true one), and the direction restarts where they
# differ by more than `_RESTART_GAP`; see `replace_residual`.
_REPLACE_GAP = 0.01
_RESTART_GAP = 0.1


def _fused_dots(*pairs) -> tuple[Scalar, ...]:
    """`Re <a, b>` for each pair `(a, b)`, as one reduction per leaf: the local
    sums are stacked before summing, so that a sharded vector needs one all-reduce
    (of one number per pair) per call, not one per pair."""
    total = None
    leaves = [tuple(map(jtu.tree_leaves, pair)) for pair in pairs]
    for i in range(len(leaves[0][0])):
        stacked = jnp.stack([jnp.conj(a[i]) * b[i] for a, b in leaves])
        sums = jnp.real(jnp.sum(stacked.reshape(len(pairs), -1), axis=1))
        total = sums if total is None else total + sums
    assert total is not None
    return tuple(total[i] for i in range(len(pairs)))


class PipelinedCG(AbstractDefiniteKrylovSolver):
    """The conjugate gradient method with one global reduction per step: the
    Chronopoulos-Gear variant (Chronopoulos and Gear, *s-step iterative methods for
    symmetric linear systems*, J. Comput. Appl. Math. 25, 1989; Algorithm 2 of
    Ghysels and Vanroose, *Hiding global synchronization latency in the
    preconditioned conjugate gradient algorithm*, Parallel Computing 40, 2014).

    It computes the same iterates as [`lineax.CG`][] in exact arithmetic. CG needs
    two inner products per step, one after the other (`<p, A p>`, then `<r, M r>`
    of the updated residual), so on a sharded vector two all-reduces that each
    wait for every device; here `A p` is carried as a vector `s` updated by the
    recurrence `s = w + beta s` (with `w = A M r`), and the inner products of a step
    (`<r, u>`, `<w, u>` and `<r, r>` for the stopping test) are summed in one
    reduction. The price is two more vectors and slightly worse rounding (the
    recursive `s` drifts from `A p`). Every `stabilise_every` steps the true
    residual `b - A y` is computed; where it differs from the recursive one by
    more than 1%, the recursive residual is replaced by it, and `A p` recomputed
    for the direction the recursive residual makes (Cools and Vanroose, 2017); by
    more than 10%, the direction restarts. (Replacing at every verification
    disturbs the recurrences, and slowed or stopped convergence on
    ill-conditioned operators.) Each verification costs two operator products
    and two preconditioner applications. Prefer it over CG where a global
    reduction costs more than a few vector updates: many devices or hosts.

    The per-step stopping test uses the 2-norm of the recursive residual (free
    from the same reduction); success is still only reported after the solver's
    `norm` of a recomputed residual passed (see [`lineax.CG`][]).

    **Arguments:** as for [`lineax.CG`][]: `rtol`, `atol`, `norm`,
    `stabilise_every`, `max_steps`, `history_length`, `verbose`.

    **Options:**

    - `preconditioner`: a positive definite operator approximating the inverse of
        the operator (of `-A` for a negative definite `A`).
    - `y0`: an initial guess for the solution.
    """

    rtol: float = static_number(float)
    atol: float = static_number(float)
    norm: Callable[[PyTree[Array]], Scalar] = eqx.field(static=True, default=max_norm)
    stabilise_every: int | None = static_number(int | None, default=10)
    max_steps: int | None = static_number(int | None, default=None)
    history_length: int | None = static_number(int | None, default=None)
    verbose: bool | int = eqx.field(static=True, default=False)

    def compute(
        self, state: KrylovState, vector: PyTree[Array], options: dict[str, Any]
    ):
        precond, problem, mv = self.definite_problem(state, vector, options)

        def residual_terms(r):
            u = apply(precond, r)
            w = mv(u)
            gamma, delta, rr = _fused_dots((r, u), (w, u), (r, r))
            return u, w, gamma, delta, jnp.sqrt(jnp.maximum(rr, 0))

        def next_coefficients(gamma, delta, rnorm, c_gamma, c_alpha, fresh, c=None):
            # alpha = gamma / <p, A p>, with <p, A p> = delta - beta gamma / alpha_old
            # (Ghysels and Vanroose, Algorithm 2); a fresh direction has beta = 0
            # and <p, A p> = delta. In general <p', A p'> = delta + beta cross
            # with beta = -cross / <p, A p> and cross = <M r', A p>, which the
            # recurrence reads as -gamma' / alpha (from the orthogonality of r'
            # and M r); after a residual replacement that orthogonality is lost
            # (the direction is the recursive residual's, the residual the true
            # one), and `cross` is known exactly instead.
            cross = -safe_div(gamma, c_alpha)
            beta = select(fresh, 0, safe_div(gamma, c_gamma))
            if c is not None:
                # <p, A p> = gamma_old / alpha_old.
                replaced_beta = -c.cross * safe_div(c_alpha, c_gamma)
                beta = select(c.replaced, replaced_beta, beta)
                cross = select(c.replaced, c.cross, cross)
            pap = delta + beta * cross
            # As in CG: <p, A p> > 0 for a definite operator unless A p = 0, and a
            # preconditioner that is not positive definite shows as gamma <= 0.
            breakdown = ~(pap > 0) | ((rnorm > 0) & ~(gamma > 0))
            alpha = select(breakdown, 0, safe_div(gamma, pap))
            return alpha, beta, breakdown

        def step(c: _ChronopoulosGear) -> _ChronopoulosGear:
            p = tree_axpy(c.beta, c.p, c.u)
            s = tree_axpy(c.beta, c.s, c.w)
            x = tree_axpy(c.alpha, p, c.x)
            r = tree_axpy(-c.alpha, s, c.r)
            u, w, gamma, delta, rnorm = residual_terms(r)
            alpha, beta, breakdown = next_coefficients(
                gamma, delta, rnorm, c.gamma, c.alpha, False, c
            )
            breakdown = breakdown & (rnorm > problem.tol)
            return _ChronopoulosGear(
                x,
                r,
                u,
                w,
                p,
                s,
                gamma,
                alpha,
                beta,
                rnorm,
                breakdown,
                c.cross,
                jnp.zeros_like(c.replaced),
            )

        def replace_residual(c: _ChronopoulosGear, x, r, passed):
            # Residual replacement, only where the true residual differs from
            # the recursive one by more than `_REPLACE_GAP` (1%; van der Vorst
            # and Ye, 2000, replace as rarely): below that the difference does not
            # matter to the stopping test, and each replacement disturbs the
            # recurrences. (Replacing at every verification, restarting `u = M r`,
            # `w = A u` from the true residual and keeping the drifted `s`,
            # failed at cond 1e8, float64, rtol 3e-8, on 8 of 8 matrices where CG
            # converged.) A replacement is consistent (Cools and Vanroose, 2017):
            # the next direction is the one the recursive residual makes,
            # `u + beta p`, as in `CG`, and `s = A p` is recomputed for it, with
            # the step length from the true residual and `<p, A p>` computed
            # directly. The direction is handed to the next step as `u` (and
            # `A p` as `w`) with `beta = 0`: the step reads `u` and `w` only to
            # make the direction. The direction restarts (from `M r`) where the
            # two residuals differ by more than 10% (rounding dominates, as in
            # `CG`), or the pass ended on a breakdown: the breakdown test reads
            # `<p, A p>` from its recurrence, a difference of nearly equal numbers
            # near the floor, and a fresh direction's is computed directly.
            del x, passed
            gg, rr = _fused_dots((tree_sub(r, c.r),) * 2, (r, r))
            drifted = gg > _RESTART_GAP**2 * rr
            fresh = drifted | c.breakdown
            replace = fresh | (gg > _REPLACE_GAP**2 * rr)
            rnorm = jnp.sqrt(jnp.maximum(rr, 0))
            u = apply(precond, r)
            p = tree_where(fresh, u, tree_axpy(c.beta, c.p, c.u))
            s = mv(p)
            # `q = M s`, for the next step's `<M r', A p>` (below).
            q = apply(precond, s)
            gamma, pap, us, sq = _fused_dots((r, u), (s, p), (s, u), (s, q))
            alpha, beta, breakdown = next_coefficients(
                gamma, pap, rnorm, gamma, jnp.ones_like(gamma), True
            )
            # The next step's residual is r' = r - alpha s, so that
            # <M r', s> = <M r, s> - alpha <M s, s>.
            cross = us - alpha * sq
            new = _ChronopoulosGear(
                c.x,
                r,
                p,
                s,
                c.p,
                c.s,
                gamma,
                alpha,
                beta,
                rnorm,
                breakdown & (rnorm > problem.tol),
                cross,
                jnp.ones_like(c.replaced),
            )
            return tree_where(replace, new, c)

        zero = tree_scale(0, problem.r0)
        u, w, gamma, delta, rnorm = residual_terms(problem.r0)
        # (`w = A M r0` is a product made before the first step, which
        # `stats["num_mv"]` counts.)
        problem = dataclasses.replace(problem, initial_mv=problem.initial_mv + 1)
        alpha, beta, breakdown = next_coefficients(
            gamma, delta, rnorm, gamma, jnp.ones_like(gamma), True
        )
        carry = _ChronopoulosGear(
            problem.x0,
            problem.r0,
            u,
            w,
            zero,
            zero,
            gamma,
            alpha,
            beta,
            rnorm,
            breakdown & (rnorm > problem.tol),
            jnp.zeros_like(gamma),
            jnp.array(False),
        )
        method = Iteration(
            step=step,
            estimate=lambda c: c.rnorm,
            solution=lambda c: c.x,
            restart=replace_residual,
            halted=lambda c: c.breakdown,
            pass_length=self.stabilise_every,
            verify_mv=2,
            # As for CG (see `FlexibleCG`): a pass whose recursive residual ends
            # far below the true residual ran on rounding errors. (In the solver's
            # norm, as `rnorm`: one more reduction per verification, none per step.)
            below_floor=lambda c, rnorm: rnorm > FLOOR_GAP * problem.norm(c.r),
            # As for CG: each verification replaces the residual, so the next
            # pass's estimate starts from the true residual.
            free_misses=2,
        )
        return iterate(
            self, problem, method, carry, rnorm=self.checked_norm(problem.r0)
        )
