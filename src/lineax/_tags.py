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


def _swap_triangular(tags: frozenset) -> frozenset | None:
    out = set()
    if lower_triangular_tag in tags:
        out.add(upper_triangular_tag)
    if upper_triangular_tag in tags:
        out.add(lower_triangular_tag)
    return frozenset(out) if out else None


# Each rule is a callable `rule(tags: frozenset) -> tag | Iterable[tag] | None`,
# giving tags that the transposed operator has. Users may append rules for their
# own tags. A tag that some rule maps (when called with that tag alone) is replaced
# by what the rules give; every other tag is kept, since most structure
# (symmetry, definiteness, bandedness) is invariant under transposition.
transpose_tags_rules: list[Callable[[frozenset], Any]] = [_swap_triangular]


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
    a tag mapped by a rule of `lineax.transpose_tags_rules` is replaced by the
    rule's output, and every other tag is kept.
    """
    tags = as_tags(tags)
    out: set = set()
    for tag in tags:
        replaced = _apply_rules(frozenset([tag]))
        if replaced is None:
            out.add(tag)
        else:
            out.update(replaced)
    # Rules may also look at combinations of tags.
    out.update(_apply_rules(tags) or ())
    return frozenset(out)


def _apply_rules(tags: frozenset) -> set | None:
    """The union of the rules' outputs, or None if no rule applied."""
    out = None
    for rule in transpose_tags_rules:
        new = rule(tags)
        if new is None:
            continue
        out = set() if out is None else out
        if isinstance(new, Iterable) and not isinstance(new, (str, bytes)):
            out.update(new)
        else:
            out.add(new)
    return out
