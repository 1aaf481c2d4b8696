"""Ravel PyTree vectors to flat arrays for the matrix-based solvers, and back."""

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from .._misc import describe, result_dtype, Static
from .._operator.base import AbstractLinearOperator, flatten_vector, unflatten_vector


class PackedStructures(eqx.Module):
    """The input and output structures of an operator, held statically, so that a
    solver state can record how to ravel right-hand sides and unravel solutions."""

    _structures: Static = eqx.field(static=True)

    def __init__(
        self,
        in_structure: PyTree[jax.ShapeDtypeStruct],
        out_structure: PyTree[jax.ShapeDtypeStruct],
    ):
        self._structures = Static((in_structure, out_structure))

    @property
    def in_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        return self._structures.value[0]

    @property
    def out_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        return self._structures.value[1]


def pack_structures(operator: AbstractLinearOperator) -> PackedStructures:
    """The input and output structures of `operator`, packed for
    `ravel_vector`/`unravel_solution`."""
    return PackedStructures(operator.in_structure(), operator.out_structure())


def ravel_vector(pytree: PyTree[Array], packed_structures: PackedStructures) -> Array:
    """Flatten a right-hand side (with the operator's output structure) to a 1-D
    array, in PyTree-leaf order, as matches `operator.as_matrix()`'s rows.

    Raises a ValueError if `pytree` has another PyTree structure or other shapes
    than that output structure (its dtypes may differ: the result has theirs)."""
    expected = packed_structures.out_structure
    leaves, treedef = jtu.tree_flatten(pytree)
    if treedef != jtu.tree_structure(expected) or any(
        jnp.shape(x) != s.shape for x, s in zip(leaves, jtu.tree_leaves(expected))
    ):
        raise ValueError(
            "The vector to ravel must have the output structure of the operator "
            f"whose structures were packed, {describe(expected)}; got "
            f"{describe(jtu.tree_map(_shape_struct, pytree))}."
        )
    return flatten_vector(pytree, result_dtype(pytree))


def _shape_struct(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x))


def unravel_solution(
    solution: Array, packed_structures: PackedStructures
) -> PyTree[Array]:
    """Split a 1-D solution into a PyTree with the operator's input structure."""
    structure = packed_structures.in_structure
    size = sum(math.prod(s.shape) for s in jtu.tree_leaves(structure))
    if jnp.shape(solution) != (size,):
        raise ValueError(
            f"The solution to unravel must be a 1-D array of the operator's input "
            f"size {size} (its input structure is {describe(structure)}); got shape "
            f"{jnp.shape(solution)}."
        )
    return unflatten_vector(solution, structure)


def transpose_packed_structures(
    packed_structures: PackedStructures,
) -> PackedStructures:
    """The packed structures of the transposed operator (input and output swapped)."""
    return PackedStructures(
        packed_structures.out_structure, packed_structures.in_structure
    )
