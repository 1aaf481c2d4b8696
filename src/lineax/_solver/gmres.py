"""`GMRES`: restarted GMRES with right preconditioning."""

from collections.abc import Callable

import equinox as eqx
from jaxtyping import Array, PyTree, Scalar

from .._norm import max_norm
from ._arnoldi import AbstractArnoldiSolver
from .base import static_number


class GMRES(AbstractArnoldiSolver):
    """The restarted generalised minimal residual method, for square operators
    (Saad and Schultz, 1986; Algorithm 6.9 and section 9.3.2 of Saad, *Iterative
    Methods for Sparse Linear Systems*, 2nd ed., 2003).

    Each cycle builds an orthonormal Krylov basis of up to `restart` vectors with
    classical Gram–Schmidt applied twice (CGS2: as accurate as modified Gram–Schmidt
    in practice, and two matrix products instead of a sequential loop), and
    minimises the residual with Givens rotations. Preconditioning is on the right
    (`A P u = b`, `y = P u`), so the residual the method minimises is the true
    residual. At the end of each cycle the residual `b - A y` is recomputed; only it
    decides success. A cycle ends early once the rotated residual estimate passes the
    tolerance (translated into the solver's `norm` from the last true residual).

    **Arguments:**

    - `rtol`, `atol`: success means `norm(b - A y) <= atol + rtol * norm(b)`,
        checked on a recomputed residual.
    - `norm`: the norm of that test. Defaults to the max norm.
    - `max_steps`: the maximum number of *inner* iterations (matrix-vector
        products with the operator, summed over all cycles; recomputing the residual
        at a restart is not counted). `None` means 10 × the problem size
        restart cycles, `10 n min(restart, n)` steps: the budget of lineax 0.1.1
        and of SciPy's `gmres`, whose limits count cycles.
        `stats["num_steps"]` counts the same.
    - `restart`: the size of the Krylov basis before restarting.
    - `stagnation_iters`: the number of consecutive restarts without any decrease
        of the true residual after which [`lineax.RESULTS.stagnation`][] is
        returned (with the iterate of the smallest true residual). Below the
        floor the dtype allows, the solve stops sooner: after three cycles whose
        residual estimate ended 4-fold below the true residual without the true
        residual halving (see [Iterative solvers](../iterative.md)).
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
    restart: int = static_number(int, default=20)
    stagnation_iters: int = static_number(int, default=20)
    history_length: int | None = static_number(int | None, default=None)
    verbose: bool | int = eqx.field(static=True, default=False)
