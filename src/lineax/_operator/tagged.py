"""`TaggedLinearOperator`: adds tags to any operator."""

from typing import Any

import equinox as eqx

from .. import _tags as t
from .._tags import as_tags, transpose_tags
from .base import (
    AbstractLinearOperator,
    ALL_PREDICATES,
    conj,
    diagonal,
    has_tags,
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
    probe_diagonal,
    probe_tridiagonal,
    tridiagonal,
)


class TaggedLinearOperator(AbstractLinearOperator):
    """Wraps an operator to add tags to it, e.g. to declare that a
    [`lineax.FunctionLinearOperator`][] is positive semidefinite.

    **Arguments:**

    - `operator`: any linear operator.
    - `tags`: a tag or iterable of tags; added to whatever the operator already
        declares.
    """

    operator: AbstractLinearOperator
    tags: frozenset = eqx.field(static=True)

    def __init__(self, operator: AbstractLinearOperator, tags: Any):
        if not isinstance(operator, AbstractLinearOperator):
            raise TypeError(
                "`operator` must be a `lineax.AbstractLinearOperator`, got "
                f"{type(operator).__name__}."
            )
        self.operator = operator
        self.tags = as_tags(tags)

    def mv(self, vector):
        return self.operator.mv(vector)

    def as_matrix(self):
        return self.operator.as_matrix()

    def transpose(self):
        return TaggedLinearOperator(
            self.operator.transpose(), transpose_tags(self.tags)
        )

    def in_structure(self):
        return self.operator.in_structure()

    def out_structure(self):
        return self.operator.out_structure()


_TAGS_OF_PREDICATE = {
    is_symmetric: (
        t.symmetric_tag,
        t.diagonal_tag,
        t.positive_semidefinite_tag,
        t.negative_semidefinite_tag,
    ),
    is_diagonal: (t.diagonal_tag,),
    is_tridiagonal: (t.diagonal_tag, t.tridiagonal_tag),
    is_lower_triangular: (t.lower_triangular_tag, t.diagonal_tag),
    is_upper_triangular: (t.upper_triangular_tag, t.diagonal_tag),
    is_positive_semidefinite: (t.positive_semidefinite_tag,),
    is_negative_semidefinite: (t.negative_semidefinite_tag,),
    has_unit_diagonal: (t.unit_diagonal_tag,),
}
assert set(_TAGS_OF_PREDICATE) == set(ALL_PREDICATES)


def _register(pred, tags):
    @pred.register(TaggedLinearOperator)
    def _(operator):
        return has_tags(operator, *tags) or pred(operator.operator)


for _pred, _tags_tuple in _TAGS_OF_PREDICATE.items():
    _register(_pred, _tags_tuple)


@materialise.register(TaggedLinearOperator)
def _(operator):
    return TaggedLinearOperator(materialise(operator.operator), operator.tags)


@linearise.register(TaggedLinearOperator)
def _(operator):
    return TaggedLinearOperator(linearise(operator.operator), operator.tags)


@conj.register(TaggedLinearOperator)
def _(operator):
    return TaggedLinearOperator(conj(operator.operator), operator.tags)


@diagonal.register(TaggedLinearOperator)
def _(operator):
    if is_diagonal(operator) and not is_diagonal(operator.operator):
        return probe_diagonal(operator)
    if is_tridiagonal(operator) and not is_tridiagonal(operator.operator):
        return probe_tridiagonal(operator)[0]
    return diagonal(operator.operator)


@tridiagonal.register(TaggedLinearOperator)
def _(operator):
    if is_tridiagonal(operator) and not is_tridiagonal(operator.operator):
        if is_diagonal(operator):
            return tridiagonal.dispatch(AbstractLinearOperator)(operator)
        return probe_tridiagonal(operator)
    return tridiagonal(operator.operator)
