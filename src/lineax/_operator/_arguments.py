"""Checks of the arguments users pass to operator constructors: a clear error
naming the argument, instead of a guessed dtype or a failure deep inside JAX."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree

from .base import AbstractLinearOperator


def check_not_operator(x: Any, name: str) -> None:
    """Raise a TypeError naming `name` if `x` is a linear operator where a PyTree of
    arrays (or of `jax.ShapeDtypeStruct`s) is expected: an operator is a PyTree of
    arrays too, and was taken as the arrays it holds."""
    if isinstance(x, AbstractLinearOperator):
        raise TypeError(
            f"`{name}` must be a PyTree of arrays, got the linear operator "
            f"{type(x).__name__}. Pass what the operator stands for instead: e.g. "
            "`operator.in_structure()` (its structure), `lx.diagonal(operator)` "
            "(its diagonal) or `operator.as_matrix()` (its matrix)."
        )


def check_leaf_arrays(tree: PyTree, name: str) -> None:
    """Raise a TypeError naming `name` if `tree` has a leaf that is neither an
    array nor a Python or NumPy scalar, or if `tree` is a linear operator."""
    check_not_operator(tree, name)
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


def output_structure_of(
    fn: Callable, args: tuple, failed: str, inexact: bool = False
) -> PyTree[jax.ShapeDtypeStruct]:
    """The output structure of `fn(*args)`, from `eqx.filter_eval_shape`, for an
    operator built from the user's function `fn`. A call that fails raises a
    ValueError saying `failed` (the original error chained); an output that is
    not a PyTree of arrays (or, with `inexact=True`, of floating arrays) a
    TypeError."""
    try:
        out = eqx.filter_eval_shape(fn, *args)
    except Exception as e:
        raise ValueError(failed) from e
    if out is None:
        raise TypeError(
            "`fn` returned None: it must return its output, a PyTree of arrays "
            "(is a `return` missing?)."
        )
    for leaf in jtu.tree_leaves(out):
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            raise TypeError("`fn` must return a PyTree of arrays.")
        if inexact and not jnp.issubdtype(leaf.dtype, jnp.inexact):
            raise TypeError(
                f"`fn` returns an array of dtype {leaf.dtype}: the Jacobian of a "
                "function with integer or boolean outputs is zero, or undefined. "
                "Return floating arrays (e.g. without rounding or `astype(int)`)."
            )
    return out
