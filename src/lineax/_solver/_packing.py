"""Ravel PyTree vectors to flat arrays for the matrix-based solvers, and back."""

import equinox as eqx
import jax
from jaxtyping import Array, PyTree

from .._misc import result_dtype, Static
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
    array, in PyTree-leaf order, as matches `operator.as_matrix()`'s rows."""
    del packed_structures
    return flatten_vector(pytree, result_dtype(pytree))


def unravel_solution(
    solution: Array, packed_structures: PackedStructures
) -> PyTree[Array]:
    """Split a 1-D solution into a PyTree with the operator's input structure."""
    return unflatten_vector(solution, packed_structures.in_structure)


def transpose_packed_structures(
    packed_structures: PackedStructures,
) -> PackedStructures:
    """The packed structures of the transposed operator (input and output swapped)."""
    return PackedStructures(
        packed_structures.out_structure, packed_structures.in_structure
    )
