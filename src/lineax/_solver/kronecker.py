"""`Kronecker`: solves with a Kronecker product through its factors,
`(A ⊗ B)⁻¹ = A⁻¹ ⊗ B⁻¹`."""

import functools as ft
from typing import Any, ClassVar

import equinox as eqx
import jax.tree_util as jtu
from jaxtyping import PyTree

from .._misc import Static
from .._operator.base import AbstractLinearOperator
from .._operator.kronecker import apply_along_axis, KroneckerLinearOperator
from .._operator.tagged import unwrap_tagged
from .._operator.tangent import TangentLinearOperator
from ._structured import (
    AbstractPartwiseSolver,
    cheaper_by_tags,
    first_failure,
    part_options,
    reads_whole,
    solve_flat,
    solved_parts,
    structured_solver,
    tangent_parts,
    worst_result,
)
from .auto import AutoLinearSolver
from .base import AbstractLinearSolver, check_solver


class KroneckerState(eqx.Module):
    """State of [`lineax.Kronecker`][]: the inner solver's state for each factor,
    and each factor's `(input, output)` structures (a factor's right-hand sides
    have its output structure)."""

    states: tuple[PyTree, ...]
    structures: Static = eqx.field(static=True)
    sizes: tuple[int, ...] = eqx.field(static=True)


class Kronecker(AbstractPartwiseSolver[KroneckerState]):
    """Solves with a [`lineax.KroneckerLinearOperator`][] `A ⊗ B ⊗ ...` by solving
    with each factor along its own axis: `(A ⊗ B)⁻¹ = A⁻¹ ⊗ B⁻¹` (Van Loan, "The
    ubiquitous Kronecker product", J. Comput. Appl. Math. 123, 2000).

    For two dense `m×m` factors (`n = m²`) this is two `O(m³)` factorisations and
    an `O(m³) = O(n^1.5)` solve, against `O(n³)` for LU of the product: a
    `64² ⊗ 64²` system solves by two 64×64 factorisations.

    Every factor must be square (a `ValueError` otherwise). A factor that is
    singular makes the product singular, reported as
    [`lineax.RESULTS.singular`][] by the inner solver; a pseudoinverse inner
    solver (e.g. [`lineax.SVD`][]) gives the pseudoinverse solution instead,
    `(A ⊗ B)⁺ = A⁺ ⊗ B⁺`, differentiated as such.

    **Arguments:**

    - `inner`: the solver for each factor. Defaults to
        `lx.AutoLinearSolver(well_posed=True)`, which picks per factor from its
        tags (Cholesky for positive definite factors, LU otherwise).

    The `options` are passed to the inner solver, except `y0` and
    `preconditioner` (of the whole product, not of a factor): `y0` is ignored, and
    a `preconditioner` is ignored by a direct inner solver and an error for an
    iterative one.
    """

    inner: AbstractLinearSolver = AutoLinearSolver(well_posed=True)

    option_keys = frozenset()  # `options` are passed on to the inner solver(s)
    kind: ClassVar[type] = KroneckerLinearOperator

    def __check_init__(self):
        check_solver(self.inner, "inner")

    def init(
        self, operator: AbstractLinearOperator, options: dict[str, Any]
    ) -> KroneckerState:
        operator = unwrap_tagged(operator)
        if not isinstance(operator, KroneckerLinearOperator):
            raise ValueError(
                "`lx.Kronecker` solves only a `lx.KroneckerLinearOperator`, got "
                f"{type(operator).__name__}."
            )
        for i, factor in enumerate(operator.operators):
            if factor.in_size() != factor.out_size():
                # rank(A ⊗ B) = rank(A) rank(B) <= prod(min(m_i, n_i)), which is
                # below min(prod(m_i), prod(n_i)) whenever a square product has a
                # non-square factor: such a product is always singular, and a
                # full-rank solver (LU, QR) returns garbage for it.
                if operator.in_size() == operator.out_size():
                    advice = (
                        "The product is square but singular (the rank of a "
                        "Kronecker product is the product of its factors' ranks): "
                        "solve it with `lx.AutoLinearSolver(well_posed=False)` "
                        "(the pseudoinverse) instead."
                    )
                else:
                    advice = (
                        "Solve the product with "
                        "`lx.AutoLinearSolver(well_posed=None)` (dense QR, least "
                        "squares) or `well_posed=False` (the pseudoinverse) instead."
                    )
                raise ValueError(
                    "`lx.Kronecker` needs every factor to be square, but factor "
                    f"{i} has input size {factor.in_size()} and output size "
                    f"{factor.out_size()}. " + advice
                )
        options = part_options((self.inner,), options, "Kronecker")
        states = tuple(self.inner.init(f, options) for f in operator.operators)
        return KroneckerState(
            states,
            Static(
                tuple((f.in_structure(), f.out_structure()) for f in operator.operators)
            ),
            tuple(f.in_size() for f in operator.operators),
        )

    def compute(self, state: KroneckerState, vector, options):
        options = part_options((self.inner,), options, "Kronecker")
        x = vector.reshape(state.sizes)
        results = []
        for axis, inner_state in enumerate(state.states):
            solve = ft.partial(
                solve_flat,
                self.inner,
                inner_state,
                out_structure=state.structures.value[axis][1],
                options=options,
            )
            x, result = apply_along_axis(solve, x, axis, state.sizes[axis], True)
            results.append(worst_result(result))
        return x.reshape(-1), first_failure(*results), {}

    def transpose(self, state: KroneckerState, options):
        # (A ⊗ B)ᵀ = Aᵀ ⊗ Bᵀ: transpose each factor's state, keep the axes.
        inner_options = part_options((self.inner,), options, "Kronecker")
        states = []
        for inner_state in state.states:
            inner_state, _ = self.inner.transpose(inner_state, inner_options)
            states.append(inner_state)
        structures = Static(tuple((o, i) for i, o in state.structures.value))
        new = KroneckerState(tuple(states), structures, state.sizes)
        return new, options

    def conj(self, state: KroneckerState, options):
        inner_options = part_options((self.inner,), options, "Kronecker")
        states = tuple(self.inner.conj(s, inner_options)[0] for s in state.states)
        return KroneckerState(states, state.structures, state.sizes), options

    def part_read(self, operator, other):
        # The inner solver reads its part of each factor (e.g. one triangle for
        # `lx.Triangular`): the product solved is that of the factors as solved
        # (`solved_operator(f)`), P(A₁) ⊗ ... ⊗ P(Aₖ). By the product rule its
        # tangent is the sum over i of that product with P(Aᵢ) replaced by the
        # part of Aᵢ's tangent that the inner solver reads. (With the whole
        # factors Aⱼ, j ≠ i, there, the tangent of a product of factors tagged
        # unit triangular and stored with another diagonal, or tagged diagonal
        # with entries off it, was wrong.)
        parts = tangent_parts(operator, other, self.kind)
        if parts is None:
            return other
        primal, tangent = parts
        if all(reads_whole(solver, f) for solver, f in self.solver_parts(primal)):
            return other
        factors = [self.inner.solved_operator(f) for f in primal.operators]
        terms = [
            KroneckerLinearOperator(
                *factors[:i],
                self.inner.part_read(f, TangentLinearOperator(f, t_f)),
                *factors[i + 1 :],
            )
            for i, (f, t_f) in enumerate(zip(primal.operators, tangent.operators))
            if jtu.tree_leaves(t_f)
        ]
        if not terms:
            return other
        return ft.reduce(lambda a, b: a + b, terms)

    def solved_operator(self, operator):
        solved = solved_parts(operator, self.kind)
        if solved is None or all(
            reads_whole(solver, f) for solver, f in self.solver_parts(solved)
        ):
            return operator
        return KroneckerLinearOperator(
            *[self.inner.solved_operator(f) for f in solved.operators]
        )

    def solver_parts(self, operator: KroneckerLinearOperator):
        # (For the rank flags: a singular factor is solved as `A⁺ ⊗ B⁺ =
        # (A ⊗ B)⁺` by a pseudoinverse inner solver. Always "full rank" gave the
        # derivative of the full-rank formula there: wrong.)
        return [(self.inner, f) for f in operator.operators]


@structured_solver.register(KroneckerLinearOperator)
def _(operator):
    if cheaper_by_tags(operator):
        return None
    if any(f.in_size() != f.out_size() for f in operator.operators):
        return None
    return Kronecker()
