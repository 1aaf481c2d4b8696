"""Operator tags: static markers of structure that solvers dispatch on at trace
time."""

from collections.abc import Callable, Iterable
from typing import Any


class _Tag:
    """A tag singleton. Compared by identity, hashable, and with a readable repr."""

    __slots__ = ("_name",)

    def __init__(self, name: str):
        self._name = name

    def __repr__(self) -> str:
        return self._name


symmetric_tag = _Tag("symmetric_tag")
"""The operator equals its transpose."""
diagonal_tag = _Tag("diagonal_tag")
"""The operator is diagonal."""
tridiagonal_tag = _Tag("tridiagonal_tag")
"""The operator is tridiagonal."""
unit_diagonal_tag = _Tag("unit_diagonal_tag")
"""The operator's diagonal is all ones (used with the triangular tags: the diagonal is
then never read)."""
lower_triangular_tag = _Tag("lower_triangular_tag")
"""The operator is lower triangular."""
upper_triangular_tag = _Tag("upper_triangular_tag")
"""The operator is upper triangular."""
positive_semidefinite_tag = _Tag("positive_semidefinite_tag")
"""The operator is positive semidefinite (Hermitian, for complex operators). Solvers
that need definiteness (Cholesky, CG) assume positive definite."""
negative_semidefinite_tag = _Tag("negative_semidefinite_tag")
"""The operator is negative semidefinite (Hermitian, for complex operators)."""


def _swap_triangular(tags: frozenset) -> frozenset:
    out = set()
    if lower_triangular_tag in tags:
        out.add(upper_triangular_tag)
    if upper_triangular_tag in tags:
        out.add(lower_triangular_tag)
    return frozenset(out)


# Each rule is a callable `rule(tags: frozenset) -> tag | Iterable[tag] | None`,
# giving tags that the transposed operator has. Users may append rules for their
# own tags. Tags that are not triangularity tags are kept by transposition (they
# describe properties invariant under it: symmetry, definiteness, bandedness), so
# a rule only needs to add tags.
transpose_tags_rules: list[Callable[[frozenset], Any]] = [_swap_triangular]

_CHANGED_BY_TRANSPOSE = (lower_triangular_tag, upper_triangular_tag)


def as_tags(tags: Any) -> frozenset:
    """Normalise a single tag or an iterable of tags to a frozenset."""
    if isinstance(tags, frozenset):
        return tags
    if isinstance(tags, Iterable) and not isinstance(tags, (str, bytes)):
        return frozenset(tags)
    return frozenset([tags])


def transpose_tags(tags: Any) -> frozenset:
    """The tags of the transpose of an operator with tags `tags`.

    **Arguments:**

    - `tags`: a single tag or an iterable of tags.

    **Returns:**

    A frozenset of tags: lower triangular becomes upper triangular and vice versa,
    every other tag is kept, and the output of each rule of
    `lineax.transpose_tags_rules` is added.
    """
    tags = as_tags(tags)
    out = {tag for tag in tags if tag not in _CHANGED_BY_TRANSPOSE}
    for rule in transpose_tags_rules:
        new = rule(tags)
        if new is None:
            continue
        if isinstance(new, Iterable) and not isinstance(new, (str, bytes)):
            out.update(new)
        else:
            out.add(new)
    return frozenset(out)
