"""`IdentityLinearOperator`: the identity, possibly between two structures."""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu

from .._misc import describe, result_dtype, Static, structure_of, tree_size
from .base import (
    AbstractLinearOperator,
    conj,
    diagonal,
    flatten_vector,
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
    unflatten_vector,
)


_sentinel: Any = object()


class IdentityLinearOperator(AbstractLinearOperator):
    """The identity operator.

    The input and output structures may differ, as long as they have the same total
    size: then `mv` flattens its input and unflattens it into the output structure.

    **Arguments:**

    - `input_structure`: a PyTree of `jax.ShapeDtypeStruct`s (or of arrays).
    - `output_structure`: likewise; defaults to `input_structure`.
    """

    input_structure: Static = eqx.field(static=True)
    output_structure: Static = eqx.field(static=True)

    def __init__(self, input_structure: Any, output_structure: Any = _sentinel):
        in_struct = structure_of(input_structure, "input_structure")
        if output_structure is _sentinel:
            out_struct = in_struct
        else:
            out_struct = structure_of(output_structure, "output_structure")
        if tree_size(in_struct) != tree_size(out_struct):
            raise ValueError(
                "`input_structure` and `output_structure` must have the same total "
                f"size; got {describe(in_struct)} (size {tree_size(in_struct)}) and "
                f"{describe(out_struct)} (size {tree_size(out_struct)})."
            )
        self.input_structure = Static(in_struct)
        self.output_structure = Static(out_struct)

    def mv(self, vector):
        in_struct = self.input_structure.value
        out_struct = self.output_structure.value
        if jtu.tree_structure(in_struct) == jtu.tree_structure(out_struct) and all(
            a.shape == b.shape
            for a, b in zip(jtu.tree_leaves(in_struct), jtu.tree_leaves(out_struct))
        ):
            return jtu.tree_map(lambda x, s: x.astype(s.dtype), vector, out_struct)
        return unflatten_vector(flatten_vector(vector), out_struct, keep_dtype=True)

    def as_matrix(self):
        dtype = result_dtype(self.input_structure.value, self.output_structure.value)
        return jnp.eye(self.out_size(), self.in_size(), dtype=dtype)

    def transpose(self):
        return IdentityLinearOperator(
            self.output_structure.value, self.input_structure.value
        )

    def in_structure(self):
        return self.input_structure.value

    def out_structure(self):
        return self.output_structure.value


def _is_square_structure(op: IdentityLinearOperator) -> bool:
    return op.in_size() == op.out_size()


for _pred in (
    is_symmetric,
    is_diagonal,
    is_tridiagonal,
    is_lower_triangular,
    is_upper_triangular,
    is_positive_semidefinite,
    has_unit_diagonal,
):
    _pred.register(IdentityLinearOperator)(lambda op: True)
is_negative_semidefinite.register(IdentityLinearOperator)(lambda op: False)


@diagonal.register(IdentityLinearOperator)
def _(operator):
    dtype = result_dtype(
        operator.input_structure.value, operator.output_structure.value
    )
    return jnp.ones(operator.in_size(), dtype)


@tridiagonal.register(IdentityLinearOperator)
def _(operator):
    dtype = result_dtype(
        operator.input_structure.value, operator.output_structure.value
    )
    n = operator.in_size()
    return jnp.ones(n, dtype), jnp.zeros(n - 1, dtype), jnp.zeros(n - 1, dtype)


@conj.register(IdentityLinearOperator)
@materialise.register(IdentityLinearOperator)
@linearise.register(IdentityLinearOperator)
def _(operator):
    return operator


# Appended rather than imported at the top, to keep this change apart from others
# in this file; move it up when convenient.
from .base import concrete_arrays, is_cacheable


is_cacheable.register(IdentityLinearOperator)(concrete_arrays)
