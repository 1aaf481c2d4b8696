"""`BiCGStab`: the biconjugate gradient stabilised method."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PyTree, Scalar

from .._misc import select
from .._norm import max_norm, tree_dot, two_norm
from .._operator.base import AbstractLinearOperator
from ._krylov import (
    _power_of_two_scale,
    AbstractKrylovSolver,
    AbstractStackedScalars,
    apply,
    counts_exactly,
    first_pass_factor,
    iterate,
    Iteration,
    KrylovState,
    safe_div,
    tree_axpy,
    tree_scale,
    tree_where,
)
from .base import static_number


class _Carry(eqx.Module):
    x: PyTree[Array]
    r: PyTree[Array]
    shadow: PyTree[Array]  # the shadow residual r̂_0
    p: PyTree[Array]
    v: PyTree[Array]
    scalars: Array  # a packed `_Scalars`: one kernel at the end of a step


class _Scalars(AbstractStackedScalars):
    """The step's scalars, in the dtype of the inner products (complex for a
    complex problem; the real quantities and the flags are its real parts).
    Stacked, they are one kernel at the end of a step, where carried one by one
    those passed through or swapped (rho -> rho_old) would cost a copy each."""

    # eps^2 <r̂_0, r̂_0>, fixed between restarts: the first factor of the
    # breakdown tests against the shadow vector (see `large`), multiplied once
    # per restart rather than in every kernel that makes the test.
    shadow_nn: ArrayLike
    rr: ArrayLike  # <r, r>
    rho: ArrayLike  # <r̂_0, r>
    beta: ArrayLike  # the next direction's coefficient: 0 right after a restart
    omega: ArrayLike
    # -1: no step since the last restart; 0; 1: restart before the next step
    # (ends the pass); 2: breakdown.
    status: ArrayLike
    # The half-step test's threshold (squared with the 2-norm), fixed for the
    # solve: carried here rather than closed over, where XLA made it a kernel
    # before the loop.
    half: ArrayLike
    # The residual's norm if the stopping norm is not the 2-norm, else None.
    rnorm: ArrayLike | None
    # Steps made (see `Iteration.steps`); `None` where the dtype cannot count to
    # `max_steps` exactly, and the outer loop counts them.
    steps: ArrayLike | None
    # With `y0`: the units of the recurrence (a power of two: its vectors but `x`,
    # and its scalars, `half` included, are those of `Problem` divided by it,
    # see `restart_from`); `None` without (the units of `Problem`).
    unit: ArrayLike | None = None


_FRESH, _BREAKDOWN = -1, 2  # (`_Scalars.status`)


class BiCGStab(AbstractKrylovSolver):
    """The biconjugate gradient stabilised method, for square operators (van der
    Vorst, 1992; right-preconditioned form of Algorithm 7.7 of Saad, *Iterative
    Methods for Sparse Linear Systems*, 2nd ed., 2003).

    Each step costs two matrix-vector products. Where the textbook method would
    divide by a vanishing quantity (`<r̂, r>`, `<r̂, A p>` or `<A s, s>` small
    relative to the norms of the vectors involved: a cosine below machine
    epsilon; a vanishing `<r̂, A p>` is told from the huge intermediate residual
    it produces, and that step is discarded), it restarts instead, from the
    recomputed residual `b - A y` (one extra matrix-vector product), with that
    residual as the new shadow vector;
    only if a freshly restarted step breaks down again is
    [`lineax.RESULTS.breakdown`][] returned. When the recursively updated residual
    passes the tolerance, the true residual `b - A y` is recomputed, and the
    iteration is restarted from it if it fails. The true residual is also checked
    every 100 steps (without a restart); the iterate with the smallest one is
    returned if the solve does not succeed, and no new best in 10 checks in a row
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

    rtol: float = static_number(float)
    atol: float = static_number(float)
    norm: Callable[[PyTree[Array]], Scalar] = eqx.field(static=True, default=max_norm)
    max_steps: int | None = static_number(int | None, default=None)
    history_length: int | None = static_number(int | None, default=None)
    verbose: bool | int = eqx.field(static=True, default=False)

    def init(
        self, operator: AbstractLinearOperator, options: dict[str, Any]
    ) -> KrylovState:
        return self.square_state(operator, options)

    def compute(
        self, state: KrylovState, vector: PyTree[Array], options: dict[str, Any]
    ):
        precond, problem = self.scaled_problem(state, vector, options)
        eps = problem.eps
        tol = problem.tol
        mv = problem.mv
        # With the 2-norm as the stopping norm, the residual norms come from inner
        # products computed anyway, and the loop works with the squared norm
        # (`Iteration.squared`), so that no step takes a square root of its own.
        two = self.norm is two_norm
        # "Above rounding level", `<r, r> > eps^2 <b, b>`, is tested as
        # `<r, r> / eps^2 > <b, b>`: the same test (both are products by a power
        # of two, exact short of overflow, which gives the same answer), where
        # `eps^2 <b, b>`, invariant, was a kernel of its own before the loop.
        # (Unless `1 / eps^2` overflows, as in float16.)
        bb = jnp.real(tree_dot(problem.vector, problem.vector))
        inv_eps2 = 1 / (eps * eps)
        exact = inv_eps2 < float(jnp.finfo(bb.dtype).max)

        def above_rounding(rr, unit):
            if unit is not None:
                # (In the units of `Problem`; `rr * inv_eps2` first, which does not
                # underflow where `rr` is of the order of 1, as after a restart.)
                rr = rr * inv_eps2 * unit * unit if exact else rr * unit * unit
                return rr > bb if exact else rr > (eps * eps) * bb
            return rr * inv_eps2 > bb if exact else rr > (eps * eps) * bb

        def large(value, eps2_xx, yy):
            # |<x, y>| > eps |x| |y|, in squares (from the squared norms the step
            # has anyway), given `eps^2 <x, x>`: a scale-invariant "numerically
            # not zero" (false for NaN). No square root: each would be a kernel
            # of its own in the loop body. (The squares overflow only where
            # `<y, y>` itself does, in the units of `Problem`.) The step's
            # decisions are written with it rather than with its negation: XLA
            # copies them into each kernel that reads them (the updates of `x`
            # and `r` and the packing of the scalars), each `not` with them.
            return jnp.real(value * jnp.conj(value)) > eps2_xx * yy

        def scalars_of(c: _Carry) -> Any:
            return layout.unpack(c.scalars)

        # Each step needs several inner products; the norms in the breakdown
        # tests reuse them where possible (the shadow's norm changes only on a
        # restart), as each reduction is a pass over memory. A restart ends the
        # pass instead of being a branch of every step (which cost a select of the
        # shadow vector per step): the outer loop verifies, and restarts from the
        # true residual (see `restart_from`).
        def step(c: _Carry) -> _Carry:
            k = scalars_of(c)
            shadow_nn, rr, rho = jnp.real(k.shadow_nn), jnp.real(k.rr), k.rho
            p = tree_axpy(k.beta, tree_axpy(-k.omega, c.v, c.p), c.r)
            phat = apply(precond, p)
            v = mv(phat)
            sigma = tree_dot(c.shadow, v)
            zero = sigma == 0
            alpha = select(zero, 0, rho / select(zero, 1, sigma))
            s = tree_axpy(-alpha, v, c.r)
            shat = apply(precond, s)
            t = mv(shat)
            ts = tree_dot(t, s)
            tt = jnp.real(tree_dot(t, t))
            ss = jnp.real(tree_dot(s, s))
            # A vanishing sigma (`<r̂_0, v>` below eps |r̂_0| |v|) makes alpha, and
            # so `s`, huge: |alpha v| = |r| cos(r̂_0, r) / cos(r̂_0, v), and
            # cos(r̂_0, r) >= eps, or the step before would have restarted. So it
            # is told from `<s, s>`, computed anyway, rather than from a `<v, v>`
            # of its own: `rho` is then numerically zero against `s` (also if `s`
            # is not finite). The step is then dropped (`x` and `r` kept) and the
            # iteration restarts. (A sigma of exactly 0 gives alpha = 0.)
            good_sigma = (sigma != 0) & large(rho, shadow_nn, ss)
            half = jnp.real(k.half)
            half_done = (ss <= half) if two else (problem.norm(s) <= half)
            # (A `<t, t>` of 0 is a bad omega.)
            good_omega = large(ts, (eps * eps) * tt, ss)
            use_omega = good_omega & ~half_done & good_sigma
            # 0 where not used, as the quotient of the selected terms: XLA copies
            # cheap scalar operations into every kernel that reads them, but not a
            # division, so the decision is made once, in the division's kernel,
            # rather than again in the updates of `x` and `r` and in the packing.
            omega = select(use_omega, ts, 0) / select(use_omega, tt, 1).astype(ts.dtype)
            # (`x` is in the units of `Problem`, the directions in the
            # recurrence's.)
            ax, ox = (
                (alpha, omega) if k.unit is None else (alpha * k.unit, omega * k.unit)
            )
            x = tree_where(
                good_sigma, tree_axpy(ox, shat, tree_axpy(ax, phat, c.x)), c.x
            )
            r = tree_where(good_sigma, tree_axpy(-omega, t, s), c.r)
            new_rr = jnp.real(tree_dot(r, r))
            new_rho = tree_dot(c.shadow, r)
            # Right after a restart the shadow vector is the residual itself: a
            # vanishing <r, A P r> cannot be cured by restarting again. (Unless the
            # recursive residual is below rounding level: then its products may
            # underflow, and there is simply nothing left to do.)
            fresh = jnp.real(k.status) == _FRESH
            breakdown = (
                ~good_sigma
                & fresh
                & above_rounding(rr, None if k.unit is None else jnp.real(k.unit))
            )
            keep = good_sigma & good_omega & large(new_rho, shadow_nn, new_rr)
            # 0, 1 (restart) or 2 (`_BREAKDOWN`): a breakdown is a bad sigma, so a
            # restart too. (Two selects: a `not`, two conversions and a sum were
            # four operations in the packing kernel.)
            one = jnp.ones((), ss.dtype)
            status = select(keep, 0, select(breakdown, _BREAKDOWN, one))
            # (rho / rho_old) (alpha / omega), one division: 0 when either
            # denominator is (after a bad sigma, omega is 0).
            beta = safe_div(new_rho * alpha, rho * omega)
            rnorm = None if two else problem.norm(r)
            scalars = _Scalars(
                shadow_nn, new_rr, new_rho, beta, omega, status, k.half, rnorm,
                None if k.steps is None else jnp.real(k.steps) + 1, k.unit,
            )  # fmt: skip
            return _Carry(x, r, c.shadow, p, v, scalars.pack(dtype))

        def restarted(
            r, status, steps, half, rr=None, rnorm=None, unit=None
        ) -> _Scalars:
            # The scalars of a (re)start from `r`, with `r` as the shadow vector;
            # beta = 0 makes the next direction `r`. (`rr` and `rnorm`: `<r, r>`
            # and `norm(r)`, where known.)
            rr = jnp.real(tree_dot(r, r)) if rr is None else rr
            if not two and rnorm is None:
                rnorm = problem.norm(r)
            return _Scalars(
                (eps * eps) * rr, rr, rr, 0, 0, status, half,
                None if two else rnorm, steps, unit,
            )  # fmt: skip

        def restart_from(c: _Carry, x, r, passed) -> _Carry:
            # The recursive residual drifts from the true one. When it passed the
            # tolerance but the true one did not, or the step asked for a restart,
            # restart from the true residual; a periodic check leaves the iteration
            # alone.
            del x
            status = status_of(c)
            # (A breakdown stays one: the outer loop stops on it.)
            new_status = select(status == _BREAKDOWN, _BREAKDOWN, _FRESH)
            k = scalars_of(c)
            half, unit = k.half, None
            if warm:
                # A warm start's residual falls far below the units of `Problem`
                # (those of `b - A y0`): 1e-10 of them after a pass from `y0` of
                # 1e3 for `b` of 1e-3 in float32, where the fourth powers of the
                # breakdown tests (`large`) underflowed to zero, and a freshly
                # restarted step was a `breakdown`. Each restart is made in the
                # units of its residual instead (exactly: a power of two).
                unit, down = _power_of_two_scale(r, problem.rdtype)
                ratio = jnp.real(k.unit) * down  # (old units / new units)
                half = jnp.real(k.half) * (ratio * ratio if two else ratio)
                r = tree_scale(down, r)
            new = restarted(r, new_status, k.steps, half, unit=unit).pack(dtype)
            restart = passed | (status > 0)
            return _Carry(
                c.x,
                tree_where(restart, r, c.r),
                tree_where(restart, r, c.shadow),
                c.p,
                c.v,
                select(restart, new, c.scalars),
            )

        r = problem.r0
        warm = problem.warm
        unit = down = None
        if warm:
            # (In the units of `r0`, which may be up to 2^64 in float32 in those of
            # `Problem`, see `_excess_scale`: fourth powers of that overflow.)
            unit, down = _power_of_two_scale(r, problem.rdtype)
            r = tree_scale(down, r)
        dtype = tree_dot(r, r).dtype
        counts = counts_exactly(dtype, problem.max_steps)
        rr = jnp.real(tree_dot(r, r))
        rnorm = jnp.sqrt(rr) if two else problem.norm(r)
        # The half-step test's threshold: `tol`, or, where the initial residual
        # already meets it, the relative target of `iterate`'s first pass (see
        # there). With `tol` the first half step met it, the step ended the pass
        # and the solve after one step (Newton near its root, whose right-hand
        # side is below the solver's `atol`, then stalled, as it did with GMRES).
        # (`rnorm` and `half` in the recurrence's units, `tol` in `Problem`'s.)
        first = first_pass_factor(self.rtol, eps)
        info = jnp.finfo(problem.rdtype)
        if (
            two
            and not warm
            and self.atol == 0
            # (`rtol^2` a normal number of the dtype, or 0: one that underflows
            # would be flushed to 0 as an input, where `tol^2` is not.)
            and (self.rtol == 0 or info.tiny <= self.rtol**2 <= info.max)
        ):
            # In squares, from `<b, b>` (`tol` is `rtol sqrt(<b, b>)` here, and the
            # initial residual is `b`), with no square root: the packing of the
            # step's scalars then reads none, and `sqrt(<b, b>)` (the initial norm
            # and the target) is computed in the kernel that packs the outer loop's
            # book alone, where it was a kernel of its own, read by both packings
            # (XLA does not copy a square root into each kernel that reads it).
            # The same threshold as `half_tol**2` below but for the rounding of
            # the squares (a few units in the last place).
            tol2 = select(jnp.isfinite(bb), (self.rtol * self.rtol) * bb, jnp.nan)
            half = select(rr <= tol2, (first * first) * rr, tol2).astype(rr.dtype)
        else:
            if unit is not None:
                rnorm = rnorm * unit
            half_tol = select(rnorm <= tol, first * rnorm, tol)
            if down is not None:
                half_tol = half_tol * down
                rnorm = rnorm * down  # (exact: powers of two)
            half = half_tol**2 if two else half_tol
        steps = 0 if counts else None
        layout = restarted(r, _FRESH, steps, half, rr, rnorm, unit)
        carry = _Carry(problem.x0, r, r, r, r, layout.pack(dtype))

        def estimate(c: _Carry) -> Array:
            k = scalars_of(c)
            e = jnp.real(k.rr if two else k.rnorm)
            if k.unit is None:
                return e
            unit = jnp.real(k.unit)
            return e * unit * unit if two else e * unit

        def status_of(c: _Carry) -> Array:
            return jnp.real(scalars_of(c).status)

        method = Iteration(
            step=step,
            estimate=estimate,
            squared=two,
            solution=lambda c: c.x,
            restart=restart_from,
            halted=lambda c: status_of(c) == _BREAKDOWN,
            ends_pass=lambda c: status_of(c) > 0,
            mv_per_step=2,
            pass_length=_CHECK_EVERY,
            patience=_PATIENCE,
            steps=(lambda c: jnp.real(scalars_of(c).steps)) if counts else None,
        )
        return iterate(
            self, problem, method, carry, rnorm=rnorm if unit is None else rnorm * unit
        )


# Steps between true-residual checks (for the best iterate and stagnation).
# (Each costs a product and a few passes over memory, a third of a step: at
# 50 they added 1-2% to the run time of solves of 100-200 steps.) No new best
# true residual in this many checks, 1000 steps, is stagnation.
_CHECK_EVERY = 100
_PATIENCE = 10
