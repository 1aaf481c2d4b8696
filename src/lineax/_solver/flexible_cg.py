"""`FlexibleCG`: the flexible conjugate gradient method, for preconditioners that
vary from step to step."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree, Scalar

from .._misc import select
from .._norm import max_norm, tree_dot
from ._arnoldi import basis_combine, basis_dot, basis_set
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
    tree_sub,
    tree_where,
)
from .base import static_number


class _FlexibleCGCarry(eqx.Module):
    """The FCG recurrences, named as in Notay (2000), Algorithm 2.1."""

    x: PyTree[Array]
    r: PyTree[Array]  # recursively updated residual
    p: PyTree[Array]  # the next search direction
    rnorm: Scalar  # norm(r), with the solver's norm
    # The last `truncation` directions, their images and <p_i, A p_i> (a ring
    # buffer; an unused slot has `pap = 0`, which gives it a zero coefficient).
    directions: PyTree[Array]  # leaves of shape (truncation, *leaf_shape)
    images: PyTree[Array]  # A p_i, the same shape
    pap: Array  # (truncation,)
    count: Array  # steps since the buffer was last cleared
    breakdown: Array


class FlexibleCG(AbstractDefiniteKrylovSolver):
    """The flexible conjugate gradient method, for positive or negative (semi)definite
    operators with a preconditioner that may change from step to step (Notay,
    "Flexible conjugate gradients", *SIAM J. Sci. Comput.* 22, 2000; Golub and Ye,
    "Inexact preconditioned conjugate gradient method with inner-outer iteration",
    *SIAM J. Sci. Comput.* 21, 1999).

    [`lineax.CG`][] relies on the preconditioner being one fixed symmetric
    positive definite linear map: its short recurrence (Fletcher–Reeves
    `beta = <r_new, z_new> / <r_old, z_old>`) loses conjugacy, and convergence,
    as soon as the preconditioner is an inexact inner solve or a multigrid cycle
    with a stopping test. FlexibleCG instead makes each new direction explicitly
    `A`-conjugate to the last `truncation` ones,
    `p = z - sum_i (<A p_i, z> / <p_i, A p_i>) p_i`, and takes the exact line
    search `alpha = <p, r> / <p, A p>`. With `truncation=1` this is the
    Polak–Ribière variant of Golub and Ye (in exact arithmetic
    `beta = <r_new, z_new - z_old> / <r_old, z_old>`), one vector longer than
    CG; with a fixed linear preconditioner it makes the same iterates as CG.
    A larger `truncation` helps when the preconditioner varies strongly.

    As for CG, every `stabilise_every` steps the residual is replaced by the true
    residual `b - A y`; where the two differ by more than 10% the stored
    directions are discarded (a restart). Success is only reported on a true
    residual (see [Iterative solvers](../iterative.md)).

    **Arguments:** as for [`lineax.CG`][], and

    - `truncation`: the number of previous directions each new direction is made
        conjugate to (Notay's `m_max`; at least 1).

    **Options:**

    - `preconditioner`: an operator approximating the inverse of the operator
        (of `-A` for a negative definite `A`); its `mv` may be inexact or
        nonlinear, as long as it stays close to a positive definite map. In
        reverse mode the transposed solve uses its transpose. For an inner solve
        (`lx.invert(A_approx, inner)`) that transpose is another solve, and a
        failed derivative solve is NaN (see [Failures](../failures.md)), even
        with `throw=False`: under `jax.grad`, give the inner solver
        `rtol=atol=0.0` and a `max_steps` (a fixed number of steps, which
        always succeeds) rather than a loose tolerance with a small `max_steps`.
    - `y0`: an initial guess for the solution.
    """

    rtol: float = static_number(float)
    atol: float = static_number(float)
    norm: Callable[[PyTree[Array]], Scalar] = eqx.field(static=True, default=max_norm)
    stabilise_every: int | None = static_number(int | None, default=10)
    max_steps: int | None = static_number(int | None, default=None)
    history_length: int | None = static_number(int | None, default=None)
    verbose: bool | int = eqx.field(static=True, default=False)
    truncation: int = static_number(int, default=1)

    definite_preconditioner = False

    def __check_init__(self):
        if (
            isinstance(self.truncation, bool)
            or not isinstance(self.truncation, int)
            or self.truncation < 1
        ):
            raise ValueError(
                f"`truncation` must be a positive int, got {self.truncation!r}."
            )

    def compute(
        self, state: KrylovState, vector: PyTree[Array], options: dict[str, Any]
    ):
        precond, problem, mv = self.definite_problem(state, vector, options)
        size = self.truncation

        def conjugate(c: _FlexibleCGCarry, z, pap):
            # p = z - sum_i (<A p_i, z> / <p_i, A p_i>) p_i, against the stored ones.
            dots = basis_dot(c.images, z)
            coefficients = safe_div(dots, pap.astype(dots.dtype))
            return tree_sub(z, basis_combine(c.directions, coefficients))

        def step(c: _FlexibleCGCarry) -> _FlexibleCGCarry:
            ap = mv(c.p)
            pap = jnp.real(tree_dot(c.p, ap))
            # For a (semi)definite operator <p, A p> > 0 unless A p = 0 (a sign
            # test is scale-invariant, and catches NaN); p = 0 with r = 0 is not a
            # breakdown (a fixed-iteration solve that converged exactly).
            breakdown = ~(pap > 0) & ~(c.rnorm == 0)
            ok = pap > 0
            # The exact line search along p. Not CG's <r, z> / <p, A p>: with a
            # varying preconditioner, r is no longer orthogonal to the older
            # directions, so <p, r> != <z, r>.
            pr = tree_dot(c.p, c.r)
            alpha = select(ok, safe_div(pr, pap.astype(pr.dtype)), 0)
            x = tree_axpy(alpha, c.p, c.x)
            r = tree_axpy(-alpha, ap, c.r)
            slot = c.count % size
            directions = basis_set(c.directions, slot, c.p)
            images = basis_set(c.images, slot, ap)
            paps = c.pap.at[slot].set(pap.astype(c.pap.dtype))
            directions = tree_where(ok, directions, c.directions)
            images = tree_where(ok, images, c.images)
            paps = select(ok, paps, c.pap)
            count = select(ok, c.count + 1, c.count)
            z = apply(precond, r)
            new = _FlexibleCGCarry(
                x,
                r,
                c.p,
                self.checked_norm(r),
                directions,
                images,
                paps,
                count,
                breakdown,
            )
            p = conjugate(new, z, paps)
            return eqx.tree_at(lambda c: c.p, new, p)

        def replace_residual(c: _FlexibleCGCarry, x, r, passed) -> _FlexibleCGCarry:
            # Residual replacement, as in CG: the directions are kept unless the
            # true residual differs from the recursive one by more than 10%
            # (rounding dominates); then the iteration restarts from p = P r, which
            # costs one more application of the preconditioner.
            del x, passed
            drifted = norm2(tree_sub(r, c.r)) > 0.1 * norm2(r)

            # A `cond`, not a `where`: the preconditioner may be an expensive
            # inner solve (under `vmap` JAX turns it into a `select` anyway).
            p = lax.cond(drifted, lambda: apply(precond, r), lambda: c.p)
            pap = select(drifted, 0, c.pap).astype(c.pap.dtype)
            count = select(drifted, 0, c.count)
            return _FlexibleCGCarry(
                c.x,
                r,
                p,
                self.checked_norm(r),
                c.directions,
                c.images,
                pap,
                count,
                c.breakdown,
            )

        structure = state.operator.in_structure()
        buffer = jtu.tree_map(
            lambda s: jnp.zeros((size,) + s.shape, s.dtype), structure
        )
        rnorm = self.checked_norm(problem.r0)
        carry = _FlexibleCGCarry(
            problem.x0,
            problem.r0,
            apply(precond, problem.r0),
            rnorm,
            buffer,
            buffer,
            jnp.zeros((size,), problem.rdtype),
            jnp.array(0, jnp.int32),
            jnp.array(False),
        )
        method = Iteration(
            step=step,
            estimate=lambda c: c.rnorm,
            solution=lambda c: c.x,
            restart=replace_residual,
            halted=lambda c: c.breakdown,
            pass_length=self.stabilise_every,
            # As for CG: the recursive residual restarts from the true one at each
            # replacement, and a pass that ends far below it ran on rounding
            # errors (the dtype's floor). Without this test a float32 solve past
            # its floor ran the whole `max_steps` and reported
            # `max_steps_reached` (1-D Poisson, n = 50: 500 steps, CG 80).
            below_floor=lambda c, rnorm: rnorm > FLOOR_GAP * c.rnorm,
            # As for CG: each verification replaces the residual, so the next
            # pass's estimate starts from the true residual.
            free_misses=2,
        )
        return iterate(self, problem, method, carry, rnorm=rnorm)
