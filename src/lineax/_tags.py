"""Operator tags: static markers of structure that solvers dispatch on at trace
time, and `TAG_MEANINGS`, the one table of what each of lineax's tags means.

The structure predicates (`lineax.is_symmetric`, ...), their documentation, their
registrations for operators whose structure is given by tags, and the rule that
transposes tags are all generated from `TAG_MEANINGS`; a new tag is one row there
(plus its predicate's name in `_operator/base.py`).
"""

import difflib
import functools as ft
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple


class _Tag:
    """A tag singleton. Compared by identity, hashable, and with a readable repr.

    Its `__doc__` is set from `TAG_MEANINGS` (the docs site reads it from there).
    """

    def __init__(self, name: str):
        self._name = name

    def __repr__(self) -> str:
        return self._name

    def __reduce__(self) -> str:
        # Pickled (and deep-copied) as the module's global of that name: the
        # singleton itself, which tag tests compare by identity.
        return self._name


symmetric_tag = _Tag("symmetric_tag")
diagonal_tag = _Tag("diagonal_tag")
tridiagonal_tag = _Tag("tridiagonal_tag")
unit_diagonal_tag = _Tag("unit_diagonal_tag")
lower_triangular_tag = _Tag("lower_triangular_tag")
upper_triangular_tag = _Tag("upper_triangular_tag")
positive_semidefinite_tag = _Tag("positive_semidefinite_tag")
negative_semidefinite_tag = _Tag("negative_semidefinite_tag")


class TagMeaning(NamedTuple):
    """One row of `TAG_MEANINGS`."""

    predicate: str
    """The name of the `lineax` predicate that this tag makes true."""
    holds: str
    """What the predicate says of an operator, completing "Whether an operator
    ...", e.g. "is symmetric"."""
    doc: str
    """What the tag promises: the tag's documentation."""
    implies: tuple[_Tag, ...]
    """The other tags whose predicates this tag also makes true."""
    transposed: _Tag
    """The tag of the transposed operator."""


# Symmetric means `A = Aᵀ`, also for complex operators; the definite tags mean
# Hermitian, and imply `symmetric_tag`, which is exact for real operators. (For a
# complex operator with a definite tag `is_symmetric` is then true, where lineax
# 0.1.1 says false: what reads it for a complex operator, the transposition
# (`transpose_is_self`, real only), the Lanczos spectrum estimates and incomplete
# Cholesky, takes it as "symmetric or Hermitian".)
TAG_MEANINGS: dict[_Tag, TagMeaning] = {
    symmetric_tag: TagMeaning(
        predicate="is_symmetric",
        holds="is symmetric",
        doc="The operator equals its transpose.",
        implies=(),
        transposed=symmetric_tag,
    ),
    diagonal_tag: TagMeaning(
        predicate="is_diagonal",
        holds="is diagonal",
        doc="The operator is diagonal.",
        implies=(
            symmetric_tag,
            tridiagonal_tag,
            lower_triangular_tag,
            upper_triangular_tag,
        ),
        transposed=diagonal_tag,
    ),
    tridiagonal_tag: TagMeaning(
        predicate="is_tridiagonal",
        holds="is tridiagonal",
        doc="The operator is tridiagonal.",
        implies=(),
        transposed=tridiagonal_tag,
    ),
    lower_triangular_tag: TagMeaning(
        predicate="is_lower_triangular",
        holds="is lower triangular",
        doc="The operator is lower triangular.",
        implies=(),
        transposed=upper_triangular_tag,
    ),
    upper_triangular_tag: TagMeaning(
        predicate="is_upper_triangular",
        holds="is upper triangular",
        doc="The operator is upper triangular.",
        implies=(),
        transposed=lower_triangular_tag,
    ),
    positive_semidefinite_tag: TagMeaning(
        predicate="is_positive_semidefinite",
        holds="is positive semidefinite",
        doc=(
            "The operator is positive semidefinite (Hermitian, for complex "
            "operators). Solvers that need definiteness (Cholesky, CG) assume "
            "positive definite."
        ),
        implies=(symmetric_tag,),
        transposed=positive_semidefinite_tag,
    ),
    negative_semidefinite_tag: TagMeaning(
        predicate="is_negative_semidefinite",
        holds="is negative semidefinite",
        doc=(
            "The operator is negative semidefinite (Hermitian, for complex operators)."
        ),
        implies=(symmetric_tag,),
        transposed=negative_semidefinite_tag,
    ),
    unit_diagonal_tag: TagMeaning(
        predicate="has_unit_diagonal",
        holds="has a unit diagonal",
        doc=(
            "The operator's diagonal is all ones (used with the triangular tags: "
            "the diagonal is then never read)."
        ),
        implies=(),
        transposed=unit_diagonal_tag,
    ),
}

for _tag, _meaning in TAG_MEANINGS.items():
    _tag.__doc__ = _meaning.doc


@ft.cache
def tags_implying(tag: _Tag) -> tuple[_Tag, ...]:
    """`tag` and every tag of `TAG_MEANINGS` that implies it: an operator carrying
    any of them makes the predicate of `tag` true."""
    return (tag,) + tuple(
        other for other, meaning in TAG_MEANINGS.items() if tag in meaning.implies
    )


def _transpose_by_table(tags: frozenset) -> frozenset | None:
    """The transposition rule of `TAG_MEANINGS`: the tags that transposition
    changes (lower and upper triangular), replaced; None if there are none."""
    out = frozenset(
        TAG_MEANINGS[tag].transposed
        for tag in tags
        if tag in TAG_MEANINGS and TAG_MEANINGS[tag].transposed is not tag
    )
    return out or None


# Each rule is a callable `rule(tags: frozenset) -> tag | Iterable[tag] | None`,
# giving tags that the transposed operator has. Users may append rules for their
# own tags. A tag that some rule maps (when called with that tag alone) is replaced
# by what the rules give; every other tag is kept, since most structure
# (symmetry, definiteness, bandedness) is invariant under transposition.
transpose_tags_rules: list[Callable[[frozenset], Any]] = [_transpose_by_table]


def as_tags(tags: Any) -> frozenset:
    """Normalise a single tag or an iterable of tags to a frozenset.

    A string is refused: it is never one of lineax's tags, which are objects
    (`lx.symmetric_tag`), and would otherwise be accepted silently and ignored.
    """
    if isinstance(tags, frozenset):
        out = tags
    elif isinstance(tags, Iterable) and not isinstance(tags, (str, bytes)):
        tags = list(tags)
        try:
            out = frozenset(tags)
        except TypeError:
            # Python's own "unhashable type: 'list'" names neither the argument nor
            # the usual cause, a nested list or set of tags.
            bad = next(tag for tag in tags if not _is_hashable(tag))
            raise TypeError(
                "`tags` must be one tag or a flat iterable of tags (hashable "
                f"objects), but it holds the unhashable {type(bad).__name__} "
                f"{bad!r}. To combine collections of tags, unpack them: "
                "`(*tags1, *tags2)`."
            ) from None
    else:
        out = frozenset([tags])
    for tag in out:
        if isinstance(tag, (str, bytes)):
            raise TypeError(_string_tag_message(tag))
        # A tuple or frozenset holding lineax's tags, inside the iterable, would be
        # kept as one unknown tag: the operator would silently have no structure.
        if isinstance(tag, (tuple, frozenset)) and any(
            _is_hashable(t) and t in TAG_MEANINGS for t in tag
        ):
            raise TypeError(
                f"`tags` must be a flat iterable of tags, but it holds the nested "
                f"{type(tag).__name__} {tag!r}, which would be one unknown tag "
                "rather than the tags in it. Unpack it: `(*tags1, *tags2)`."
            )
    return out


def _is_hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def _string_tag_message(tag: str | bytes) -> str:
    names = [repr(known) for known in TAG_MEANINGS]
    guess = str(tag).strip().lower().replace("-", "_").replace(" ", "_")
    guess = guess.removeprefix("lineax.").removeprefix("lx.")
    if not guess.endswith("_tag"):
        guess += "_tag"
    close = difflib.get_close_matches(guess, names, n=1)
    hint = f" Did you mean `lx.{close[0]}`?" if close else ""
    listing = ", ".join(f"`lx.{name}`" for name in names)
    return (
        f"`tags` must hold tag objects, not strings: got {tag!r}.{hint} lineax's "
        f"tags are {listing}; a tag of your own may be any hashable object other "
        "than a string."
    )


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
