"""`LSMR`: least squares and minimum norm solutions of any-shaped systems."""

import dataclasses
import functools as ft
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PyTree, Scalar

from .._misc import check_static_float, hypot, select, tree_is_complex
from .._norm import two_norm
from .._operator.arithmetic import ComposedLinearOperator
from .._operator.base import AbstractLinearOperator
from .._operator.function import FunctionLinearOperator
from .._solution import RESULTS, results_where
from ._krylov import (
    AbstractKrylovSolver,
    CHECK_EVERY,
    checked_mv,
    iterate,
    Iteration,
    KrylovState,
    norm2,
    operator_scale,
    Problem,
    real_dtype,
    rescue_allowed,
    safe_div,
    tree_axpy,
    tree_scale,
    tree_zeros,
)
from .base import Reformulated, static_number


# The relative normal-equations residual `||A^H r|| / (||A|| ||r||)` that finite
# precision can reach is of the order of `eps cond(A)` (cf. Bjorck, Elfving and
# Strakos, 1998, "Stability of conjugate gradient and Lanczos methods for linear
# least squares problems", SIAM J. Matrix Anal. Appl. 19(3), on the attainable
# accuracy of CGLS and LSQR). LSMR's estimate of `cond(A)` is from below, and its
# iterates reached 0.4-1.3 times `eps` times that estimate on badly scaled float32
# fits (cond 3e4), hence the factor. Where the requested `rtol` is below that level
# and the iteration can go no further (see `LSMR`), the level counts as solved, up
# to `_FLOOR_CAP` (a backward error of 1% of `||A||`): beyond it the dtype cannot
# solve the problem, and the solve fails.
_FLOOR_FACTOR = 10.0
_FLOOR_CAP = 1e-2


def _sym_ortho(a: Array, b: Array) -> tuple[Array, Array, Array]:
    """A stable real Givens rotation: `(c, s, r)` with `[c s; -s c] [a; b] = [r; 0]`
    (Choi, Paige and Saunders 2011, Table 2.9). `(1, 0, 0)` for `a = b = 0`."""
    r = hypot(a, b)
    safe = select(r == 0, 1, r)
    c = select(r == 0, 1, a / safe)
    s = select(r == 0, 0, b / safe)
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
    maxrbar: Scalar
    minrbar: Scalar
    normr: Scalar
    normar: Scalar
    norm_a: Scalar
    cond_a: Scalar
    started: Array  # a step has been made (the cond(A) estimate is meaningful)
    # With `y0`: the iterate the recurrence's correction `x` is added to, and the
    # 2-norm of its residual, which the recurrence started from (see
    # `Iteration.rescue`); `None` without (the correction is from `y0`).
    base: PyTree[Array] | None = None
    start: Scalar | None = None


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
        relative accuracy `rtol`: the test for inconsistent systems). It is the
        paper's test 2 with its `atol` set to our `rtol`, except that `||A||` is
        an estimate of the operator's 2-norm from below (the largest column or row
        norm of LSMR's bidiagonal matrix), not the paper's estimate of its
        Frobenius norm, which grows past the true one once rounding has destroyed
        orthogonality. So success implies the test with the true `||A||_2`, and
        with `||A||_F`.

    Rule 2 does not tell a consistent system from an inconsistent one: where
    `cond(A) > 1 / rtol`, a residual along the operator's smallest singular
    directions passes it however large it is. On a square nonsingular system
    that badly conditioned (float32, rows scaled by 10^±3: cond 2e5-9e5, rtol
    1e-5), LSMR can stop successful with `||r||` at 40-70% of `||b||`, as
    SciPy's `lsmr` (`istop = 2`) and the published lineax do on the same
    inputs. To solve such a system, not fit it, use GMRES, BiCGStab or a
    direct solver, or check `||r||` yourself.

    In finite precision LSMR's true `||A^H r|| / (||A|| ||r||)` levels off at about
    `eps * cond(A)` (float32: 1e-3 at cond 1e4), so a smaller `rtol` cannot be met
    on a true residual. Once the iteration can go no further (LSMR's estimate of
    `||A^H r||` passes rule 2, as it would in exact arithmetic, or the solve
    stagnates, see below), rule 2 on the true residual therefore uses
    `max(rtol, 10 * eps * cond)`, with LSMR's estimate of `cond(A)`, but never
    more than `1e-2`: the answer is then as good as the dtype allows, and is
    reported successful, as the published lineax and SciPy's `lsmr` (which test
    the estimates only) report it. Above `1e-2` it is a failure (`stagnation`).
    Where the iteration has stagnated, the level is at least `2 eps (||b|| +
    ||A|| ||y||) / ||r||` too: the rounding of the computed residual and of the
    iterate itself, which dominates where the least-squares residual is small
    next to `b` or to `A y` (a float32 fit with a residual of 0.1% of `b` cannot
    show `||A^H r|| / (||A|| ||r||)` below about 1e-4; a float64 Gauss-Newton
    step with `||A|| ||y||` 8e9 times `||r||`, below about 1e-6).

    The iteration stops when LSMR's estimates of these quantities pass them, then
    verifies them on the true residual (continuing with tighter thresholds if that
    fails). The paper's test 1 is replaced by the first rule, so that success means
    the same as for the other Krylov solvers. If LSMR's estimate of the condition
    number exceeds `conlim` first, [`lineax.RESULTS.conlim`][] is returned.

    With the `damp` option, LSMR solves the damped problem
    `min ||A x - b||^2 + damp^2 ||x||^2`, as the least-squares problem of the
    stacked operator `[A; damp I]` with right-hand side `(b, 0)`: the residual in
    both rules is the stacked residual `(b - A y, -damp y)`, and derivatives (with
    respect to the operator, the vector and `damp`) are those of
    `(A^H A + damp^2 I)^{-1} A^H b`.

    Starting from `y0` gives `y0` plus the minimum-norm correction, which is the
    minimum-norm solution only if `y0` is in the row space of `A` (with `damp > 0`
    the solution is unique, and `y0` only changes where the iteration starts).

    Because the solution is a pseudoinverse solution of a possibly rank-deficient
    operator, `assume_full_rank()` is `False` (its derivative uses the general
    pseudoinverse JVP). The iterate with the smallest true residual is returned if
    the solve does not succeed. The true residual is checked every 50 steps, and
    the solve stops with [`lineax.RESULTS.stagnation`][] after 20 checks in a row
    without a new best, or as soon as LSMR's estimate of `||A^H r||` has fallen
    16-fold since the true `||A^H r||` last halved (the normal-equations tolerance
    is then below what the dtype can reach; if the iterate meets the level it can
    reach, above, the solve is successful instead).

    **Arguments:**

    - `rtol`, `atol`: as above.
    - `norm`: the norm of rule 1. Defaults to the 2-norm.
    - `max_steps`: the maximum number of steps (one product with `A` and one with
        `A^H` each). `None` means 10 × the larger dimension of the operator.
    - `conlim`: the bound on the estimated condition number.
    - `history_length`, `verbose`: as for [`lineax.CG`][].

    **Options:**

    - `damp`: a nonnegative scalar, for damped least squares (default 0). A
        solver that passes `options` on to an inner LSMR (`lx.BlockDiagonal`,
        `lx.Kronecker`, `lx.Normal`, `lx.Woodbury`, `lx.Schur`) refuses it with
        a `ValueError`: only the problem given to `linear_solve` is damped.
        Every other solver ignores it (a key some solver reads is accepted by
        all, as in lineax 0.1.1: see [`lineax.linear_solve`][]'s `options`).
    - `preconditioner`: a nonsingular operator `N` on the operator's input space,
        used on the right: LSMR is run on `A N` from `b - A y0`, and
        `y = y0 + N z` is returned. A good choice scales the columns of `A` to
        unit norm. For rank-deficient or underdetermined problems this changes
        which solution is found (`N (A N)^+ b`, the one minimising
        `||N^{-1} y||`, not `||y||`), and derivatives are those of that solution
        (in `N` too, where it depends on what is differentiated). With `y0`, the
        first rule's `rtol` is relative to `norm(b - A y0)`. The transposed solve
        made in reverse mode is that of `(A N)^T = N^T A^T`, as well conditioned
        as `A N`.
    - `y0`: an initial guess for the solution.
    """

    rtol: float = static_number(float)
    atol: float = static_number(float)
    norm: Callable[[PyTree[Array]], Scalar] = eqx.field(static=True, default=two_norm)
    max_steps: int | None = static_number(int | None, default=None)
    conlim: float = static_number(float, default=1e8)
    history_length: int | None = static_number(int | None, default=None)
    verbose: bool | int = eqx.field(static=True, default=False)

    option_keys = frozenset({"damp", "preconditioner", "y0"})
    # (`preconditioner` poses `A N` too, but an inner solver's `compute` called
    # directly keeps its meaning, and the solution it gives differs from the
    # pseudoinverse one only where the inner operator is singular, where the
    # wrappers do not promise derivatives: see `compute`.)
    reformulating_keys = frozenset({"damp"})
    right_preconditioned = True

    def __check_init__(self):
        check_static_float(self.conlim, "conlim")
        if not self.conlim > 0:
            raise ValueError(f"`conlim` must be positive, got {self.conlim}.")

    def init(
        self, operator: AbstractLinearOperator, options: dict[str, Any]
    ) -> KrylovState:
        # A right preconditioner: it maps the operator's input space to itself.
        self.checked_options(operator, options)
        # The state of the problem `reformulate` poses, so that a state made here
        # is the one `linear_solve` makes (and checks a `state=` against).
        return KrylovState(_posed_operator(operator, options)[0])

    def reformulate(
        self,
        operator: AbstractLinearOperator,
        vector: PyTree[Array],
        options: dict[str, Any],
    ) -> Reformulated:
        """The solve `linear_solve` binds, so that the generic derivative rules
        (the pseudoinverse JVP, the transposed solve) are those of the solution
        LSMR returns:

        - a damped solve becomes the undamped least-squares solve of
            `[A; damp I] x = (b, 0)` (a full-column-rank problem for `damp > 0`);
        - a solve with a right preconditioner `N` becomes the solve of
            `(A N) z = b - A y0`, whose minimum-norm least-squares solution `z` is
            mapped to `y = y0 + N z` outside the solve. `N z` is not `A^+ b` where
            `A` is wide or rank-deficient, and the pseudoinverse JVP applied to `y`
            as the solution of `A y = b` was wrong there in the operator (relative
            error 0.88 on a 3 x 6 operator): its null-space term for `N (A N)^+`
            needs `N^{-1}`. Posed so, it is the derivative of `(A N)^+`, and `N`'s
            own derivative (a preconditioner built from the operator) is counted.
        """
        if options.get("preconditioner", None) is not None:
            # (Checked before `A N` is made, which would refuse a bad one less
            # clearly; else `init` checks them.)
            self.checked_options(operator, options)
        posed, rest = _posed_operator(operator, options)
        if posed is operator:
            return operator, vector, options
        if options.get("damp", None) is not None:
            vector = _stacked_vector(operator, vector)
        precond = options.get("preconditioner", None)
        if precond is None:
            return posed, vector, rest
        vector, recover = _right_preconditioned(posed, precond, vector, rest)
        return posed, vector, _without(rest, "y0"), recover

    def compute(
        self, state: KrylovState, vector: PyTree[Array], options: dict[str, Any]
    ):
        operator = state.operator
        recover = None
        if options.get("damp", None) is not None:
            # Called directly rather than through `linear_solve`: `init` stacked
            # the operator already.
            options = _without(options, "damp")
            vector = _stacked_vector(operator, vector)
        precond, y0 = self.checked_options(operator, options, left=state.left)
        if precond is not None:
            # Called directly too (see `reformulate`): `init` made `N` part of the
            # operator, `A N`; after `transpose`, `(A N)^T = N^T A^T`, whose
            # solve, transposing `b -> y0 + N (A N)^+ (b - A y0)` in `b`, is
            # `g -> ((A N)^+)^T N^T g`. (With `state.left` the option holds
            # `N^T`.)
            if not isinstance(operator, ComposedLinearOperator):
                raise ValueError(
                    "`LSMR.compute` was given a `preconditioner` option, but "
                    "`state` was made by `LSMR.init` without it: pass the same "
                    "options to both."
                )
            if state.left:
                vector = precond.mv(vector)
            else:
                vector, recover = _right_preconditioned(
                    operator, precond, vector, options
                )
            y0 = None
        problem = self.problem(operator, vector, y0)
        solution, result, stats = _lsmr(self, operator, problem)
        if recover is not None:
            solution = recover(solution)
        return solution, result, stats

    def assume_full_rank(self) -> bool:
        return False


def _without(options: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in options.items() if k not in keys}


def _posed_operator(
    operator: AbstractLinearOperator, options: dict[str, Any]
) -> tuple[AbstractLinearOperator, dict[str, Any]]:
    """The operator LSMR iterates on (`[A; damp I]` for a damped solve, times `N`
    on the right for a preconditioned one), and the options left; `operator`
    itself if neither."""
    operator, options = _undamped(operator, options)
    precond = options.get("preconditioner", None)
    if precond is None:
        return operator, options
    return ComposedLinearOperator(operator, precond), _without(
        options, "preconditioner"
    )


def _right_preconditioned(
    posed: AbstractLinearOperator,
    precond: AbstractLinearOperator,
    vector: PyTree[Array],
    options: dict[str, Any],
) -> tuple[PyTree[Array], Callable[[PyTree[Array]], PyTree[Array]]]:
    """For the posed operator `A N`: the right-hand side `b - A y0` of the
    correction `z`, and the map `z -> y0 + N z` to the solution. (`rtol` is then
    relative to `norm(b - A y0)`, as the posed problem does not see `b`.)"""
    y0 = options.get("y0", None)
    if y0 is None:
        return vector, precond.mv
    assert isinstance(posed, ComposedLinearOperator)
    vector = jtu.tree_map(lambda b, a: b - a, vector, posed.operator1.mv(y0))

    def recover(z: PyTree[Array]) -> PyTree[Array]:
        return jtu.tree_map(lambda a, b: a + b, y0, precond.mv(z))

    return vector, recover


def _undamped(operator, options):
    """`([A; damp I], options without damp)` for a damped solve."""
    damp = options.get("damp", None)
    if damp is None:
        return operator, options
    options = _without(options, "damp")
    damp = jnp.asarray(_checked_damp(damp), real_dtype(operator.in_structure()))
    # A Module, not a closure: its arrays are PyTree leaves of the operator (and of
    # LSMR's state), so a `Solution` of a damped solve can be returned from
    # `jax.jit` (a closure-converted function holds a jaxpr, not a valid output).
    stacked = _Stacked(operator, damp)
    return (
        FunctionLinearOperator(stacked, operator.in_structure(), closure_convert=False),
        options,
    )


def _checked_damp(damp: Any) -> Any:
    """`damp`, if it is a real scalar (a Python or NumPy number, or a 0-d array,
    traced or not); a TypeError or ValueError naming it otherwise. (A complex
    `damp` raised "float() argument must be a string or a real number" from the
    cast, a string JAX's message about its dtype, and a vector, which broadcast
    against the unknowns, "mul got incompatible shapes" from inside `mv`.)"""
    if isinstance(damp, (str, bytes)) or not (
        isinstance(damp, (int, float, complex, np.number)) or hasattr(damp, "dtype")
    ):
        raise TypeError(
            "The `damp` option of `lx.LSMR` must be a real scalar (a number or a "
            f"0-d array), got {type(damp).__name__}."
        )
    if jnp.ndim(damp) != 0:
        raise ValueError(
            "The `damp` option of `lx.LSMR` must be a real scalar, got an array of "
            f"shape {jnp.shape(damp)}."
        )
    if jnp.iscomplexobj(damp):
        raise TypeError(
            "The `damp` option of `lx.LSMR` must be real (it enters as "
            f"`damp² ||x||²`), got {damp!r}."
        )
    return damp


class _Stacked(eqx.Module):
    """`x -> (A x, damp x)`, the action of `[A; damp I]`."""

    operator: AbstractLinearOperator
    damp: Array

    def __call__(self, x: PyTree[Array]) -> tuple[PyTree[Array], PyTree[Array]]:
        return self.operator.mv(x), tree_scale(self.damp, x)


def _stacked_vector(operator, vector):
    return (vector, tree_zeros(operator.in_structure()))


def _lsmr(solver: LSMR, operator, problem: Problem):
    """The LSMR iteration on the correction `z` (`y = y0 + z`)."""
    in_structure = operator.in_structure()
    complex_ = tree_is_complex(in_structure, operator.out_structure())
    rdtype = problem.rdtype
    rtol = solver.rtol
    transposed_mv = checked_mv(operator.transpose(), "LSMR")

    def raw_rmv(y):
        # A^H y = conj(A^T conj(y)).
        if complex_:
            y = jtu.tree_map(jnp.conj, y)
        out = transposed_mv(y)
        if complex_:
            out = jtu.tree_map(jnp.conj, out)
        return out

    # LSMR runs on `A / 2^s`, with `2^s` a power-of-two estimate of the scale
    # of `A` from the product it makes first (see `Problem.op_inverse`): its
    # `alpha`, `beta` and the norms of `A v` and `A^H u` scale with the operator,
    # and their squares overflowed (an operator of norm 1e20 in float32) or
    # underflowed to a zero `alpha` (1e-20: "solved" after no step). Its iterate
    # `z'` is then `2^s z`.
    r0 = problem.r0
    beta = norm2(r0)
    u = tree_scale(safe_div(1, beta), r0)
    v = raw_rmv(u)
    _, op_inverse = operator_scale(v, rdtype)
    v = tree_scale(op_inverse, v)
    # (That product is made before the first step: `stats["num_mv"]` counts it.)
    problem = dataclasses.replace(problem, initial_mv=problem.initial_mv + 1)

    forward_mv = checked_mv(operator, "LSMR")

    def mv(x):
        return forward_mv(tree_scale(op_inverse, x))

    def rmv(y):
        return raw_rmv(tree_scale(op_inverse, y))

    def solution(c: _Carry):
        z = tree_scale(op_inverse, c.x)
        base = problem.x0 if c.base is None else c.base
        return jtu.tree_map(lambda a, b: a + b, base, z)

    # The last residual `normal_residual` was given, and its result.
    last: list = []

    def normal_residual(r):
        # ||A^H r||_2, and ||r||_2. Each verification asks for it up to
        # three times, for the same residual object (`normal_solved`, `progress`,
        # `at_floor`): made once, as each traced product would be lowered and
        # compiled (XLA merges them only after that).
        return normal_product(r)[:2]

    def normal_product(r):
        # `normal_residual`, and the product `A^H r` itself (for `rescue`).
        if last and last[0][0] is r:
            return last[0][1]
        product = rmv(r)
        # (With `y0`, guarded against underflow, see `AbstractKrylovSolver.problem`:
        # two 2-norms of 0 passed the test `0 <= rtol ||A|| 0`.)
        norm = two_norm if problem.warm else norm2
        out = norm(product), norm(r), product
        last[:] = [(r, out)]
        return out

    def normal_solved(c: _Carry, x, r):
        # The normal-equations test on a true residual: ||A^H r||_2 <=
        # rtol ||A|| ||r||_2; or, once LSMR's own estimate passes it (the
        # iteration has gone as far as it would in exact arithmetic), the same test
        # at the level finite precision can reach (`at_floor`).
        normal, rnorm = normal_residual(r)
        estimated = c.normar <= rtol * c.norm_a * c.normr
        return (normal <= rtol * c.norm_a * rnorm) | (estimated & at_floor(c, x, r))

    def at_floor(c: _Carry, x, r, level=None):
        # ||A^H r||_2 <= max(rtol, 10 eps cond) ||A|| ||r||_2: see
        # `_FLOOR_FACTOR`; or at `level` instead of `10 eps cond`.
        del x
        normal, rnorm = normal_residual(r)
        if level is None:
            level = _FLOOR_FACTOR * problem.eps * c.cond_a
        attainable = jnp.minimum(level, _FLOOR_CAP)
        return normal <= jnp.maximum(rtol, attainable) * c.norm_a * rnorm

    def at_floor_stagnated(c: _Carry, x, r):
        # Where the solve would stop with `stagnation`: `at_floor`, at the larger
        # of its level and the noise of the test itself. The true residual
        # `b - A y` is computed to within about eps ||b|| (eps ||r0|| for the
        # correction from `y0`), so where the least-squares residual is small
        # next to `b` its direction, hence `A^H r`, is mostly rounding:
        # `||A^H r|| / (||A|| ||r||)` cannot be shown below about
        # `eps ||r0|| / ||r||`. In float32 (`rtol=1e-5`) least-squares fits with
        # residuals 0.01-0.1% of `b` stagnated with answers accurate to 1e-7 (cond
        # 1: 6 of 6 fits; cond 100: 5 of 6), and so did a ridge fit (`damp=0.1`,
        # residual 1% of `b`, accurate to 1.2e-7). (Only here, where the
        # iteration has stopped improving: at the first pass of LSMR's estimate
        # the solve goes on, which gained up to two digits at cond 1e4.)
        # The iterate itself is computed to within about eps ||y|| in every
        # direction (it is a sum of vectors of its own size), and `A^H A`
        # carries that error along the largest singular directions into
        # `||A^H r||` as up to `eps ||A||^2 ||y||`: the bound of the residual's
        # rounding, `eps (||b|| + ||A|| ||y||)`, in full. Where `||A|| ||y||`
        # is far above `||r||` it dominates: a float64 Gauss-Newton Jacobian
        # (cond 9e7, ||A|| ||y|| = 8e9 ||r||) stagnated at 1.2e-6, an answer
        # right to 2e-11 (SciPy's `lsmr`: 6e-7, 1e-11), where `x` perturbed at
        # random by eps ||x|| reads 1e-6 too. (`||A|| ||y||` in units of the
        # scaled operator, whose iterate is `y / op_inverse`.)
        _, rnorm = normal_residual(r)
        start = beta if c.start is None else c.start
        rounding = start + c.norm_a * norm2(x) / op_inverse
        noise = 2 * rounding / select(rnorm == 0, 1, rnorm)
        level = problem.eps * jnp.maximum(_FLOOR_FACTOR * c.cond_a, noise)
        return at_floor(c, x, r, level)

    def settled(c: _Carry, factor):
        # The same test on LSMR's estimates, tightened with the outer loop.
        return c.normar <= factor * rtol * c.norm_a * c.normr

    started = ft.partial(_started, rdtype=rdtype)
    carry = started(u, beta, v, problem.x0 if problem.warm else None)
    rescue: Callable | None = None
    if problem.warm:
        bnorm = two_norm(problem.vector)

        def rescue_from(c: _Carry, x, r):
            # (See `Iteration.rescue`; `A^H r` is that of the verification.)
            assert c.start is not None
            _, rnorm, product = normal_product(r)
            scale = safe_div(1, rnorm)
            fresh = started(tree_scale(scale, r), rnorm, tree_scale(scale, product), x)
            return fresh, rescue_allowed(c.start, rnorm, bnorm)

        rescue = rescue_from

    # A `conlim` beyond the dtype's range (1e8 in float16) would be cast to inf,
    # and the test could never fire: an estimate that overflows is above it.
    conlim = min(solver.conlim, float(jnp.finfo(rdtype).max))
    method = Iteration(
        step=ft.partial(_step, mv=mv, rmv=rmv),
        estimate=lambda c: c.normr,
        solution=solution,
        restart=lambda c, x, r, passed: c,
        # alpha * beta = 0 before any step: A^H b = 0, so x0 already solves the
        # normal equations (a zero operator, a right-hand side orthogonal to its
        # range, an input of size 0): a success, with no step to make. Later, a
        # vanishing (or NaN) estimate without a verified residual is a breakdown.
        halted=lambda c: (c.cond_a > conlim) | ~(c.normar > 0),
        halt_result=lambda c: results_where(
            c.cond_a > conlim,
            RESULTS.conlim,
            results_where(
                ~c.started & (c.normar == 0), RESULTS.successful, RESULTS.breakdown
            ),
        ),
        settled=settled,
        accept=normal_solved,
        mv_per_step=2,
        verify_mv=2,
        pass_length=CHECK_EVERY,
        # Stagnation: LSMR's estimate of ||A^H r|| keeps falling while the true
        # one does not (it is exact in exact arithmetic). The product is shared
        # with `normal_solved`.
        progress=lambda c, x, r, rnorm: normal_residual(r)[0],
        progress_estimate=lambda c: c.normar,
        accept_at_floor=at_floor_stagnated,
        rescue=rescue,
    )
    return iterate(solver, problem, method, carry)


# The steps of `_lsmr` that need none of its closures.


def _step(c: _Carry, mv: Callable, rmv: Callable) -> _Carry:
    """One LSMR step: `mv` and `rmv` apply the scaled operator and its adjoint."""
    # Golub-Kahan bidiagonalisation.
    u = tree_axpy(-c.alpha, c.u, mv(c.v))
    beta = norm2(u)
    u = tree_scale(safe_div(1, beta), u)
    v = tree_axpy(-beta, c.v, rmv(u))
    alpha = norm2(v)
    v = tree_scale(safe_div(1, alpha), v)
    # Rotation Q turning B into R (the damping is in the stacked operator).
    rhoold = c.rho
    cc, s, rho = _sym_ortho(c.alphabar, beta)
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
    betahat = cc * c.betadd
    betadd = -s * c.betadd
    thetatildeold = c.thetatilde
    ctildeold, stildeold, rhotildeold = _sym_ortho(c.rhodold, thetabar)
    thetatilde = stildeold * rhobar
    rhodold = ctildeold * rhobar
    betad = -stildeold * c.betad + ctildeold * betahat
    tautildeold = safe_div(zetaold - thetatildeold * c.tautildeold, rhotildeold)
    taud = safe_div(zeta - thetatilde * tautildeold, rhodold)
    normr = jnp.sqrt(c.d + (betad - taud) ** 2 + betadd**2)
    # ||A||, estimated from below by the norms of the columns and rows of the
    # bidiagonal B = U^H A V: each is at most ||A||_2, up to rounding, however
    # much orthogonality U and V have lost. The paper's estimate, ||B||_F, is
    # ||A||_F in exact arithmetic but keeps growing once orthogonality is lost
    # (ghost singular values), so that after many steps its normal-equations
    # test passed with ||A^H r|| 5x above `rtol ||A||_F ||r||` (2000 x 400,
    # cond 1e3, float64). A lower bound on ||A||_2 (<= ||A||_F) makes success
    # imply the test with the true ||A||_2, and so with ||A||_F.
    norm_a = jnp.maximum(
        c.norm_a, jnp.maximum(hypot(c.alpha, beta), hypot(beta, alpha))
    )
    # Before the first step `rhobar` is its initial 1, not a value of the
    # operator: SciPy's `lsmr` lets it into `maxrbar` (harmless where ||A||
    # is far from 1), but the operator here is scaled to a norm near 1, so
    # the estimate of cond(A) came out up to 2x too large: `conlim` (1e8)
    # fired on a Gauss-Newton Jacobian of condition number 9.1e7.
    maxrbar = select(c.started, jnp.maximum(c.maxrbar, rhobarold), c.maxrbar)
    minrbar = select(c.started, jnp.minimum(c.minrbar, rhobarold), c.minrbar)
    cond_a = safe_div(jnp.maximum(maxrbar, rhotemp), jnp.minimum(minrbar, rhotemp))
    return _Carry(
        x, u, v, h, hbar, alpha, beta, alphabar, zeta, zetabar, rho, rhobar,
        cbar, sbar, betadd, betad, rhodold, tautildeold, thetatilde, c.d,
        maxrbar, minrbar, normr, jnp.abs(zetabar), norm_a, cond_a,
        jnp.array(True), c.base, c.start,
    )  # fmt: skip


def _started(u, beta, v, base, rdtype: Any) -> _Carry:
    """The carry of a recurrence from the residual `beta u` (`|u| = 1`), `v` being
    `A^H u` (of the scaled operator)."""
    alpha = norm2(v)
    v = tree_scale(safe_div(1, alpha), v)
    zero = jnp.zeros((), rdtype)
    one = jnp.ones((), rdtype)
    z0 = tree_scale(0, v)
    return _Carry(
        z0, u, v, v, z0, alpha, beta, alpha, zero, alpha * beta, one, one, one,
        zero, beta, zero, one, zero, zero, zero, zero,
        jnp.asarray(jnp.finfo(rdtype).max, rdtype), beta, alpha * beta,
        alpha, one, jnp.array(False), base, None if base is None else beta,
    )  # fmt: skip
