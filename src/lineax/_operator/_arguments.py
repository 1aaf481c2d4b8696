"""Checks of the arguments users pass to operator constructors: a clear error
naming the argument, instead of a guessed dtype or a failure deep inside JAX."""

from typing import Any

import equinox as eqx
import jax.tree_util as jtu
from jaxtyping import PyTree


def check_leaf_arrays(tree: PyTree, name: str) -> None:
    """Raise a TypeError naming `name` if `tree` has a leaf that is neither an
    array nor a Python or NumPy scalar."""
    for leaf in jtu.tree_leaves(tree):
        if not eqx.is_array_like(leaf):
            raise TypeError(
                f"`{name}` must be a PyTree of JAX/NumPy arrays or scalars, but it "
                f"has a leaf of type {type(leaf).__name__}: {leaf!r}."
            )


def check_not_number_sequence(x: Any, name: str) -> None:
    """Raise a TypeError naming `name` if `x` is a Python list or tuple of Python
    numbers only: where one array or a PyTree of arrays is expected, that is almost
    surely meant as one array (whose dtype would be a guess), not as a PyTree of
    scalars."""
    if (
        isinstance(x, (list, tuple))
        and len(x) > 0
        and all(isinstance(v, (bool, int, float, complex)) for v in x)
    ):
        raise TypeError(
            f"`{name}` is a Python {type(x).__name__} of numbers, which is a PyTree "
            "of scalars rather than an array: convert it first with "
            f"`jnp.asarray({name})` (choosing its dtype)."
        )


def check_not_sequence(x: Any, name: str) -> None:
    """Raise a TypeError naming `name` if `x` is a Python list or tuple where one
    array is expected: lineax does not guess the dtype of nested sequences."""
    if isinstance(x, (list, tuple)):
        raise TypeError(
            f"`{name}` must be an array, got a Python {type(x).__name__}; convert it "
            f"first with `jnp.asarray({name})` (or `np.asarray`), choosing its dtype."
        )
