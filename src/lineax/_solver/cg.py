"""`CG`: the (preconditioned) conjugate gradient method, and `NormalCG`."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree, Scalar

from .._norm import max_norm, tree_dot, two_norm
from .._operator.base import (
    AbstractLinearOperator,
    conj,
    is_negative_semidefinite,
    is_positive_semidefinite,
)
from ._krylov import (
    AbstractKrylovSolver,
    apply,
    conj_options,
    initial_residual,
    KrylovState,
    result_of,
    safe_div,
    stats_of,
    transpose_options,
    tree_axpy,
    tree_sub,
)
from .base import check_square, check_tag
from .normal import Normal


class _CGCarry(eqx.Module):
    x: PyTree[Array]
    r: PyTree[Array]
    p: PyTree[Array]
    rho: Scalar  # <r, P r>
    rnorm: Scalar  # norm(r), with the solver's norm
    steps: Array
    breakdown: Array


class CG(AbstractKrylovSolver):
    """The conjugate gradient method, for positive or negative (semi)definite
    operators (Hestenes and Stiefel, 1952; the preconditioned form is Algorithm 9.1
    of Saad, *Iterative Methods for Sparse Linear Systems*, 2nd ed., 2003).

    The operator must carry [`lineax.positive_semidefinite_tag`][] or
    [`lineax.negative_semidefinite_tag`][] (for complex operators: Hermitian
    definite); a negative definite operator is solved as `(-A) x = -b`. It must
    in fact be definite: a singular operator gives `breakdown`, `max_steps_reached`
    or `singular`, never a `successful` wrong answer.

    **Arguments:**

    - `rtol`, `atol`: success means `norm(b - A y) <= atol + rtol * norm(b)`,
        checked on a recomputed residual.
    - `norm`: the norm of that test. Defaults to the max norm.
    - `stabilise_every`: every this many steps, the recursively updated residual is
        replaced by the true residual `b - A y` (one extra matrix-vector product),
        which stops rounding errors from accumulating. `None` means only at the end.
    - `max_steps`: the maximum number of steps (one matrix-vector product each, not
        counting the stabilisation ones). `None` means 10 × the problem size.

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

    def __check_init__(self):
        if self.stabilise_every is not None and (
            isinstance(self.stabilise_every, bool)
            or not isinstance(self.stabilise_every, int)
            or self.stabilise_every < 1
        ):
            raise ValueError(
                "`stabilise_every` must be None or a positive int, got "
                f"{self.stabilise_every!r}."
            )

    def init(
        self, operator: AbstractLinearOperator, options: dict[str, Any]
    ) -> KrylovState:
        check_square(operator, "CG")
        positive = is_positive_semidefinite(operator)
        negative = (not positive) and is_negative_semidefinite(operator)
        check_tag(
            positive or negative,
            "CG",
            "positive or negative (semi)definite",
            "`lx.positive_semidefinite_tag` or `lx.negative_semidefinite_tag`",
        )
        self.checked_options(operator, options)
        return KrylovState(operator, negative)

    def compute(
        self, state: KrylovState, vector: PyTree[Array], options: dict[str, Any]
    ):
        operator = state.operator
        precond, y0 = self.checked_options(operator, options)
        max_steps = self.resolve_max_steps(operator)
        if state.negative:
            vector = jtu.tree_map(jnp.negative, vector)

            def mv(v):
                return jtu.tree_map(jnp.negative, operator.mv(v))
        else:
            mv = operator.mv  # pyright: ignore[reportAssignmentType]
        tol = self.tolerance(vector)
        stabilise_every = (
            max_steps + 1 if self.stabilise_every is None else self.stabilise_every
        )

        # Without a preconditioner rho = <r, r>, so a 2-norm of the residual is
        # sqrt(rho): one reduction per step instead of two (JAX's CG does the same).
        rho_is_norm = precond is None and self.norm is two_norm

        def residual_norm(r, rho):
            return jnp.sqrt(rho) if rho_is_norm else self.norm(r)

        def restart(r):
            # (Re)compute everything that depends on the residual.
            z = apply(precond, r)
            rho = jnp.real(tree_dot(r, z))
            return z, rho, residual_norm(r, rho)

        x, r = initial_residual(mv, vector, y0, operator.in_structure())
        p, rho, rnorm = restart(r)
        carry = _CGCarry(x, r, p, rho, rnorm, jnp.array(0, jnp.int32), jnp.array(False))

        def running(c: _CGCarry):
            return (c.rnorm > tol) & ~c.breakdown & (c.steps < max_steps)

        def inner_body(inner):
            k, c = inner
            ap = mv(c.p)
            pap = jnp.real(tree_dot(c.p, ap))
            # For a (semi)definite operator <p, A p> > 0 unless A p = 0: a sign test
            # is scale-invariant, and catches NaN too.
            breakdown = ~(pap > 0)
            alpha = jnp.where(breakdown, 0, safe_div(c.rho, pap))
            x = tree_axpy(alpha, c.p, c.x)
            r = tree_axpy(-alpha, ap, c.r)
            z = apply(precond, r)
            rho = jnp.real(tree_dot(r, z))
            rnorm = residual_norm(r, rho)
            # A preconditioner that is not positive definite shows as <r, P r> <= 0.
            breakdown = breakdown | ((rnorm > tol) & ~(rho > 0))
            beta = safe_div(rho, c.rho)
            p = tree_axpy(beta, c.p, z)
            new = _CGCarry(x, r, p, rho, rnorm, c.steps + 1, breakdown)
            return k + 1, new

        def outer_body(c: _CGCarry):
            _, c = lax.while_loop(
                lambda inner: (inner[0] < stabilise_every) & running(inner[1]),
                inner_body,
                (jnp.array(0, jnp.int32), c),
            )
            # Replace the recursive residual by the true one: this stabilises the
            # iteration, and is the check that success is real.
            r = tree_sub(vector, mv(c.x))
            _, rho, rnorm = restart(r)
            return _CGCarry(c.x, r, c.p, rho, rnorm, c.steps, c.breakdown)

        # When the loop stops, `rnorm` is always the norm of a true residual.
        carry = lax.while_loop(running, outer_body, carry)
        converged = carry.rnorm <= tol
        result = result_of(converged, breakdown=carry.breakdown)
        return carry.x, result, stats_of(carry.steps, max_steps)

    def transpose(self, state: KrylovState, options: dict[str, Any]):
        # A definite operator is Hermitian, so its transpose is its conjugate: also
        # definite, and negated or not as before.
        return KrylovState(
            state.operator.transpose(), state.negative
        ), transpose_options(options)

    def conj(self, state: KrylovState, options: dict[str, Any]):
        return KrylovState(conj(state.operator), state.negative), conj_options(options)

    def assume_full_rank(self) -> bool:
        return True


def NormalCG(
    rtol: float,
    atol: float,
    norm: Callable[[PyTree[Array]], Scalar] = max_norm,
    stabilise_every: int | None = 10,
    max_steps: int | None = None,
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
    return Normal(CG(rtol, atol, norm, stabilise_every, max_steps))
