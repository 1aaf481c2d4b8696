"""`TangentLinearOperator`: the derivative of an operator along a tangent."""

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu

from .base import (
    AbstractLinearOperator,
    conj,
    diagonal,
    has_unit_diagonal,
    is_diagonal,
    is_lower_triangular,
    is_negative_semidefinite,
    is_positive_semidefinite,
    is_symmetric,
    is_tridiagonal,
    is_upper_triangular,
    linearise,
    materialise,
    tridiagonal,
)


def _is_none(x) -> bool:
    return x is None


def _tangent_out(fn, primal, tangent):
    """The tangent of `fn(primal)` along `tangent`, with zeros (not `None`) for
    outputs that do not depend on the operator's arrays (e.g. the zero bands of a
    diagonal operator, or anything of an operator that holds no arrays)."""
    # `filter_jvp` differentiates with respect to the inexact array leaves of
    # `primal` only; other leaves (static data, integer arrays) carry no tangent.
    # `None` leaves of the output (a PyTree vector such as an Equinox model's
    # parameters with its non-array fields filtered out) stay `None`.
    out, t_out = eqx.filter_jvp(fn, (primal,), (tangent,))
    return jtu.tree_map(
        lambda p, t: t if t is not None or p is None else jnp.zeros_like(p),
        out,
        t_out,
        is_leaf=_is_none,
    )


class TangentLinearOperator(AbstractLinearOperator):
    """The JVP of an operator with respect to its own parameters.

    If `primal` is an operator depending on arrays `p`, and `tangent` is a PyTree
    like `primal` whose array leaves are tangents `dp`, this is the operator
    `d/dε primal(p + ε dp)` at ε = 0: `mv(x) = jvp(lambda op: op.mv(x))`. This is
    what the JVP rule of [`lineax.linear_solve`][] multiplies by.

    **Arguments:**

    - `primal`: a linear operator.
    - `tangent`: a PyTree with the structure of `primal`, holding tangents in its
        inexact array leaves (`None` or zeros elsewhere).
    """

    primal: AbstractLinearOperator
    tangent: AbstractLinearOperator

    def __check_init__(self):
        if not isinstance(self.primal, AbstractLinearOperator):
            raise TypeError(
                "`primal` must be a `lineax.AbstractLinearOperator`, got "
                f"{type(self.primal).__name__}."
            )
        primal_def = jtu.tree_structure(self.primal, is_leaf=_is_none)
        tangent_def = jtu.tree_structure(self.tangent, is_leaf=_is_none)
        if primal_def != tangent_def:
            raise ValueError(
                "`tangent` must have the PyTree structure of `primal` (with tangents "
                "for its inexact array leaves)."
            )

    def _jvp(self, fn):
        return _tangent_out(fn, self.primal, self.tangent)

    def mv(self, vector):
        return self._jvp(lambda op: op.mv(vector))

    def as_matrix(self):
        return self._jvp(lambda op: op.as_matrix())

    def transpose(self):
        # Transposition is linear in the operator's parameters, so the tangent of
        # the transpose is the transpose-map's JVP along `tangent`.
        primal_t, tangent_t = eqx.filter_jvp(
            lambda op: op.transpose(), (self.primal,), (self.tangent,)
        )
        return TangentLinearOperator(primal_t, tangent_t)

    def in_structure(self):
        return self.primal.in_structure()

    def out_structure(self):
        return self.primal.out_structure()


# Differentiating preserves sparsity and symmetry, but not definiteness or a unit
# diagonal (the tangent of a constant diagonal is zero).
for _pred in (
    is_symmetric,
    is_diagonal,
    is_tridiagonal,
    is_lower_triangular,
    is_upper_triangular,
):
    _pred.register(TangentLinearOperator)(lambda op, p=_pred: p(op.primal))
for _pred in (is_positive_semidefinite, is_negative_semidefinite, has_unit_diagonal):
    _pred.register(TangentLinearOperator)(lambda op: False)


@materialise.register(TangentLinearOperator)
def _(operator):
    primal_out, tangent_out = eqx.filter_jvp(
        materialise, (operator.primal,), (operator.tangent,)
    )
    return TangentLinearOperator(primal_out, tangent_out)


@linearise.register(TangentLinearOperator)
def _(operator):
    primal_out, tangent_out = eqx.filter_jvp(
        linearise, (operator.primal,), (operator.tangent,)
    )
    return TangentLinearOperator(primal_out, tangent_out)


@conj.register(TangentLinearOperator)
def _(operator):
    primal_out, tangent_out = eqx.filter_jvp(
        conj, (operator.primal,), (operator.tangent,)
    )
    return TangentLinearOperator(primal_out, tangent_out)


@diagonal.register(TangentLinearOperator)
def _(operator):
    return _tangent_out(diagonal, operator.primal, operator.tangent)


@tridiagonal.register(TangentLinearOperator)
def _(operator):
    return _tangent_out(tridiagonal, operator.primal, operator.tangent)
