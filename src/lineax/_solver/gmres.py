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
    tree_scale,
    tree_sub,
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
    basis: PyTree[Array]  # leaves of shape (m + 1, *leaf_shape); unused rows are 0
    rotations: Array  # (m + 1, m + 1): the product Q of the Givens rotations so far
    r_factor: Array  # (m, m): Q H, upper triangular
    k: Array  # number of basis vectors (columns of H) in use
    estimate: Array  # |last entry of Q beta e_1| = 2-norm of the residual
    steps: Array
    invariant: Array  # the Krylov space is invariant ("lucky" breakdown)
    degenerate: Array  # the new column made the Hessenberg matrix singular


class _Outer(eqx.Module):
    x: PyTree[Array]
    r: PyTree[Array]
    rnorm: Scalar
    steps: Array
    factor: Scalar
    best: Scalar
    since_best: Array
    breakdown: Array


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
        returned.

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
        max_steps = self.resolve_max_steps(operator)
        structure = operator.in_structure()
        m = min(self.restart, operator.in_size())
        eps = eps_of(structure)
        rdtype = real_dtype(structure)
        cdtype = jnp.result_type(*[x.dtype for x in jtu.tree_leaves(structure)])
        tol = self.tolerance(vector)
        mv = operator.mv

        def arnoldi_step(c: _Cycle, beta: Array) -> _Cycle:
            j = c.k
            vj = jtu.tree_map(
                lambda v: lax.dynamic_index_in_dim(v, j, 0, False), c.basis
            )
            w = mv(apply(precond, vj))
            wnorm = norm2(w)
            # CGS2: orthogonalise twice against the whole (zero-padded) basis.
            h = _basis_dot(c.basis, w)
            w = tree_sub(w, _basis_combine(c.basis, h))
            h2 = _basis_dot(c.basis, w)
            w = tree_sub(w, _basis_combine(c.basis, h2))
            h = h + h2
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
            a = rotated[j]
            b = rotated[j + 1]
            # Complex Givens rotation [[cs, sn], [-conj(sn), cs]] with real cs that
            # maps (a, b) to (rho, 0).
            abs_a = jnp.abs(a)
            denom = jnp.sqrt(abs_a**2 + jnp.abs(b) ** 2)
            degenerate = ~(denom > eps * norm2(column))
            safe_denom = jnp.where(denom == 0, 1, denom).astype(cdtype)
            phase = jnp.where(
                abs_a == 0, 1, a / jnp.where(abs_a == 0, 1, abs_a).astype(cdtype)
            )
            cs = abs_a.astype(cdtype) / safe_denom
            sn = phase * jnp.conj(b) / safe_denom
            rho = phase * denom.astype(cdtype)
            row_j = c.rotations[j]
            row_j1 = c.rotations[j + 1]
            rotations = c.rotations.at[j].set(cs * row_j + sn * row_j1)
            rotations = rotations.at[j + 1].set(-jnp.conj(sn) * row_j + cs * row_j1)
            r_column = rotated[:m].at[j].set(rho)
            r_factor = c.r_factor.at[:, j].set(r_column)
            estimate = jnp.abs(rotations[j + 1, 0]) * beta
            # A degenerate column is not used: the cycle ends with the basis so far.
            keep = ~degenerate
            return _Cycle(
                jtu.tree_map(
                    lambda new, old: jnp.where(keep, new, old), basis, c.basis
                ),
                jnp.where(keep, rotations, c.rotations),
                jnp.where(keep, r_factor, c.r_factor),
                jnp.where(keep, j + 1, j),
                jnp.where(keep, estimate, c.estimate),
                c.steps + 1,
                invariant,
                degenerate,
            )

        def cycle(o: _Outer) -> _Outer:
            beta = norm2(o.r)
            inner_tol = adapted_tolerance(beta, o.rnorm, tol, o.factor)
            basis = jtu.tree_map(
                lambda r: (
                    jnp.zeros((m + 1,) + r.shape, r.dtype)
                    .at[0]
                    .set(r * _cast_real(safe_div(1, beta), r))
                ),
                o.r,
            )
            c0 = _Cycle(
                basis,
                jnp.eye(m + 1, dtype=cdtype),
                jnp.zeros((m, m), cdtype),
                jnp.array(0, jnp.int32),
                beta,
                o.steps,
                jnp.array(False),
                jnp.array(False),
            )

            def cond(c: _Cycle):
                return (
                    (c.k < m)
                    & (c.estimate > inner_tol)
                    & ~c.invariant
                    & ~c.degenerate
                    & (c.steps < max_steps)
                )

            def body(c: _Cycle):
                return arnoldi_step(c, beta)

            c = lax.while_loop(cond, body, c0)
            # Solve R y = Q beta e_1 on the k columns in use (the rest padded with an
            # identity, so their coefficients are 0).
            idx = jnp.arange(m, dtype=jnp.int32)
            used = idx < c.k
            r_used = jnp.where(
                used[:, None] & used[None, :], c.r_factor, jnp.eye(m, dtype=cdtype)
            )
            g = jnp.where(used, beta.astype(cdtype) * c.rotations[:m, 0], 0)
            y = jsl.solve_triangular(r_used, g, lower=False)
            basis_m = jtu.tree_map(lambda v: v[:m], c.basis)
            x = jtu.tree_map(
                lambda xi, d: xi + d, o.x, apply(precond, _basis_combine(basis_m, y))
            )
            r = tree_sub(vector, mv(x))
            rnorm = self.norm(r)
            inner_passed = c.estimate <= inner_tol
            factor = jnp.where(
                inner_passed & (rnorm > tol),
                jnp.maximum(eps, 0.5 * o.factor),
                jnp.minimum(1, 1.5 * o.factor),
            ).astype(rdtype)
            improved = rnorm < o.best
            best = jnp.where(improved, rnorm, o.best)
            since_best = jnp.where(improved, 0, o.since_best + 1)
            # No progress at all is possible from here: the first new direction was
            # already degenerate (e.g. A P r = 0).
            breakdown = c.degenerate & (c.k == 0)
            return _Outer(x, r, rnorm, c.steps, factor, best, since_best, breakdown)

        x, r = initial_residual(mv, vector, y0, structure)
        rnorm = self.norm(r)
        outer = _Outer(
            x,
            r,
            rnorm,
            jnp.array(0, jnp.int32),
            jnp.array(1, rdtype),
            rnorm,
            jnp.array(0, jnp.int32),
            jnp.array(False),
        )

        def running(o: _Outer):
            return (
                (o.rnorm > tol)
                & ~o.breakdown
                & (o.since_best < self.stagnation_iters)
                & (o.steps < max_steps)
            )

        outer = lax.while_loop(running, cycle, outer)
        converged = outer.rnorm <= tol
        stagnation = outer.since_best >= self.stagnation_iters
        result = result_of(converged, breakdown=outer.breakdown, stagnation=stagnation)
        return outer.x, result, stats_of(outer.steps, max_steps)

    def transpose(self, state: KrylovState, options: dict[str, Any]):
        return KrylovState(state.operator.transpose()), transpose_options(options)

    def conj(self, state: KrylovState, options: dict[str, Any]):
        return KrylovState(conj(state.operator)), conj_options(options)

    def assume_full_rank(self) -> bool:
        return True


def _cast_real(a: Array, like: Array) -> Array:
    return a.astype(like.dtype)
