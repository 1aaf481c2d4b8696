"""`LSMR`: least squares and minimum norm solutions of any-shaped systems."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree, Scalar

from .._misc import tree_is_complex
from .._norm import two_norm
from .._operator.base import AbstractLinearOperator, conj
from ._krylov import (
    AbstractKrylovSolver,
    adapted_tolerance,
    apply,
    conj_options,
    eps_of,
    initial_residual,
    KrylovState,
    norm2,
    real_dtype,
    result_of,
    safe_div,
    stats_of,
    transpose_options,
    tree_axpy,
    tree_scale,
    tree_sub,
)


def _sym_ortho(a: Array, b: Array) -> tuple[Array, Array, Array]:
    """A stable real Givens rotation: `(c, s, r)` with `[c s; -s c] [a; b] = [r; 0]`
    (Choi, Paige and Saunders 2011, Table 2.9). `(1, 0, 0)` for `a = b = 0`."""
    r = jnp.hypot(a, b)
    safe = jnp.where(r == 0, 1, r)
    c = jnp.where(r == 0, 1, a / safe)
    s = jnp.where(r == 0, 0, b / safe)
    return c, s, r


class _Carry(eqx.Module):
    """The LSMR recurrences, named as in Fong and Saunders (2011), Section 7."""

    x: PyTree[Array]
    u: PyTree[Array]
    v: PyTree[Array]
    h: PyTree[Array]
    hbar: PyTree[Array]
    alpha: Scalar
    beta: Scalar
    alphabar: Scalar
    zeta: Scalar
    zetabar: Scalar
    rho: Scalar
    rhobar: Scalar
    cbar: Scalar
    sbar: Scalar
    # For the estimate of the residual norm.
    betadd: Scalar
    betad: Scalar
    rhodold: Scalar
    tautildeold: Scalar
    thetatilde: Scalar
    d: Scalar
    # For the estimates of norm(A) and cond(A).
    norm_a2: Scalar
    maxrbar: Scalar
    minrbar: Scalar
    normr: Scalar
    normar: Scalar
    norm_a: Scalar
    cond_a: Scalar
    steps: Array


class _Outer(eqx.Module):
    carry: _Carry
    rnorm: Scalar  # the solver's norm of the last true (augmented) residual
    converged: Array
    factor: Scalar


class LSMR(AbstractKrylovSolver):
    """LSMR, for operators of any shape: the least-squares solution of
    overdetermined systems, the minimum-norm solution of underdetermined ones, and
    the minimum-norm least-squares solution of rank-deficient ones (Fong and
    Saunders, 2011, "LSMR: an iterative algorithm for sparse least-squares
    problems", SIAM J. Sci. Comput. 33(5)).

    It is MINRES applied to the normal equations `A^H A x = A^H b` without forming
    them, so `||A^H r||` decreases monotonically; the condition number is not
    squared as with [`lineax.Normal`][].

    **Stopping rule.** Success means, on a recomputed residual `r = b - A y`, either

    1. `norm(r) <= atol + rtol * norm(b)` (the system is consistent and solved), or
    2. `||A^H r||_2 <= rtol * ||A|| * ||r||_2` (the normal equations are solved to
        relative accuracy `rtol`: the test for inconsistent systems; it is the
        paper's test 2 with its `atol` set to our `rtol`, and `||A||` is LSMR's
        estimate of the Frobenius norm of the operator).

    The iteration stops when LSMR's estimates of these quantities pass them, then
    verifies them on the true residual (continuing with tighter thresholds if that
    fails). The paper's test 1 is replaced by the first rule, so that success means
    the same as for the other Krylov solvers. If LSMR's estimate of the condition
    number exceeds `conlim` first, [`lineax.RESULTS.conlim`][] is returned.

    With the `damp` option, LSMR solves the damped problem
    `min ||A x - b||^2 + damp^2 ||x||^2`; the residual in both rules is then the
    residual `(b - A y, -damp y)` of the equivalent stacked system. (With `y0` or a
    preconditioner `N`, the damping applies to the correction `z`, `y = y0 + N z`.)

    Starting from `y0` gives `y0` plus the minimum-norm correction, which is the
    minimum-norm solution only if `y0` is in the row space of `A`.

    Because the solution is a pseudoinverse solution of a possibly rank-deficient
    operator, `assume_full_rank()` is `False` (its derivative uses the general
    pseudoinverse JVP).

    **Arguments:**

    - `rtol`, `atol`: as above.
    - `norm`: the norm of rule 1. Defaults to the 2-norm.
    - `max_steps`: the maximum number of steps (one product with `A` and one with
        `A^H` each). `None` means 10 × the larger dimension of the operator.
    - `conlim`: the bound on the estimated condition number.

    **Options:**

    - `damp`: a nonnegative scalar, for damped least squares (default 0).
    - `preconditioner`: a positive definite operator `N` on the operator's input
        space, used on the right: LSMR is run on `A N` and `y = N z` is returned.
        A good choice scales the columns of `A` to unit norm. For rank-deficient or
        underdetermined problems this changes which solution is found (the one
        minimising `||N^{-1/2} y||`-like quantities, not `||y||`). The transposed
        solve made in reverse mode does not use it (it is not a preconditioner of
        `A^T`'s input space).
    - `y0`: an initial guess for the solution.
    """

    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    norm: Callable[[PyTree[Array]], Scalar] = eqx.field(static=True, default=two_norm)
    max_steps: int | None = eqx.field(static=True, default=None)
    conlim: float = eqx.field(static=True, default=1e8)

    def __check_init__(self):
        if isinstance(self.conlim, bool) or not isinstance(self.conlim, (int, float)):
            raise TypeError(f"`conlim` must be a Python float, got {self.conlim!r}.")
        if not self.conlim > 0:
            raise ValueError(f"`conlim` must be positive, got {self.conlim}.")

    def init(
        self, operator: AbstractLinearOperator, options: dict[str, Any]
    ) -> KrylovState:
        # A right preconditioner: it maps the operator's input space to itself.
        self.checked_options(operator, options, right_preconditioner=True)
        return KrylovState(operator)

    def compute(
        self, state: KrylovState, vector: PyTree[Array], options: dict[str, Any]
    ):
        operator = state.operator
        precond, y0 = self.checked_options(operator, options, right_preconditioner=True)
        max_steps = self.resolve_max_steps(operator)
        in_structure = operator.in_structure()
        complex_ = tree_is_complex(in_structure) or tree_is_complex(
            operator.out_structure()
        )
        eps = eps_of(in_structure)
        rdtype = real_dtype(in_structure)
        damp_given = options.get("damp", None) is not None
        damp = jnp.asarray(options.get("damp", 0.0), rdtype) if damp_given else None
        damp_value = jnp.zeros((), rdtype) if damp is None else damp
        rtol = self.rtol
        tol = self.tolerance(vector)
        transposed = operator.transpose()

        def mv(x):
            return operator.mv(apply(precond, x))

        def rmv(y):
            # (A N)^H y = N^H A^H y, with N Hermitian; A^H y = conj(A^T conj(y)).
            if complex_:
                y = jtu.tree_map(jnp.conj, y)
            out = transposed.mv(y)
            if complex_:
                out = jtu.tree_map(jnp.conj, out)
            return apply(precond, out)

        def residual_norm(z, r):
            # The residual of the stacked system [A N; damp I] z = [b - A y0; 0].
            if damp is None:
                return self.norm(r)
            return self.norm((r, tree_scale(-damp, z)))

        def step(c: _Carry) -> _Carry:
            # Golub-Kahan bidiagonalisation.
            u = tree_axpy(-c.alpha, c.u, mv(c.v))
            beta = norm2(u)
            u = tree_scale(safe_div(1, beta), u)
            v = tree_axpy(-beta, c.v, rmv(u))
            alpha = norm2(v)
            v = tree_scale(safe_div(1, alpha), v)
            # Rotation Qhat eliminating the damping term.
            chat, shat, alphahat = _sym_ortho(c.alphabar, damp_value)
            # Rotation Q turning B into R.
            rhoold = c.rho
            cc, s, rho = _sym_ortho(alphahat, beta)
            thetanew = s * alpha
            alphabar = cc * alpha
            # Rotation Qbar turning R^T into Rbar.
            rhobarold = c.rhobar
            zetaold = c.zeta
            thetabar = c.sbar * rho
            rhotemp = c.cbar * rho
            cbar, sbar, rhobar = _sym_ortho(c.cbar * rho, thetanew)
            zeta = cbar * c.zetabar
            zetabar = -sbar * c.zetabar
            # Update h, hbar, x.
            hbar = tree_axpy(-safe_div(thetabar * rho, rhoold * rhobarold), c.hbar, c.h)
            x = tree_axpy(safe_div(zeta, rho * rhobar), hbar, c.x)
            h = tree_axpy(-safe_div(thetanew, rho), c.h, v)
            # Estimate of ||r||.
            betaacute = chat * c.betadd
            betacheck = -shat * c.betadd
            betahat = cc * betaacute
            betadd = -s * betaacute
            thetatildeold = c.thetatilde
            ctildeold, stildeold, rhotildeold = _sym_ortho(c.rhodold, thetabar)
            thetatilde = stildeold * rhobar
            rhodold = ctildeold * rhobar
            betad = -stildeold * c.betad + ctildeold * betahat
            tautildeold = safe_div(zetaold - thetatildeold * c.tautildeold, rhotildeold)
            taud = safe_div(zeta - thetatilde * tautildeold, rhodold)
            d = c.d + betacheck**2
            normr = jnp.sqrt(d + (betad - taud) ** 2 + betadd**2)
            # Estimates of ||A|| and cond(A).
            norm_a = jnp.sqrt(c.norm_a2 + beta**2)
            norm_a2 = c.norm_a2 + beta**2 + alpha**2
            maxrbar = jnp.maximum(c.maxrbar, rhobarold)
            minrbar = jnp.where(
                c.steps > 0, jnp.minimum(c.minrbar, rhobarold), c.minrbar
            )
            cond_a = safe_div(
                jnp.maximum(maxrbar, rhotemp), jnp.minimum(minrbar, rhotemp)
            )
            return _Carry(
                x, u, v, h, hbar, alpha, beta, alphabar, zeta, zetabar, rho, rhobar,
                cbar, sbar, betadd, betad, rhodold, tautildeold, thetatilde, d,
                norm_a2, maxrbar, minrbar, normr, jnp.abs(zetabar), norm_a, cond_a,
                c.steps + 1,
            )  # fmt: skip

        x0, r0 = initial_residual(operator.mv, vector, y0, in_structure)
        # LSMR runs on the correction z (x = x0 + N z), from z = 0.
        beta = norm2(r0)
        u = tree_scale(safe_div(1, beta), r0)
        v = rmv(u)
        alpha = norm2(v)
        v = tree_scale(safe_div(1, alpha), v)
        zero = jnp.zeros((), rdtype)
        one = jnp.ones((), rdtype)
        z0 = tree_scale(0, v)
        carry = _Carry(
            z0, u, v, v, z0, alpha, beta, alpha, zero, alpha * beta, one, one, one,
            zero, beta, zero, one, zero, zero, zero, alpha**2, zero,
            jnp.asarray(jnp.finfo(rdtype).max, rdtype), beta, alpha * beta,
            alpha, one, jnp.array(0, jnp.int32),
        )  # fmt: skip

        def solution(c: _Carry):
            return jtu.tree_map(lambda a, b: a + b, x0, apply(precond, c.x))

        def true_tests(c: _Carry):
            r = tree_sub(vector, operator.mv(solution(c)))
            rnorm = residual_norm(c.x, r)
            # Normal-equations residual (A N)^H r - damp^2 z, and ||(r, damp z)||_2.
            ar = rmv(r)
            if damp is not None:
                ar = tree_axpy(-(damp**2), c.x, ar)
                r2 = jnp.sqrt(norm2(r) ** 2 + (damp * norm2(c.x)) ** 2)
            else:
                r2 = norm2(r)
            normal_ok = norm2(ar) <= rtol * c.norm_a * r2
            return rnorm, (rnorm <= tol) | normal_ok

        rnorm = residual_norm(z0, r0)
        outer = _Outer(carry, rnorm, (rnorm <= tol) | (alpha * beta == 0), one)

        def inner_done(c: _Carry, inner_tol, factor):
            test1 = c.normr <= inner_tol
            test2 = c.normar <= factor * rtol * c.norm_a * c.normr
            return test1 | test2

        def running(o: _Outer):
            c = o.carry
            return ~o.converged & (c.cond_a <= self.conlim) & (c.steps < max_steps)

        def verify(o: _Outer) -> _Outer:
            inner_tol = adapted_tolerance(o.carry.normr, o.rnorm, tol, o.factor)

            def inner_running(c: _Carry):
                return (
                    ~inner_done(c, inner_tol, o.factor)
                    & (c.cond_a <= self.conlim)
                    & (c.steps < max_steps)
                )

            c = lax.while_loop(inner_running, step, o.carry)
            rnorm, converged = true_tests(c)
            factor = jnp.where(
                inner_done(c, inner_tol, o.factor) & ~converged,
                jnp.maximum(eps, 0.5 * o.factor),
                o.factor,
            )
            return _Outer(c, rnorm, converged, factor)

        outer = lax.while_loop(running, verify, outer)
        c = outer.carry
        # alpha * beta = 0 at the start: A^H b = 0, so x0 already solves the normal
        # equations (e.g. b = 0).
        result = result_of(outer.converged, conlim=c.cond_a > self.conlim)
        return solution(c), result, stats_of(c.steps, max_steps)

    def transpose(self, state: KrylovState, options: dict[str, Any]):
        return KrylovState(state.operator.transpose()), transpose_options(
            options, keep_preconditioner=False
        )

    def conj(self, state: KrylovState, options: dict[str, Any]):
        return KrylovState(conj(state.operator)), conj_options(options)

    def assume_full_rank(self) -> bool:
        return False
