"""`FGMRES`: flexible GMRES, for preconditioners that vary from step to step."""

from collections.abc import Callable

import equinox as eqx
from jaxtyping import Array, PyTree, Scalar

from .._norm import max_norm
from ._arnoldi import AbstractArnoldiSolver
from .base import static_number


class FGMRES(AbstractArnoldiSolver):
    """Flexible GMRES: restarted GMRES with a right preconditioner that may change
    from one step to the next (Saad, "A flexible inner-outer preconditioned GMRES
    algorithm", *SIAM J. Sci. Comput.* 14, 1993; Algorithm 9.6 of Saad, *Iterative
    Methods for Sparse Linear Systems*, 2nd ed., 2003).

    [`lineax.GMRES`][] builds its update as `P V y`, which is only a minimiser of
    the residual when every application of the preconditioner `P` is the same
    linear map. FGMRES instead stores the preconditioned vectors `z_j = P(v_j)`
    themselves (one more vector per step), so the Arnoldi relation
    `A Z = V H` holds whatever `P` did at each step, and the residual it minimises
    is the true one. Use it when the preconditioner is itself an iterative solve
    (e.g. `lx.invert(A_approx, lx.GMRES(rtol=1e-2, atol=0.0))`), a multigrid cycle
    with a stopping test, or anything nonlinear or inexact. With a fixed linear
    preconditioner it makes the same iterates as GMRES, at the cost of the extra
    storage.

    Each cycle orthogonalises with classical Gram–Schmidt applied twice, minimises
    with Givens rotations, and ends with a recomputed residual `b - A y`, which
    alone decides success (see [Iterative solvers](../iterative.md)).

    **Arguments:** as for [`lineax.GMRES`][].

    - `rtol`, `atol`: success means `norm(b - A y) <= atol + rtol * norm(b)`,
        checked on a recomputed residual.
    - `norm`: the norm of that test. Defaults to the max norm.
    - `max_steps`: the maximum number of inner iterations (one operator and one
        preconditioner application each). `None` means 10 × the problem size
        restart cycles, as for [`lineax.GMRES`][].
    - `restart`: the size of the Krylov basis before restarting.
    - `stagnation_iters`: restarts without a decrease of the true residual after
        which [`lineax.RESULTS.stagnation`][] is returned (sooner below the floor
        the dtype allows, as for [`lineax.GMRES`][]).
    - `history_length`, `verbose`: as for [`lineax.CG`][].

    **Options:**

    - `preconditioner`: an operator approximating the inverse of the operator,
        applied on the right; its `mv` may be inexact or nonlinear. In reverse
        mode the transposed solve uses its transpose. For an inner solve
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
    max_steps: int | None = static_number(int | None, default=None)
    restart: int = static_number(int, default=20)
    stagnation_iters: int = static_number(int, default=20)
    history_length: int | None = static_number(int | None, default=None)
    verbose: bool | int = eqx.field(static=True, default=False)

    flexible = True
