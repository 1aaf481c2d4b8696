"""`PipelinedCG`: conjugate gradients with one global reduction per step
(Chronopoulos and Gear, 1989), for solves sharded over many devices."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree, Scalar

from .._norm import max_norm
from ._definite import AbstractDefiniteKrylovSolver
from ._krylov import (
    apply,
    FLOOR_GAP,
    iterate,
    Iteration,
    KrylovState,
    norm2,
    safe_div,
    tree_axpy,
    tree_scale,
    tree_sub,
    tree_where,
)


class _ChronopoulosGear(eqx.Module):
    """The recurrences, named as in Algorithm 2 of Ghysels and Vanroose (2014)."""

    x: PyTree[Array]
    r: PyTree[Array]  # recursively updated residual
    u: PyTree[Array]  # M r
    w: PyTree[Array]  # A u
    p: PyTree[Array]  # search direction of the previous step
    s: PyTree[Array]  # A p, recursively updated
    gamma: Scalar  # <r, u>
    alpha: Scalar  # step length of the next step
    beta: Scalar  # direction update of the next step
    gamma_old: Scalar  # gamma and alpha of the step that gave `p` (for a restart)
    alpha_old: Scalar
    rnorm: Scalar  # sqrt(<r, r>): the cheap 2-norm estimate
    breakdown: Array


def _fused_dots(r, u, w) -> tuple[Scalar, Scalar, Scalar]:
    """`(<r, u>, <w, u>, <r, r>)` as one reduction per leaf: the three local sums
    are stacked before summing, so that a sharded vector needs one all-reduce (of
    three numbers) per step, not three."""
    total = None
    for ri, ui, wi in zip(
        jtu.tree_leaves(r), jtu.tree_leaves(u), jtu.tree_leaves(w), strict=True
    ):
        stacked = jnp.stack(
            [jnp.conj(ri) * ui, jnp.conj(wi) * ui, jnp.conj(ri) * ri]
        ).reshape(3, -1)
        sums = jnp.real(jnp.sum(stacked, axis=1))
        total = sums if total is None else total + sums
    assert total is not None
    return total[0], total[1], total[2]


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
    recursive `s` drifts from `A p`), which residual replacement every
    `stabilise_every` steps keeps in check. Prefer it over CG where a global
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

    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    norm: Callable[[PyTree[Array]], Scalar] = eqx.field(static=True, default=max_norm)
    stabilise_every: int | None = eqx.field(static=True, default=10)
    max_steps: int | None = eqx.field(static=True, default=None)
    history_length: int | None = eqx.field(static=True, default=None)
    verbose: bool | int = eqx.field(static=True, default=False)

    def compute(
        self, state: KrylovState, vector: PyTree[Array], options: dict[str, Any]
    ):
        precond, problem, mv = self.definite_problem(state, vector, options)

        def residual_terms(r):
            u = apply(precond, r)
            w = mv(u)
            gamma, delta, rr = _fused_dots(r, u, w)
            return u, w, gamma, delta, jnp.sqrt(jnp.maximum(rr, 0))

        def next_coefficients(gamma, delta, rnorm, c_gamma, c_alpha, fresh):
            # alpha = gamma / <p, A p>, with <p, A p> = delta - beta gamma / alpha_old
            # (Ghysels and Vanroose, Algorithm 2); a fresh direction has beta = 0.
            beta = jnp.where(fresh, 0, safe_div(gamma, c_gamma))
            pap = delta - beta * safe_div(gamma, c_alpha)
            # As in CG: <p, A p> > 0 for a definite operator unless A p = 0, and a
            # preconditioner that is not positive definite shows as gamma <= 0.
            breakdown = ~(pap > 0) | ((rnorm > 0) & ~(gamma > 0))
            alpha = jnp.where(breakdown, 0, safe_div(gamma, pap))
            return alpha, beta, breakdown

        def step(c: _ChronopoulosGear) -> _ChronopoulosGear:
            p = tree_axpy(c.beta, c.p, c.u)
            s = tree_axpy(c.beta, c.s, c.w)
            x = tree_axpy(c.alpha, p, c.x)
            r = tree_axpy(-c.alpha, s, c.r)
            u, w, gamma, delta, rnorm = residual_terms(r)
            alpha, beta, breakdown = next_coefficients(
                gamma, delta, rnorm, c.gamma, c.alpha, False
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
                c.gamma,
                c.alpha,
                rnorm,
                breakdown,
            )

        def replace_residual(c: _ChronopoulosGear, x, r, passed):
            # Residual replacement, as in CG: the direction (and its product `s`)
            # is kept unless the true residual differs from the recursive one by
            # more than 10%.
            del x, passed
            u, w, gamma, delta, rnorm = residual_terms(r)
            drifted = norm2(tree_sub(r, c.r)) > 0.1 * rnorm
            # A pass that ended on a breakdown restarts afresh too. The breakdown
            # test reads `<p, A p>` from its recurrence, a difference of two
            # nearly equal numbers once the residual nears the floor the dtype
            # allows: on positive definite matrices (cond 2e4, rtol 3e-12 in
            # float64) it turned nonpositive, and the solve stopped with
            # `breakdown` ("not positive definite") where CG converged. From a
            # fresh direction `<p, A p> = <A u, u>` is computed directly, and only
            # a nonpositive one is a breakdown.
            fresh = drifted | c.breakdown
            # The coefficients of the step after `p` are recomputed from the new
            # residual, with those of the step that made `p`.
            alpha, beta, breakdown = next_coefficients(
                gamma, delta, rnorm, c.gamma_old, c.alpha_old, fresh
            )
            p = tree_where(fresh, tree_scale(0, c.p), c.p)
            s = tree_where(fresh, tree_scale(0, c.s), c.s)
            breakdown = breakdown & (rnorm > problem.tol)
            return _ChronopoulosGear(
                c.x,
                r,
                u,
                w,
                p,
                s,
                gamma,
                alpha,
                beta,
                c.gamma_old,
                c.alpha_old,
                rnorm,
                breakdown,
            )

        zero = tree_scale(0, problem.r0)
        u, w, gamma, delta, rnorm = residual_terms(problem.r0)
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
            gamma,
            jnp.ones_like(alpha),
            rnorm,
            breakdown & (rnorm > problem.tol),
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
        )
        return iterate(self, problem, method, carry, rnorm=self.norm(problem.r0))
