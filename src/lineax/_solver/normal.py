"""`Normal`: solve the normal equations with a solver for positive definite
systems."""

import functools as ft
import math
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array

from .._misc import (
    complex_to_real_dtype,
    HeldArrays,
    is_inexact_array,
    power_of_two_normaliser,
    tree_conj,
    tree_is_complex,
)
from .._operator.base import AbstractLinearOperator, conj, linearise, materialise
from .._operator.diagonal_operator import DiagonalLinearOperator
from .._operator.matrix import MatrixLinearOperator
from .._operator.pytree import PyTreeLinearOperator
from .._operator.tagged import TaggedLinearOperator, unwrap_tagged
from .._operator.tridiagonal_operator import TridiagonalLinearOperator
from .._solution import RESULTS
from .._tags import positive_semidefinite_tag
from ._krylov import AbstractKrylovSolver, check_product_structure, SCALE_OPERATOR
from .base import AbstractLinearSolver, check_passed_on, check_solver
from .svd import SVD


class NormalState(eqx.Module):
    """State of [`lineax.Normal`][]."""

    held: HeldArrays  # the operator, with arrays as its only leaves
    inner_state: Any
    # The power of two that the held operator is `A` multiplied by (see
    # `_rescaled`), or `None` where it is `A` itself.
    scale: Array | None
    tall: bool = eqx.field(static=True)
    complex_: bool = eqx.field(static=True)

    def __init__(
        self,
        operator: AbstractLinearOperator,
        inner_state: Any,
        scale: Array | None,
        tall: bool,
        complex_: bool,
    ):
        self.held = HeldArrays(operator)
        self.inner_state = inner_state
        self.scale = scale
        self.tall = tall
        self.complex_ = complex_

    @property
    def operator(self) -> AbstractLinearOperator:
        return self.held.value


def _adjoint_mv(operator: AbstractLinearOperator, vector, complex_: bool):
    """`A^H vector`, without materialising the conjugate operator."""
    return tree_conj(operator.transpose().mv(tree_conj(vector, complex_)), complex_)


def _normal_operator(operator: AbstractLinearOperator, tall: bool, complex_: bool):
    adjoint = operator.transpose()
    if complex_:
        adjoint = conj(adjoint)
    gram = adjoint @ operator if tall else operator @ adjoint
    return TaggedLinearOperator(gram, positive_semidefinite_tag)


# Materialised operators whose action is linear in each of their arrays: scaling
# every array scales the operator by the same factor. (Not so a Kronecker
# product or a low-rank update, which `materialise` keeps structured.)
_LINEAR_IN_ARRAYS = (
    MatrixLinearOperator,
    PyTreeLinearOperator,
    DiagonalLinearOperator,
    TridiagonalLinearOperator,
)


def _rescaled(
    operator: AbstractLinearOperator,
) -> tuple[AbstractLinearOperator, Array | None]:
    """`s A` and `s`, for the power of two `s` that brings `A`'s largest entry
    into `[1, 2)` (see `power_of_two_normaliser`), where `A` holds its entries as
    arrays; else `A` and `None`.

    The Gram matrix squares `A`'s entries: in float32 those above about `2e19`
    overflow it and those all below about `1e-19` underflow it, and its
    factorisation reported `singular` (or, by SVD, returned `0` as a success) for
    a well-conditioned `A`. The solution for `s A` and `s b` is `x` (`(s A)^+ =
    A^+ / s`), so `compute` multiplies `b` by `s`. (`b` rather than the
    solution: XLA fuses that multiplication into the product `(s A)^H b`, one
    kernel fewer; `s b` overflows only where `x` is within a factor
    `sqrt(m n)` of overflowing, as `|x| >= |b| / (sqrt(m n) max |A|)`.) Both
    multiplications are exact: the solution is that of the unscaled solve,
    bitwise, wherever that one neither over- nor underflowed (the whole
    factorisation scales by `s²` exactly, its square roots by `s`)."""
    if not isinstance(unwrap_tagged(operator), _LINEAR_IN_ARRAYS):
        return operator, None
    arrays = [x for x in jtu.tree_leaves(operator) if is_inexact_array(x) and x.size]
    reals = {complex_to_real_dtype(x.dtype) for x in arrays}
    if len(reals) != 1:
        # (None, or arrays of several precisions: a power of two for float64
        # entries may not be one of float32's.)
        return operator, None
    (real,) = reals
    largest = ft.reduce(jnp.maximum, [jnp.max(jnp.abs(x)).astype(real) for x in arrays])
    scale = power_of_two_normaliser(largest)
    scaled = jtu.tree_map(
        lambda x: x * scale.astype(x.dtype) if is_inexact_array(x) else x, operator
    )
    return scaled, scale


def _inner_options(
    operator: AbstractLinearOperator, tall: bool, options: dict[str, Any]
) -> dict[str, Any]:
    """The `options` for the inner solver. For a wide operator its unknown is `y`
    (`x = A^H y`), of the operator's output structure: a `y0` with the input
    structure (a guess for `x`, as `linear_solve` documents `y0`) is dropped. It
    cannot be turned into a guess for `y` without a solve with the Gram operator,
    and solving for a correction from it would add its null-space component to
    the minimum-norm answer. (Passed on, it failed the inner solver's check with a
    message about an input structure that was not the user's operator's.)"""
    y0 = options.get("y0", None)
    if tall or y0 is None:
        return options
    structure = operator.in_structure()
    if jtu.tree_structure(y0) == jtu.tree_structure(structure) and all(
        jnp.shape(leaf) == s.shape
        for leaf, s in zip(jtu.tree_leaves(y0), jtu.tree_leaves(structure))
    ):
        return {k: v for k, v in options.items() if k != "y0"}
    return options


class Normal(AbstractLinearSolver[NormalState]):
    """Solves the normal equations with an inner solver for positive definite
    systems.

    For a tall (or square) operator, solves `A^H A x = A^H b` (least squares); for a
    wide one, solves `A A^H y = b` and returns `x = A^H y` (minimum norm). The
    Gram operator is passed to `inner_solver` tagged positive semidefinite, so
    `inner_solver` may be e.g. [`lineax.Cholesky`][] or [`lineax.CG`][]
    (matrix-free). With any inner solver but a Krylov one, `A` is materialised
    once, in `init`, and the state holds arrays only. Squaring the condition
    number is the price: prefer [`lineax.QR`][] or [`lineax.LSMR`][] for
    ill-conditioned problems. The Gram matrix squares `A`'s entries too: with a
    direct inner solver, `A` (materialised as a matrix, PyTree, diagonal or
    tridiagonal operator) is first multiplied by the power of two that brings
    its largest entry into `[1, 2)`, and the solution by the same, which is
    exact, so that entries near the dtype's limits (float32: `1e±20`) do not
    over- or underflow the Gram matrix. (In range, the solution is bitwise that
    of the unscaled solve.) A Krylov inner solver is not rescaled: there, entries
    of `A` above about 1e154 in float64, 2e19 in float32, or all below about
    1e-154, 1e-19, make it report [`lineax.RESULTS.breakdown`][] or stop at
    its `atol`; rescale `A` (and `b`) by a power of two, or use `QR`.

    What it assumes about the rank is `inner_solver`'s (`assume_full_rank()`).
    With [`lineax.Cholesky`][] or [`lineax.CG`][] (full rank) a rank-deficient `A`
    may still be solved, CG from a zero guess even to the pseudoinverse
    solution, but derivatives then use the full-rank formula and are wrong: for
    rank-deficient problems use [`lineax.SVD`][] or [`lineax.LSMR`][]. An inner
    `SVD(rcond=r)` keeps the Gram operator's eigenvalues `s²` above `r max(s²)`:
    the solution, and its derivatives, are those of `SVD(rcond=sqrt(r))` on `A`
    (a truncated SVD; see [`lineax.SVD`][]). Success is
    judged by `inner_solver` on the normal equations (the residual
    `A^H (b - A x)` for a tall `A`), whose condition number is that of `A`
    squared: in float32 with badly scaled columns a `successful` solve can leave
    `||b - A x||` well above `rtol ||b||` even where `A x = b` has a solution.

    **Arguments:**

    - `inner_solver`: a solver for positive (semi)definite operators.

    `options` are passed on to `inner_solver` (e.g. a `preconditioner` for the
    Gram operator, and `y0`). For a wide operator the inner solver's unknown is
    `y`, with `x = A^H y`: a `y0` for `x` (the operator's input structure) is
    ignored there, since using it would change the minimum-norm answer; a `y0`
    for `y` (the operator's output structure) is passed on.
    """

    inner_solver: AbstractLinearSolver

    option_keys = frozenset()  # `options` are passed on to the inner solver(s)

    def __check_init__(self):
        check_solver(self.inner_solver, "inner_solver")

    def init(
        self, operator: AbstractLinearOperator, options: dict[str, Any]
    ) -> NormalState:
        check_passed_on((self.inner_solver,), options, "Normal")
        tall = operator.out_size() >= operator.in_size()
        complex_ = tree_is_complex(operator.in_structure(), operator.out_structure())
        if not isinstance(self.inner_solver, AbstractKrylovSolver):
            # A direct inner solver reads the Gram matrix: `A` is materialised
            # once here, not for each factor of `A^H A` and again for each
            # `A^H b`, and the state then holds arrays only (as in lineax 0.1.1).
            # Optimistix's Chord and Diffrax's VeryChord keep the state across
            # steps through `lax.stop_gradient`, which refused the function
            # operator (its closure-converted jaxpr) that `linearise` gives them.
            operator, scale = _rescaled(materialise(operator))
        else:
            scale = None
            # As a Krylov solver linearises its operator (see `KrylovState`): here,
            # before `A` is transposed for `A^H A` and kept for `A^H b`, so that a
            # Jacobian operator's function is traced once, not by each of them.
            operator = linearise(operator)
            # `A^H A` feeds `A`'s products to `A^H`: a user's `mv` returning the
            # wrong structure failed inside the composition, before the inner
            # solver could check its operator.
            for factor in (operator, operator.transpose()):
                check_product_structure(factor, "Normal")
        gram = _normal_operator(operator, tall, complex_)
        options = _inner_options(operator, tall, options)
        return NormalState(
            operator, self.inner_solver.init(gram, options), scale, tall, complex_
        )

    def compute(self, state: NormalState, vector, options):
        operator = state.operator
        options = _inner_options(operator, state.tall, options)
        if isinstance(self.inner_solver, AbstractKrylovSolver):
            # The Gram operator squares `A`'s scale: a Krylov solver scales it
            # (see `SCALE_OPERATOR`).
            options = {**options, SCALE_OPERATOR: True}
        if state.scale is not None:
            # (`s A` is solved for `s b`: see `_rescaled`.)
            scale = state.scale
            vector = jtu.tree_map(lambda leaf: leaf * scale.astype(leaf.dtype), vector)
        if state.tall:
            rhs = _adjoint_mv(operator, vector, state.complex_)
            x, result, stats = self.inner_solver.compute(
                state.inner_state, rhs, options
            )
        else:
            y, result, stats = self.inner_solver.compute(
                state.inner_state, vector, options
            )
            x = _adjoint_mv(operator, y, state.complex_)
        # The Gram matrix squares `A`'s entries, and overflows where `A` does not
        # (entries above ~1e154 in float64, ~2e19 in float32). `linear_solve`
        # tests `A`, not the Gram matrix; and from the factorisation of a matrix
        # holding inf, Cholesky, LU and SVD give a finite, wrong solution:
        # `diag(1e300, 1)` solved to `(0, 1)`, reported successful. The direct
        # inner solvers record the test of the matrix they factorised.
        finite = self.inner_solver.recorded_operator_finite(state.inner_state)
        if finite is not None:
            result = RESULTS.where(finite, result, RESULTS.singular)
        return x, result, stats

    def transpose(self, state: NormalState, options):
        # If A is tall with Gram matrix N = A^H A, then A^T is wide with Gram
        # matrix A^T (A^T)^H = conj(N) (and vice versa): conjugate the inner state.
        inner_state, options = self.inner_solver.conj(state.inner_state, options)
        new = NormalState(
            state.operator.transpose(),
            inner_state,
            state.scale,
            not state.tall,
            state.complex_,
        )
        return new, options

    def conj(self, state: NormalState, options):
        inner_state, options = self.inner_solver.conj(state.inner_state, options)
        new = NormalState(
            conj(state.operator), inner_state, state.scale, state.tall, state.complex_
        )
        return new, options

    def initial_guess(self, operator, y0):
        # For a tall `A` the inner solver's unknown is `x`: from `y0` it returns
        # `y0 + G^+ (A^H b - G y0)` for the Gram `G = A^H A` (if it uses `y0` at
        # all), and `G^+ A^H = A^+`, `G^+ G = A^+ A`, so this is `y0 + A^+ (b -
        # A y0)` with the inner solver's guess. (Without this, `Normal(LSMR())`
        # with a `y0` on a rank-deficient `A` was differentiated as if it
        # returned `A^+ b`.) For a wide `A` the unknown is `y` with `x = A^H y`,
        # and `A^H (y0 + G^+ (b - G y0)) = A^+ b` for `G = A A^H`: no `y0` left.
        if operator.out_size() < operator.in_size():
            return None
        complex_ = tree_is_complex(operator.in_structure(), operator.out_structure())
        gram = _normal_operator(operator, True, complex_)
        return self.inner_solver.initial_guess(gram, y0)

    def _truncating_svd(self) -> SVD | None:
        """The SVD of `A` that this solve is, if the inner solver is an SVD that
        cuts off nonzero singular values: it keeps the eigenvalues `s²` of the
        Gram operator above `rcond max(s²)`, i.e. `A`'s singular values above
        `sqrt(rcond) max(s)`, and so returns `A_k^+ b` for the truncated `A_k`.
        Its derivative is that of `A_k^+ b` (see `lx.SVD`): without this,
        `Normal(SVD(rcond=0.1))` was differentiated as if it returned `A^+ b`, a
        relative error of 1.0 for the singular values (1, 0.5, 0.3, 0.2)."""
        inner = self.inner_solver
        if isinstance(inner, SVD) and inner.rcond is not None:
            return SVD(rcond=math.sqrt(inner.rcond))
        return None

    def solved_operator(self, operator):
        svd = self._truncating_svd()
        return operator if svd is None else svd.solved_operator(operator)

    def part_read(self, operator, other):
        svd = self._truncating_svd()
        return other if svd is None else svd.part_read(operator, other)

    def assume_full_rank(self) -> bool:
        # The normal equations are singular exactly when A is rank deficient.
        return self.inner_solver.assume_full_rank()
