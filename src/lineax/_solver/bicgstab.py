"""`BiCGStab`: the biconjugate gradient stabilised method."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, PyTree, Scalar

from .._norm import max_norm, tree_dot, two_norm
from .._operator.base import AbstractLinearOperator
from ._krylov import (
    AbstractKrylovSolver,
    apply,
    iterate,
    Iteration,
    KrylovState,
    safe_div,
    tree_axpy,
    tree_where,
)
from .base import check_square


class _Carry(eqx.Module):
    x: PyTree[Array]
    r: PyTree[Array]
    shadow: PyTree[Array]  # the shadow residual r̂_0
    shadow_nn: Scalar  # its squared 2-norm, fixed between restarts
    rr: Scalar  # <r, r>
    rho: Scalar  # <r̂_0, r>, for the current r
    rho_old: Scalar  # rho of the step before
    p: PyTree[Array]
    v: PyTree[Array]
    alpha: Scalar  # 0 right after a restart: the next direction is r itself
    omega: Scalar
    rnorm: Scalar  # the residual's norm; squared if it is the 2-norm
    # 0; 1: restart before the next step (ends the pass: see `restart_from`); 2:
    # breakdown. (One value rather than two flags: each is a kernel of the step.)
    status: Array
    fresh: Array  # no step since the last restart


class BiCGStab(AbstractKrylovSolver):
    """The biconjugate gradient stabilised method, for square operators (van der
    Vorst, 1992; right-preconditioned form of Algorithm 7.7 of Saad, *Iterative
    Methods for Sparse Linear Systems*, 2nd ed., 2003).

    Each step costs two matrix-vector products. Where the textbook method would
    divide by a vanishing quantity (`<r̂, r>`, `<r̂, A p>` or `<A s, s>` small
    relative to the norms of the vectors involved: a cosine below machine
    epsilon), it restarts instead, from the recomputed residual `b - A y` (one
    extra matrix-vector product), with that residual as the new shadow vector;
    only if a freshly restarted step breaks down again is
    [`lineax.RESULTS.breakdown`][] returned. When the recursively updated residual
    passes the tolerance, the true residual `b - A y` is recomputed, and the
    iteration is restarted from it if it fails. The true residual is also checked
    every 50 steps (without a restart); the iterate with the smallest one is
    returned if the solve does not succeed, and no new best in 20 checks in a row
    stops the solve with [`lineax.RESULTS.stagnation`][].

    **Arguments:**

    - `rtol`, `atol`: success means `norm(b - A y) <= atol + rtol * norm(b)`,
        checked on a recomputed residual.
    - `norm`: the norm of that test. Defaults to the max norm.
    - `max_steps`: the maximum number of steps (two matrix-vector products each).
        `None` means 10 × the problem size.
    - `history_length`, `verbose`: as for [`lineax.CG`][].

    **Options:**

    - `preconditioner`: a positive definite operator approximating the inverse of
        the operator (used on the right).
    - `y0`: an initial guess for the solution.
    """

    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    norm: Callable[[PyTree[Array]], Scalar] = eqx.field(static=True, default=max_norm)
    max_steps: int | None = eqx.field(static=True, default=None)
    history_length: int | None = eqx.field(static=True, default=None)
    verbose: bool | int = eqx.field(static=True, default=False)

    def init(
        self, operator: AbstractLinearOperator, options: dict[str, Any]
    ) -> KrylovState:
        check_square(operator, "BiCGStab")
        self.checked_options(operator, options)
        return KrylovState(operator)

    def compute(
        self, state: KrylovState, vector: PyTree[Array], options: dict[str, Any]
    ):
        operator = state.operator
        precond, y0 = self.checked_options(operator, options)
        problem = self.problem(operator, vector, y0)
        eps = problem.eps
        tol = problem.tol
        mv = problem.mv
        # With the 2-norm as the stopping norm, the residual norms come from inner
        # products computed anyway, and the loop works with the squared norm
        # (`Iteration.squared`), so that no step takes a square root of its own.
        two = self.norm is two_norm
        tiny = (eps * eps) * jnp.real(tree_dot(problem.vector, problem.vector))

        def small(value, xx, yy):
            # |<x, y>| <= eps |x| |y|, in squares (from the squared norms the step
            # has anyway): a scale-invariant "numerically zero". No square root:
            # each would be a kernel of its own in the loop body. (The squares
            # overflow only where `<y, y>` itself does, in the units of `Problem`.)
            return ~(jnp.real(value * jnp.conj(value)) > (eps * eps) * xx * yy)

        def estimate_of(r, rr):
            return rr if two else problem.norm(r)

        # Each step needs several inner products; the norms in the breakdown
        # tests reuse them where possible (the shadow's norm changes only on a
        # restart), as each reduction is a pass over memory. A restart ends the
        # pass instead of being a branch of every step (which cost a select of the
        # shadow vector per step): the outer loop verifies, and restarts from the
        # true residual (see `restart_from`).
        def step(c: _Carry) -> _Carry:
            # (rho / rho_old) (alpha / omega), one division: 0 when either
            # denominator is (a restart: alpha = 0 already makes beta 0).
            beta = safe_div(c.rho * c.alpha, c.rho_old * c.omega)
            p = tree_axpy(beta, tree_axpy(-c.omega, c.v, c.p), c.r)
            phat = apply(precond, p)
            v = mv(phat)
            sigma = tree_dot(c.shadow, v)
            bad_sigma = small(sigma, c.shadow_nn, jnp.real(tree_dot(v, v)))
            # Right after a restart the shadow vector is the residual itself: a
            # vanishing <r, A P r> cannot be cured by restarting again. (Unless the
            # recursive residual is below rounding level: then its products may
            # underflow, and there is simply nothing left to do.)
            breakdown = bad_sigma & c.fresh & (c.rr > tiny)
            alpha = jnp.where(bad_sigma, 0, safe_div(c.rho, sigma))
            s = tree_axpy(-alpha, v, c.r)
            ss = jnp.real(tree_dot(s, s))
            half_done = (ss <= tol * tol) if two else (problem.norm(s) <= tol)
            shat = apply(precond, s)
            t = mv(shat)
            ts = tree_dot(t, s)
            tt = jnp.real(tree_dot(t, t))
            bad_omega = small(ts, tt, ss)
            omega = jnp.where(
                bad_omega | half_done, 0, safe_div(ts, tt.astype(ts.dtype))
            )
            x = tree_axpy(omega, shat, tree_axpy(alpha, phat, c.x))
            r = tree_axpy(-omega, t, s)
            rr = jnp.real(tree_dot(r, r))
            rho = tree_dot(c.shadow, r)
            restart = bad_sigma | bad_omega | small(rho, c.shadow_nn, rr)
            # (A breakdown is a bad sigma, so also a restart.)
            status = jnp.where(breakdown, _BREAKDOWN, restart.astype(jnp.int32))
            return _Carry(
                x, r, c.shadow, c.shadow_nn, rr, rho, c.rho, p, v, alpha, omega,
                estimate_of(r, rr), status, jnp.array(False),
            )  # fmt: skip

        def restarted(c: _Carry, r) -> _Carry:
            # From `r`, with `r` as the shadow vector; alpha = 0 makes the next
            # direction `r`.
            rr = jnp.real(tree_dot(r, r))
            zero = jnp.zeros((), c.alpha.dtype)
            return _Carry(
                c.x, r, r, rr, rr, rr.astype(c.rho.dtype), c.rho_old, c.p,
                c.v, zero, c.omega, estimate_of(r, rr),
                jnp.where(c.status == _BREAKDOWN, _BREAKDOWN, 0), jnp.array(True),
            )  # fmt: skip

        def restart_from(c: _Carry, x, r, passed) -> _Carry:
            # The recursive residual drifts from the true one. When it passed the
            # tolerance but the true one did not, or the step asked for a restart,
            # restart from the true residual; a periodic check leaves the iteration
            # alone.
            del x
            return tree_where(passed | (c.status > 0), restarted(c, r), c)

        r = problem.r0
        one = jnp.ones((), tree_dot(r, r).dtype)
        carry = restarted(
            _Carry(
                problem.x0,
                r,
                r,
                one.real,
                one.real,
                one,
                one,
                r,
                r,
                one,
                one,
                one.real,
                jnp.array(0, jnp.int32),
                jnp.array(True),
            ),  # fmt: skip
            r,
        )
        method = Iteration(
            step=step,
            estimate=lambda c: c.rnorm,
            squared=two,
            solution=lambda c: c.x,
            restart=restart_from,
            halted=lambda c: c.status == _BREAKDOWN,
            ends_pass=lambda c: c.status > 0,
            mv_per_step=2,
            pass_length=_CHECK_EVERY,
        )
        rnorm = jnp.sqrt(carry.rnorm) if two else carry.rnorm
        return iterate(self, problem, method, carry, rnorm=rnorm)


_BREAKDOWN = 2  # (`_Carry.status`)
# Steps between true-residual checks (for the best iterate and stagnation).
_CHECK_EVERY = 50
