"""`MINRES`: the minimal residual method for symmetric (Hermitian) operators."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
from jaxtyping import Array, PyTree, Scalar

from .._misc import tree_is_complex
from .._norm import max_norm, tree_dot
from .._operator.base import (
    AbstractLinearOperator,
    conj,
    is_negative_semidefinite,
    is_positive_semidefinite,
    is_symmetric,
)
from ._krylov import (
    AbstractKrylovSolver,
    adapted_tolerance,
    apply,
    conj_options,
    eps_of,
    initial_residual,
    KrylovState,
    real_dtype,
    result_of,
    safe_div,
    stats_of,
    transpose_options,
    tree_axpy,
    tree_scale,
    tree_sub,
)
from .base import check_square, check_tag


class _Lanczos(eqx.Module):
    """The MINRES recurrences, named as in Paige and Saunders (1975) and in
    Saunders' reference implementation."""

    x: PyTree[Array]
    r1: PyTree[Array]  # previous and current (unnormalised) Lanczos vectors
    r2: PyTree[Array]
    y: PyTree[Array]  # P r2
    w: PyTree[Array]  # search directions
    w2: PyTree[Array]
    beta: Scalar
    oldb: Scalar
    dbar: Scalar
    epsln: Scalar
    phibar: Scalar  # residual estimate, in the norm induced by the preconditioner
    cs: Scalar
    sn: Scalar
    steps: Array
    exhausted: Array  # the Krylov space is invariant: no further progress
    breakdown: Array


class _Outer(eqx.Module):
    lanczos: _Lanczos
    rnorm: Scalar  # norm of the last true residual
    factor: Scalar


class MINRES(AbstractKrylovSolver):
    """The minimal residual method, for symmetric (Hermitian), possibly indefinite
    operators (Paige and Saunders, 1975, "Solution of sparse indefinite systems of
    linear equations", SIAM J. Numer. Anal. 12(4); preconditioned as in Choi,
    Paige and Saunders, 2011, MINRES-QLP, Table 2.1 without the QLP part).

    A real operator must be symmetric ([`lineax.symmetric_tag`][], or a
    semidefinite tag). A complex operator must be Hermitian, which lineax's tags
    express only through [`lineax.positive_semidefinite_tag`][] or
    [`lineax.negative_semidefinite_tag`][] (`symmetric_tag` means `A^T = A`, which
    for complex operators is not what MINRES needs).

    MINRES minimises the residual (in the norm induced by the preconditioner) over
    the Krylov space, with short recurrences. Its residual estimate stops the
    iteration; the true residual `b - A y` is then recomputed and decides success
    (if it fails, the iteration carries on with a tighter estimate threshold). For
    a singular, inconsistent system MINRES converges to a least-squares solution,
    which is reported as `max_steps_reached` or `breakdown`, never `successful`.

    **Arguments:**

    - `rtol`, `atol`: success means `norm(b - A y) <= atol + rtol * norm(b)`,
        checked on a recomputed residual.
    - `norm`: the norm of that test. Defaults to the max norm.
    - `max_steps`: the maximum number of steps (one matrix-vector product each; the
        residual recomputations are not counted). `None` means 10 × the problem
        size.

    **Options:**

    - `preconditioner`: a positive definite operator approximating the inverse of
        the operator (MINRES needs it definite even when the operator is not).
    - `y0`: an initial guess for the solution.
    """

    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    norm: Callable[[PyTree[Array]], Scalar] = eqx.field(static=True, default=max_norm)
    max_steps: int | None = eqx.field(static=True, default=None)

    def init(
        self, operator: AbstractLinearOperator, options: dict[str, Any]
    ) -> KrylovState:
        check_square(operator, "MINRES")
        hermitian = is_positive_semidefinite(operator) or is_negative_semidefinite(
            operator
        )
        if tree_is_complex(operator.in_structure()) or tree_is_complex(
            operator.out_structure()
        ):
            check_tag(
                hermitian,
                "MINRES",
                "Hermitian (for a complex operator)",
                "`lx.positive_semidefinite_tag` or `lx.negative_semidefinite_tag`",
            )
        else:
            check_tag(
                hermitian or is_symmetric(operator),
                "MINRES",
                "symmetric",
                "`lx.symmetric_tag`",
            )
        self.checked_options(operator, options)
        return KrylovState(operator)

    def compute(
        self, state: KrylovState, vector: PyTree[Array], options: dict[str, Any]
    ):
        operator = state.operator
        precond, y0 = self.checked_options(operator, options)
        max_steps = self.resolve_max_steps(operator)
        structure = operator.in_structure()
        eps = eps_of(structure)
        rdtype = real_dtype(structure)
        tol = self.tolerance(vector)
        mv = operator.mv

        def step(c: _Lanczos) -> _Lanczos:
            # Lanczos step in the preconditioned inner product.
            v = tree_scale(safe_div(1, c.beta), c.y)
            y = mv(v)
            y = tree_axpy(-safe_div(c.beta, c.oldb), c.r1, y)
            alfa = jnp.real(tree_dot(v, y))
            y = tree_axpy(-safe_div(alfa, c.beta), c.r2, y)
            r1 = c.r2
            r2 = y
            y = apply(precond, r2)
            oldb = c.beta
            beta2 = jnp.real(tree_dot(r2, y))
            # <r, P r> < 0: the preconditioner is not positive definite.
            bad_precond = beta2 < 0
            beta = jnp.sqrt(jnp.maximum(beta2, 0))
            # Apply the previous rotation, then make a new one to annihilate beta.
            oldeps = c.epsln
            delta = c.cs * c.dbar + c.sn * alfa
            gbar = c.sn * c.dbar - c.cs * alfa
            epsln = c.sn * beta
            dbar = -c.cs * beta
            gamma = jnp.hypot(gbar, beta)
            # gamma = 0 means the tridiagonal matrix is singular (an inconsistent
            # singular system): no update can be made.
            singular = ~(gamma > 0)
            cs = safe_div(gbar, gamma)
            sn = safe_div(beta, gamma)
            phi = cs * c.phibar
            phibar = sn * c.phibar
            w1 = c.w2
            w2 = c.w
            w = tree_scale(
                safe_div(1, gamma), tree_axpy(-oldeps, w1, tree_axpy(-delta, w2, v))
            )
            x = tree_axpy(phi, w, c.x)
            # beta ~ 0 relative to the other entries of the tridiagonal column: the
            # Krylov space is invariant, and x is the final iterate.
            exhausted = ~(beta > eps * (jnp.abs(alfa) + oldb))
            return _Lanczos(
                x,
                r1,
                r2,
                y,
                w,
                w2,
                beta,
                oldb,
                dbar,
                epsln,
                phibar,
                cs,
                sn,
                c.steps + 1,
                exhausted,
                bad_precond | singular,
            )

        x, r = initial_residual(mv, vector, y0, structure)
        y = apply(precond, r)
        beta1_2 = jnp.real(tree_dot(r, y))
        beta1 = jnp.sqrt(jnp.maximum(beta1_2, 0))
        zero_vec = tree_scale(0, x)
        zero = jnp.zeros((), rdtype)
        lanczos = _Lanczos(
            x,
            r,
            r,
            y,
            zero_vec,
            zero_vec,
            beta1,
            zero,
            zero,
            zero,
            beta1,
            -jnp.ones((), rdtype),
            zero,
            jnp.array(0, jnp.int32),
            jnp.array(False),
            beta1_2 < 0,
        )
        outer = _Outer(lanczos, self.norm(r), jnp.ones((), rdtype))

        def running(o: _Outer):
            c = o.lanczos
            return (o.rnorm > tol) & ~c.breakdown & ~c.exhausted & (c.steps < max_steps)

        def verify(o: _Outer) -> _Outer:
            c = o.lanczos
            inner_tol = adapted_tolerance(c.phibar, o.rnorm, tol, o.factor)

            def inner_running(c: _Lanczos):
                return (
                    (c.phibar > inner_tol)
                    & ~c.breakdown
                    & ~c.exhausted
                    & (c.steps < max_steps)
                )

            c = lax.while_loop(inner_running, step, c)
            rnorm = self.norm(tree_sub(vector, mv(c.x)))
            inner_passed = c.phibar <= inner_tol
            factor = jnp.where(
                inner_passed & (rnorm > tol), jnp.maximum(eps, 0.5 * o.factor), o.factor
            )
            return _Outer(c, rnorm, factor)

        outer = lax.while_loop(running, verify, outer)
        c = outer.lanczos
        converged = outer.rnorm <= tol
        # An exhausted Krylov space with the tolerance unmet means a singular
        # (inconsistent) system: report breakdown rather than keep iterating.
        result = result_of(converged, breakdown=c.breakdown | c.exhausted)
        return c.x, result, stats_of(c.steps, max_steps)

    def transpose(self, state: KrylovState, options: dict[str, Any]):
        return KrylovState(state.operator.transpose()), transpose_options(options)

    def conj(self, state: KrylovState, options: dict[str, Any]):
        return KrylovState(conj(state.operator)), conj_options(options)

    def assume_full_rank(self) -> bool:
        return True
