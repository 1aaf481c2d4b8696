"""`GMRES`: restarted GMRES with right preconditioning."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.lax as lax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import jax.tree_util as jtu
from jaxtyping import Array, PyTree, Scalar

from .._norm import max_norm
from .._operator.base import AbstractLinearOperator
from ._krylov import (
    AbstractKrylovSolver,
    apply,
    iterate,
    Iteration,
    KrylovState,
    norm2,
    safe_div,
    tree_scale,
    tree_sub,
    tree_where,
)
from .base import check_square


_HIGHEST = lax.Precision.HIGHEST


def _basis_dot(basis: PyTree[Array], w: PyTree[Array]) -> Array:
    """`V^H w` for a basis stored as leaves with a leading axis of length `m + 1`."""
    terms = [
        jnp.tensordot(jnp.conj(v), x, axes=x.ndim, precision=_HIGHEST)
        for v, x in zip(jtu.tree_leaves(basis), jtu.tree_leaves(w))
    ]
    return sum(terms[1:], terms[0])


def _basis_combine(basis: PyTree[Array], h: Array) -> PyTree[Array]:
    """`V h`."""
    return jtu.tree_map(
        lambda v: jnp.tensordot(h.astype(v.dtype), v, axes=1, precision=_HIGHEST), basis
    )


class _Cycle(eqx.Module):
    x: PyTree[Array]  # the iterate the cycle started from
    beta: Scalar  # 2-norm of its residual
    basis: PyTree[Array]  # leaves of shape (m + 1, *leaf_shape); unused rows are 0
    rotations: Array  # (m + 1, m + 1): the product Q of the Givens rotations so far
    r_factor: Array  # (m, m): Q H, upper triangular
    k: Array  # number of basis vectors (columns of H) in use
    estimate: Array  # |last entry of Q beta e_1| = 2-norm of the residual
    invariant: Array  # the Krylov space is invariant ("lucky" breakdown)
    degenerate: Array  # the new column made the Hessenberg matrix singular
    breakdown: Array  # a cycle could not make its first step: no progress possible


class GMRES(AbstractKrylovSolver):
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
        at a restart is not counted). `None` means 10 × the problem size.
        `stats["num_steps"]` counts the same.
    - `restart`: the size of the Krylov basis before restarting.
    - `stagnation_iters`: the number of consecutive restarts without any decrease
        of the true residual after which [`lineax.RESULTS.stagnation`][] is
        returned (with the iterate of the smallest true residual).
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
    restart: int = eqx.field(static=True, default=20)
    stagnation_iters: int = eqx.field(static=True, default=20)
    history_length: int | None = eqx.field(static=True, default=None)
    verbose: bool | int = eqx.field(static=True, default=False)

    def __check_init__(self):
        for name in ("restart", "stagnation_iters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}.")

    def init(
        self, operator: AbstractLinearOperator, options: dict[str, Any]
    ) -> KrylovState:
        check_square(operator, "GMRES")
        self.checked_options(operator, options)
        return KrylovState(operator)

    def compute(
        self, state: KrylovState, vector: PyTree[Array], options: dict[str, Any]
    ):
        operator = state.operator
        precond, y0 = self.checked_options(operator, options)
        problem = self.problem(operator, vector, y0)
        structure = operator.in_structure()
        m = min(self.restart, operator.in_size())
        eps = problem.eps
        cdtype = jnp.result_type(*[x.dtype for x in jtu.tree_leaves(structure)])
        mv = problem.mv

        def orthogonalise(c: _Cycle, w):
            # CGS2: orthogonalise twice against the whole (zero-padded) basis.
            h = _basis_dot(c.basis, w)
            w = tree_sub(w, _basis_combine(c.basis, h))
            h2 = _basis_dot(c.basis, w)
            w = tree_sub(w, _basis_combine(c.basis, h2))
            return w, h + h2

        def givens(a, b):
            # Complex Givens rotation [[cs, sn], [-conj(sn), cs]] with real cs that
            # maps (a, b) to (rho, 0).
            abs_a = jnp.abs(a)
            denom = jnp.sqrt(abs_a**2 + jnp.abs(b) ** 2)
            safe_denom = jnp.where(denom == 0, 1, denom).astype(cdtype)
            phase = jnp.where(
                abs_a == 0, 1, a / jnp.where(abs_a == 0, 1, abs_a).astype(cdtype)
            )
            cs = abs_a.astype(cdtype) / safe_denom
            sn = phase * jnp.conj(b) / safe_denom
            return cs, sn, phase * denom.astype(cdtype), denom

        def arnoldi_step(c: _Cycle) -> _Cycle:
            j = c.k
            vj = jtu.tree_map(
                lambda v: lax.dynamic_index_in_dim(v, j, 0, False), c.basis
            )
            w = mv(apply(precond, vj))
            wnorm = norm2(w)
            w, h = orthogonalise(c, w)
            hnext = norm2(w)
            # The new direction is numerically in the span of the basis: the space
            # is invariant and this cycle's least-squares solution is final.
            invariant = hnext <= eps * wnorm
            v_new = tree_scale(jnp.where(invariant, 0, safe_div(1, hnext)), w)
            basis = jtu.tree_map(
                lambda v, x: lax.dynamic_update_index_in_dim(v, x, j + 1, 0),
                c.basis,
                v_new,
            )
            column = h.at[j + 1].set(hnext.astype(h.dtype))
            rotated = c.rotations @ column
            cs, sn, rho, denom = givens(rotated[j], rotated[j + 1])
            degenerate = ~(denom > eps * norm2(column))
            row_j = c.rotations[j]
            row_j1 = c.rotations[j + 1]
            rotations = c.rotations.at[j].set(cs * row_j + sn * row_j1)
            rotations = rotations.at[j + 1].set(-jnp.conj(sn) * row_j + cs * row_j1)
            r_factor = c.r_factor.at[:, j].set(rotated[:m].at[j].set(rho))
            estimate = jnp.abs(rotations[j + 1, 0]) * c.beta
            # A degenerate column is not used: the cycle ends with the basis so far.
            keep = ~degenerate
            return _Cycle(
                c.x,
                c.beta,
                tree_where(keep, basis, c.basis),
                jnp.where(keep, rotations, c.rotations),
                jnp.where(keep, r_factor, c.r_factor),
                jnp.where(keep, j + 1, j),
                jnp.where(keep, estimate, c.estimate),
                invariant,
                degenerate,
                c.breakdown,
            )

        def solution(c: _Cycle):
            # Solve R y = Q beta e_1 on the k columns in use (the rest padded with an
            # identity, so their coefficients are 0).
            idx = jnp.arange(m, dtype=jnp.int32)
            used = idx < c.k
            r_used = jnp.where(
                used[:, None] & used[None, :], c.r_factor, jnp.eye(m, dtype=cdtype)
            )
            g = jnp.where(used, c.beta.astype(cdtype) * c.rotations[:m, 0], 0)
            y = jsl.solve_triangular(r_used, g, lower=False)
            basis_m = jtu.tree_map(lambda v: v[:m], c.basis)
            return jtu.tree_map(
                lambda xi, d: xi + d, c.x, apply(precond, _basis_combine(basis_m, y))
            )

        def new_cycle(x, r, breakdown) -> _Cycle:
            beta = norm2(r)
            basis = jtu.tree_map(
                lambda r: (
                    jnp.zeros((m + 1,) + r.shape, r.dtype)
                    .at[0]
                    .set(r * _cast_real(safe_div(1, beta), r))
                ),
                r,
            )
            false = jnp.array(False)
            return _Cycle(
                x,
                beta,
                basis,
                jnp.eye(m + 1, dtype=cdtype),
                jnp.zeros((m, m), cdtype),
                jnp.array(0, jnp.int32),
                beta,
                false,
                false,
                breakdown,
            )

        def restart(c: _Cycle, x, r, passed) -> _Cycle:
            del passed
            # No progress at all is possible from here: the first new direction was
            # already degenerate (e.g. A P r = 0).
            return new_cycle(x, r, c.degenerate & (c.k == 0))

        method = Iteration(
            step=arnoldi_step,
            estimate=lambda c: c.estimate,
            solution=solution,
            restart=restart,
            halted=lambda c: c.breakdown,
            ends_pass=lambda c: c.invariant | c.degenerate,
            pass_length=m,
            patience=self.stagnation_iters,
        )
        cycle = new_cycle(problem.x0, problem.r0, jnp.array(False))
        return iterate(self, problem, method, cycle)


def _cast_real(a: Array, like: Array) -> Array:
    return a.astype(like.dtype)
