"""`TaggedLinearOperator`: adds tags to any operator."""

from typing import Any

import equinox as eqx

from .._tags import as_tags, transpose_tags
from .base import (
    AbstractLinearOperator,
    conj,
    diagonal,
    has_cheap_diagonal,
    holds_by_tags,
    holds_values,
    is_cacheable,
    is_diagonal,
    is_tridiagonal,
    linearise,
    materialise,
    matrix_is_stored,
    PREDICATE_OF_TAG,
    probe_diagonal,
    probe_tridiagonal,
    reads_every_leaf,
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


def unwrap_tagged(operator: Any) -> Any:
    """The operator inside any `TaggedLinearOperator` wrappers. For code that reads
    the structure of the wrapped operator, which the tags do not change: the
    structured solvers (tagging a structured operator keeps its solve), and the
    preconditioners that read a sparse matrix's stored entries."""
    while isinstance(operator, TaggedLinearOperator):
        operator = operator.operator
    return operator


def _register(predicate, tag):
    @predicate.register(TaggedLinearOperator)
    def _(operator):
        return holds_by_tags(operator, tag) or predicate(operator.operator)


for _tag, _predicate in PREDICATE_OF_TAG.items():
    _register(_predicate, _tag)
is_cacheable.register(TaggedLinearOperator)(lambda op: is_cacheable(op.operator))
reads_every_leaf.register(TaggedLinearOperator)(
    lambda op: reads_every_leaf(op.operator)
)
matrix_is_stored.register(TaggedLinearOperator)(
    lambda op: matrix_is_stored(op.operator)
)
holds_values.register(TaggedLinearOperator)(
    lambda op: holds_values(op.operator) or holds_values.dispatch(object)(op)
)
has_cheap_diagonal.register(TaggedLinearOperator)(
    lambda op: has_cheap_diagonal(op.operator) or holds_values(op)
)


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
    if (
        is_tridiagonal(operator)
        and not is_tridiagonal(operator.operator)
        and operator.in_size() == operator.out_size()
    ):
        return probe_tridiagonal(operator)[0]
    return diagonal(operator.operator)


@tridiagonal.register(TaggedLinearOperator)
def _(operator):
    if is_tridiagonal(operator) and not is_tridiagonal(operator.operator):
        if is_diagonal(operator):
            return tridiagonal.dispatch(AbstractLinearOperator)(operator)
        return probe_tridiagonal(operator)
    return tridiagonal(operator.operator)
