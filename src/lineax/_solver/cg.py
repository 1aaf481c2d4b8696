"""`CG`: the (preconditioned) conjugate gradient method, and `NormalCG`."""

import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, PyTree, Scalar

from .._misc import select, static_number
from .._norm import max_norm, tree_dot, two_norm
from ._definite import AbstractDefiniteKrylovSolver
from ._krylov import (
    AbstractStackedScalars,
    apply,
    counts_exactly,
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
from .normal import Normal


class _CGCarry(eqx.Module):
    """The CG recurrences (Saad, Algorithm 9.1), with the direction update at the
    start of a step rather than at the end: `p = z + beta p_old`, with
    `beta = rho / rho_old`."""

    x: PyTree[Array]
    r: PyTree[Array]  # recursively updated residual
    z: PyTree[Array] | None  # P r; `None` without a preconditioner (z = r)
    p: PyTree[Array]  # the last search direction (see `replace_residual`)
    scalars: Array  # a packed `_CGScalars`


class _CGScalars(AbstractStackedScalars):
    """The step's scalars, stacked: one kernel at the end of a step, where carried
    one by one the swap `rho -> rho_old` cost three copies and the step count a
    kernel of its own. `beta` is computed in that kernel too, rather than by a
    kernel of its own at the start of the next step."""

    rho: ArrayLike  # <r, P r>
    # The next direction's coefficient, rho / rho_old (0 where rho_old is 0: the
    # first step, whose direction is z).
    beta: ArrayLike
    # <p, A p> of the last step: <= 0 (or NaN) is a breakdown. Tested in the loop
    # condition, where it costs no kernel of its own.
    pap: ArrayLike
    # Steps made (see `Iteration.steps`); `None` where the dtype cannot count to
    # `max_steps` exactly, and the outer loop counts them.
    steps: ArrayLike | None
    # norm(r), with the solver's norm; `None` where that is sqrt(rho).
    rnorm: ArrayLike | None


class CG(AbstractDefiniteKrylovSolver):
    """The conjugate gradient method, for positive or negative (semi)definite
    operators (Hestenes and Stiefel, 1952; the preconditioned form is Algorithm 9.1
    of Saad, *Iterative Methods for Sparse Linear Systems*, 2nd ed., 2003).

    The operator must carry [`lineax.positive_semidefinite_tag`][] or
    [`lineax.negative_semidefinite_tag`][] (for complex operators: Hermitian
    definite); a negative definite operator is solved as `(-A) x = -b`. It must
    in fact be definite: a singular operator gives `breakdown`, `max_steps_reached`,
    `stagnation` or `singular`, never a `successful` wrong answer.

    Every `stabilise_every` steps the recursively updated residual is replaced by
    the true residual `b - A y`. Where the two differ by more than 10% (rounding
    has taken over: the tolerance is near what the dtype can reach), the search
    direction is restarted too, as keeping a direction built for the old residual
    makes the iteration diverge. The iterate with the smallest true residual is
    returned if the solve does not succeed; no new best residual in 20
    replacements in a row, or three passes whose recursive residual ended 4x below
    the true one without the true one halving (the tolerance is below the dtype's
    floor), stop the solve with `stagnation`.

    **Arguments:**

    - `rtol`, `atol`: success means `norm(b - A y) <= atol + rtol * norm(b)`,
        checked on a recomputed residual. With both zero (and `max_steps` given),
        exactly `max_steps` steps are made and the solve reports success.
    - `norm`: the norm of that test. Defaults to the max norm.
    - `stabilise_every`: the number of steps between residual replacements (one
        extra matrix-vector product each). `None` means only at the end.
    - `max_steps`: the maximum number of steps (one matrix-vector product each, not
        counting the replacements). `None` means 10 × the problem size.
    - `history_length`: the length of `stats["residual_history"]` (default:
        `max_steps`, at most 10,000); every `k`-th step's residual is recorded
        when it is shorter than `max_steps`.
    - `verbose`: print the step, the residual estimate and the target every this
        many steps (`True`: every step), through `jax.debug.callback`; off by
        default, and free when off.

    **Options:**

    - `preconditioner`: a positive definite operator approximating the inverse of
        the operator (of `-A` for a negative definite `A`).
    - `y0`: an initial guess for the solution.
    """

    rtol: float = eqx.field(static=True, converter=static_number)
    atol: float = eqx.field(static=True, converter=static_number)
    norm: Callable[[PyTree[Array]], Scalar] = eqx.field(static=True, default=max_norm)
    stabilise_every: int | None = eqx.field(
        static=True, default=10, converter=static_number
    )
    max_steps: int | None = eqx.field(
        static=True, default=None, converter=static_number
    )
    history_length: int | None = eqx.field(
        static=True, default=None, converter=static_number
    )
    verbose: bool | int = eqx.field(static=True, default=False)

    def compute(
        self, state: KrylovState, vector: PyTree[Array], options: dict[str, Any]
    ):
        precond, problem, mv = self.definite_problem(state, vector, options)
        # Without a preconditioner rho = <r, r>, so a 2-norm of the residual is
        # sqrt(rho): one reduction per step instead of two (JAX's CG does the same),
        # and the loop works with rho itself (a squared estimate), so that no step
        # takes a square root.
        rho_is_norm = precond is None and self.norm is two_norm

        def residual_terms(r):
            # Everything that depends on the residual alone: (P r, <r, P r>, norm).
            z = apply(precond, r)
            rho = jnp.real(tree_dot(r, z))
            return (
                None if precond is None else z,
                rho,
                None if rho_is_norm else problem.norm(r),
            )

        def scalars_of(c: _CGCarry) -> Any:
            return layout.unpack(c.scalars)

        def rnorm_of(c: _CGCarry):
            k = scalars_of(c)
            return jnp.sqrt(k.rho) if k.rnorm is None else k.rnorm

        def halted(c: _CGCarry):
            # For a (semi)definite operator <p, A p> > 0 unless A p = 0: a sign test
            # is scale-invariant, and catches NaN too.
            k = scalars_of(c)
            breakdown = ~(k.pap > 0)
            if precond is not None:
                # A preconditioner that is not positive definite shows as
                # <r, P r> <= 0.
                breakdown = breakdown | ((rnorm_of(c) > problem.tol) & ~(k.rho > 0))
            return breakdown

        def step(c: _CGCarry) -> _CGCarry:
            # The old direction is read once, first: its buffer is then free for
            # the new one (with the update at the end of the step, as in JAX's CG,
            # XLA copies the direction on every step).
            k = scalars_of(c)
            z = c.r if c.z is None else c.z
            p = tree_axpy(k.beta, c.p, z)
            ap = mv(p)
            pap = jnp.real(tree_dot(p, ap))
            ok = pap > 0
            alpha = select(ok, k.rho / select(ok, pap, 1), 0)
            x = tree_axpy(alpha, p, c.x)
            r = tree_axpy(-alpha, ap, c.r)
            z, rho, rnorm = residual_terms(r)
            steps = None if k.steps is None else k.steps + 1
            new = _CGScalars(rho, safe_div(rho, k.rho), pap, steps, rnorm)
            return _CGCarry(x, r, z, p, new.pack(dtype))

        def replace_residual(c: _CGCarry, x, r, passed) -> _CGCarry:
            # Residual replacement. The next direction is the one the recursive
            # residual makes (so CG's convergence is unchanged), unless the true
            # residual differs from the recursive one by more than 10%: then
            # rounding dominates, and a direction conjugate to the old residual's
            # history would make `alpha` jump, so the direction restarts. The next
            # step makes `z + beta p` with `beta = rho / rho` (1), so `p` is
            # stored as that direction minus `z` (0 for a restart): this costs no
            # flag in the carry, nor its kernel.
            del x, passed
            k = scalars_of(c)
            z, rho, rnorm = residual_terms(r)
            # ||r - r_rec|| > 0.1 ||r||, in squares (rho is <r, r> without a
            # preconditioner).
            rr = rho if precond is None else jnp.real(tree_dot(r, r))
            gap = tree_sub(r, c.r)
            drifted = jnp.real(tree_dot(gap, gap)) > 0.01 * rr
            z_old = c.r if c.z is None else c.z
            z_new = r if z is None else z
            p = tree_axpy(k.beta, c.p, tree_sub(z_old, z_new))
            p = tree_where(drifted, tree_scale(0, p), p)
            new = _CGScalars(rho, safe_div(rho, rho), k.pap, k.steps, rnorm)
            return _CGCarry(c.x, r, z, p, new.pack(dtype))

        z, rho, rnorm = residual_terms(problem.r0)
        dtype = rho.dtype
        counts = counts_exactly(dtype, problem.max_steps)
        # beta = 0: the first direction is z itself (any vector will do as the
        # "old" direction it is added to with weight 0).
        layout = _CGScalars(rho, 0, 1, 0 if counts else None, rnorm)
        carry = _CGCarry(problem.x0, problem.r0, z, problem.r0, layout.pack(dtype))

        def estimate(c: _CGCarry) -> Array:
            k = scalars_of(c)
            return k.rho if rho_is_norm else k.rnorm

        method = Iteration(
            step=step,
            estimate=estimate,
            squared=rho_is_norm,
            solution=lambda c: c.x,
            restart=replace_residual,
            halted=halted,
            pass_length=self.stabilise_every,
            below_floor=lambda c, rnorm: rnorm > FLOOR_GAP * rnorm_of(c),
            steps=(lambda c: scalars_of(c).steps) if counts else None,
            # Each verification replaces the residual, so the next pass's estimate
            # starts from the true residual: see `Iteration.free_misses`.
            # (Halving the target after a float32 pass whose true residual
            # missed the tolerance by its 1-5% of drift made 20 of the 200
            # right-hand sides of the `vmap` benchmark take 3-5 more steps, and
            # the batch runs to its slowest element.)
            free_misses=2,
        )
        return iterate(self, problem, method, carry, rnorm=rnorm_of(carry))


def NormalCG(
    rtol: float,
    atol: float,
    norm: Callable[[PyTree[Array]], Scalar] = max_norm,
    stabilise_every: int | None = 10,
    max_steps: int | None = None,
    history_length: int | None = None,
    verbose: bool | int = False,
) -> Normal:
    """CG on the normal equations: the same as
    `lx.Normal(lx.CG(rtol, atol, norm, stabilise_every, max_steps))`.

    Deprecated (kept for compatibility); use [`lineax.Normal`][] with
    [`lineax.CG`][], or better [`lineax.LSMR`][], which does not square the
    condition number. Note that the tolerances apply to the residual of the
    normal equations.

    **Arguments:** as for [`lineax.CG`][].

    **Returns:** a [`lineax.Normal`][] solver.
    """
    # A `DeprecationWarning` at construction, as lineax 0.1.1 gives (so that code
    # moving between the two sees the same warnings).
    warnings.warn(
        "`lx.NormalCG(...)` is deprecated: use `lx.Normal(lx.CG(...))`, or "
        "`lx.LSMR(...)`, which does not square the condition number.",
        DeprecationWarning,
        stacklevel=2,
    )
    return Normal(
        CG(
            rtol,
            atol,
            norm,
            stabilise_every=stabilise_every,
            max_steps=max_steps,
            history_length=history_length,
            verbose=verbose,
        )
    )
