"""`MINRES`: the minimal residual method for symmetric (Hermitian) operators."""

import functools as ft
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, PyTree, Scalar

from .._misc import hypot, select, tree_is_complex
from .._norm import max_norm, tree_dot, two_norm
from .._operator.base import (
    AbstractLinearOperator,
    is_negative_semidefinite,
    is_positive_semidefinite,
    is_symmetric,
)
from .._solution import RESULTS, results_where
from ._krylov import (
    _power_of_two_scale,
    AbstractKrylovSolver,
    apply,
    check_definite_preconditioner,
    CHECK_EVERY,
    check_square_krylov,
    iterate,
    Iteration,
    KrylovState,
    norm2,
    rescue_allowed,
    safe_div,
    tree_axpy,
    tree_scale,
    tree_where,
)
from .base import check_tag, static_number


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
    # For the Paige-Saunders stopping tests.
    tnorm2: Scalar  # ||T_k||_F^2: ||A|| (in the preconditioned norm) is about sqrt
    gmax: Scalar  # the largest and smallest `gamma`: cond(A) is about gmax / gmin
    gmin: Scalar
    test2: Scalar  # ||A r|| / (||A|| ||r||)
    exhausted: Array  # the Krylov space is invariant: no further progress
    breakdown: Array
    # With `y0`: the 2-norm of the residual the recurrence started from (see
    # `Iteration.rescue`); `None` without.
    start: Scalar | None = None
    # With `y0`: the units of the recurrence (a power of two: its vectors but `x`,
    # and `phibar`, are those of the problem divided by it); `None` without.
    unit: Scalar | None = None


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
    (if it fails, the iteration carries on with a tighter estimate threshold, at
    least one step per pass). As in Paige and Saunders' reference code, the
    iteration also stops when the estimate of `||A r|| / (||A|| ||r||)` falls
    below `min(rtol, sqrt(eps))` (the normal equations are solved: for a singular,
    inconsistent system, the iterate is then near a least-squares solution; on a
    nonsingular one this ratio can be as small as `1 / cond(A)` far from the
    solution, so a loose `rtol` alone would stop there) or the estimate of
    `cond(A)` exceeds `0.1 / eps`, or a pivot of the Lanczos tridiagonal matrix
    vanishes to working precision (that step, which would add a huge multiple of a
    null vector, is not taken); unless the true residual passes, these are
    reported as [`lineax.RESULTS.singular`][], never `successful`. The iterate with
    the smallest true residual is returned if the solve does not succeed. The true
    residual is also checked every 50 steps; when `phibar` has fallen 16-fold
    since the true residual last halved (rounding has taken over: the tolerance
    is below what the dtype can reach), the solve stops with
    [`lineax.RESULTS.stagnation`][].

    **Arguments:**

    - `rtol`, `atol`: success means `norm(b - A y) <= atol + rtol * norm(b)`,
        checked on a recomputed residual.
    - `norm`: the norm of that test. Defaults to the max norm.
    - `max_steps`: the maximum number of steps (one matrix-vector product each; the
        residual recomputations are not counted). `None` means 10 × the problem
        size.
    - `history_length`, `verbose`: as for [`lineax.CG`][].

    **Options:**

    - `preconditioner`: a positive definite operator approximating the inverse of
        the operator (MINRES needs it definite even when the operator is not).
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
        check_square_krylov(operator, "MINRES")
        hermitian = is_positive_semidefinite(operator) or is_negative_semidefinite(
            operator
        )
        if tree_is_complex(operator.in_structure(), operator.out_structure()):
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
        check_definite_preconditioner(options, "MINRES")
        return KrylovState(operator)

    def compute(
        self, state: KrylovState, vector: PyTree[Array], options: dict[str, Any]
    ):
        precond, problem = self.scaled_problem(state, vector, options, lift=False)
        warm, rdtype = problem.warm, problem.rdtype
        started = ft.partial(_started, precond=precond, warm=warm, rdtype=rdtype)
        lanczos = started(problem.x0, problem.r0)
        rescue: Callable | None = None
        if warm:
            rescue = ft.partial(
                _rescue, started=started, bnorm=two_norm(problem.vector)
            )
        method = Iteration(
            step=ft.partial(_step, mv=problem.mv, precond=precond, eps=problem.eps),
            estimate=_estimate,
            solution=_solution,
            restart=_keep,
            halted=ft.partial(_halted, eps=problem.eps, rtol=self.rtol),
            halt_result=_halt_result,
            pass_length=CHECK_EVERY,
            progress=ft.partial(_progress, precond=precond, warm=warm, rdtype=rdtype),
            progress_estimate=_estimate,
            rescue=rescue,
        )
        return iterate(self, problem, method, lanczos)


# A pivot `gamma` at most this many times eps ||T_k|| is zero (see `_step`).
_SINGULAR = 10


# The steps of `MINRES.compute`, as `Iteration` takes them. `mv` and `precond` are
# the scaled problem's (see `AbstractKrylovSolver.scaled_problem`), `eps` its
# dtype's.


def _lanczos_step(c: _Lanczos, mv: Callable, precond: Any):
    # Lanczos step in the preconditioned inner product.
    v = tree_scale(safe_div(1, c.beta), c.y)
    y = mv(v)
    y = tree_axpy(-safe_div(c.beta, c.oldb), c.r1, y)
    alfa = jnp.real(tree_dot(v, y))
    y = tree_axpy(-safe_div(alfa, c.beta), c.r2, y)
    r2 = y
    y = apply(precond, r2)
    beta2 = jnp.real(tree_dot(r2, y))
    return v, r2, y, alfa, beta2


def _step(c: _Lanczos, mv: Callable, precond: Any, eps: float) -> _Lanczos:
    v, r2, y, alfa, beta2 = _lanczos_step(c, mv, precond)
    oldb = c.beta
    # <r, P r> < 0: the preconditioner is not positive definite.
    bad_precond = beta2 < 0
    beta = jnp.sqrt(jnp.maximum(beta2, 0))
    # The entry above `alfa` in the Lanczos tridiagonal matrix T: the previous
    # beta, but none at the first step (`c.oldb` is zero only then), where
    # `c.beta` is `sqrt(<b, P b>)`, the size of the right-hand side in the
    # preconditioner's norm. Paige and Saunders' code (and SciPy's) counts it in
    # `||T||` all the same; in other units than `T`'s (a Jacobi preconditioner of
    # a matrix whose diagonal spans 1e8), it made `||T||` 1e11 times too large, so
    # the test of `||A r|| / (||A|| ||r||)` passed at the first step, which
    # stopped the solve there, returning 0 as `singular`.
    above = select(c.oldb == 0, 0, oldb)
    tnorm2 = c.tnorm2 + alfa**2 + above**2 + beta**2
    # Apply the previous rotation, then make a new one to annihilate beta.
    oldeps = c.epsln
    delta = c.cs * c.dbar + c.sn * alfa
    gbar = c.sn * c.dbar - c.cs * alfa
    epsln = c.sn * beta
    dbar = -c.cs * beta
    root = hypot(gbar, dbar)
    gamma = hypot(gbar, beta)
    # gamma ~ 0 relative to the tridiagonal matrix's norm: it is singular to
    # working precision (an inconsistent singular system, its Krylov space
    # exhausted). The update would divide rounding errors by gamma, and put a huge
    # multiple of a null vector into x (|x| ~ 1e13 from a unit b in float64): no
    # update is made; the iterate is a least-squares solution over the Krylov
    # space so far.
    singular = ~(gamma > _SINGULAR * eps * jnp.sqrt(tnorm2))
    cs = safe_div(gbar, gamma)
    sn = safe_div(beta, gamma)
    phi = cs * c.phibar
    phibar = sn * c.phibar
    w = tree_scale(
        safe_div(1, gamma),
        tree_axpy(-oldeps, c.w2, tree_axpy(-delta, c.w, v)),
    )
    # (`x` is in the units of the problem, `w` and `phi` in the recurrence's.)
    step_size = phi if c.unit is None else phi * c.unit
    x = tree_where(singular, c.x, tree_axpy(step_size, w, c.x))
    # beta ~ 0 relative to the other entries of the tridiagonal column: the Krylov
    # space is invariant, and x is the final iterate. (So is it after a singular
    # pivot: reported as `singular`.)
    exhausted = ~(beta > eps * (jnp.abs(alfa) + above)) | singular
    return _Lanczos(
        x, c.r2, r2, y, w, c.w, beta, oldb, dbar, epsln, phibar, cs, sn,
        tnorm2, jnp.maximum(c.gmax, gamma), jnp.minimum(c.gmin, gamma),
        safe_div(root, jnp.sqrt(tnorm2)), exhausted, bad_precond,
        c.start, c.unit,
    )  # fmt: skip


def _halted(c: _Lanczos, eps: float, rtol: float):
    # (`gmax * 10 eps > gmin`, not `gmax > gmin / (10 eps)`: `gmin` starts at the
    # largest float, which that product overflowed to infinity before the first
    # step, and `jax_debug_infs` under `jax.disable_jit` reported it on every
    # successful solve.)
    ill_conditioned = c.gmax * (10 * eps) > c.gmin
    # (At most sqrt(eps): `rtol` alone stopped loose solves of nonsingular systems
    # as `singular`, where ||A r|| / (||A|| ||r||) >= 1 / cond(A) came below it
    # with a residual far above the target.)
    normal_solved = c.test2 <= min(rtol, math.sqrt(eps))
    return c.breakdown | c.exhausted | ill_conditioned | normal_solved


def _halt_result(c: _Lanczos):
    return results_where(
        c.breakdown & ~c.exhausted, RESULTS.breakdown, RESULTS.singular
    )


def _started(x, r, precond: Any, warm: bool, rdtype: Any) -> _Lanczos:
    """The recurrence started from the iterate `x` and its residual `r`."""
    start = unit = None
    if warm:
        # In the units of `r` (exactly: a power of two): a fresh start (`rescue`)
        # is from a residual far below those of the problem (1e-20 of them in
        # float32 for a `y0` 1e20 times the solution), whose squares underflowed
        # to zero.
        start = two_norm(r)
        unit, down = _power_of_two_scale(r, rdtype)
        r = tree_scale(down, r)
    y = apply(precond, r)
    beta1_2 = jnp.real(tree_dot(r, y))
    beta1 = jnp.sqrt(jnp.maximum(beta1_2, 0))
    zero_vec = tree_scale(0, x)
    zero = jnp.zeros((), rdtype)
    return _Lanczos(
        x, r, r, y, zero_vec, zero_vec, beta1, zero, zero, zero, beta1,
        -jnp.ones((), rdtype), zero, zero, zero,
        jnp.asarray(jnp.finfo(rdtype).max, rdtype),
        jnp.asarray(jnp.inf, rdtype), jnp.array(False), beta1_2 < 0,
        start, unit,
    )  # fmt: skip


def _rescue(c: _Lanczos, x, r, started: Callable, bnorm: Array):
    # (See `Iteration.rescue`.)
    assert c.start is not None
    fresh = started(x, r)
    assert fresh.start is not None
    return fresh, rescue_allowed(c.start, fresh.start, bnorm)


def _estimate(c: _Lanczos):
    return c.phibar if c.unit is None else c.phibar * c.unit


def _solution(c: _Lanczos):
    return c.x


def _keep(c: _Lanczos, x, r, passed):
    return c


def _progress(c: _Lanczos, x, r, rnorm, precond: Any, warm: bool, rdtype: Any):
    # The true residual in the norm `phibar` estimates: sqrt(<r, P r>).
    unit = None
    if warm:
        # (In the units of `r`: with `y0` it falls far below those of the problem,
        # where its squares underflowed to 0, and the solve, seeing no progress,
        # stopped with `stagnation`.)
        unit, down = _power_of_two_scale(r, rdtype)
        r = tree_scale(down, r)
    if precond is None:
        out = norm2(r)
    else:
        out = jnp.sqrt(jnp.maximum(jnp.real(tree_dot(r, apply(precond, r))), 0))
    return out if unit is None else out * unit
