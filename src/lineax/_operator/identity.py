"""`IdentityLinearOperator`: the identity, possibly between two structures."""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu

from .._misc import cast_keeping_real, describe, result_dtype, Static, structure_of
from ._arguments import check_not_operator
from .base import (
    AbstractLinearOperator,
    concrete_arrays,
    conj,
    diagonal,
    flatten_vector,
    has_unit_diagonal,
    is_cacheable,
    is_diagonal,
    is_lower_triangular,
    is_negative_semidefinite,
    is_positive_semidefinite,
    is_symmetric,
    is_tridiagonal,
    is_upper_triangular,
    linearise,
    materialise,
    register_stored,
    shape_mismatch,
    tridiagonal,
    unflatten_vector,
)


_sentinel: Any = object()


class IdentityLinearOperator(AbstractLinearOperator):
    """The identity operator, possibly between two different structures.

    `mv` flattens its input (in PyTree-leaf order) and unflattens it into the
    output structure, cast to its dtypes. If the two structures have different
    total sizes this is the rectangular identity, `as_matrix()` being
    `eye(out_size, in_size)`: the flattened input is truncated, or padded with
    zeros.

    **Arguments:**

    - `input_structure`: a PyTree of `jax.ShapeDtypeStruct`s (or of arrays).
    - `output_structure`: likewise; defaults to `input_structure`.
    """

    input_structure: Static = eqx.field(static=True)
    output_structure: Static = eqx.field(static=True)

    def __init__(self, input_structure: Any, output_structure: Any = _sentinel):
        check_not_operator(input_structure, "input_structure")
        in_struct = structure_of(input_structure, "input_structure")
        if output_structure is _sentinel:
            out_struct = in_struct
        else:
            check_not_operator(output_structure, "output_structure")
            out_struct = structure_of(output_structure, "output_structure")
        self.input_structure = Static(in_struct)
        self.output_structure = Static(out_struct)

    def mv(self, vector):
        in_struct = self.input_structure.value
        out_struct = self.output_structure.value
        mismatch = shape_mismatch(vector, in_struct)
        if mismatch is not None:
            # (As lineax 0.1.1 does. Without it a vector of another shape was
            # returned as it was, or flattened and cut or padded to the output's
            # size: a wrong product, no error. Dtypes are cast, not checked.)
            raise ValueError(
                "`vector` must have the input structure of this "
                f"`IdentityLinearOperator`, {describe(in_struct)}; got {mismatch}."
            )
        if jtu.tree_structure(in_struct) == jtu.tree_structure(out_struct) and all(
            a.shape == b.shape
            for a, b in zip(jtu.tree_leaves(in_struct), jtu.tree_leaves(out_struct))
        ):
            return jtu.tree_map(_cast, vector, out_struct)
        flat = flatten_vector(vector, result_dtype(vector))
        in_size, out_size = self.in_size(), self.out_size()
        if out_size < in_size:
            flat = flat[:out_size]
        elif out_size > in_size:
            flat = jnp.concatenate([flat, jnp.zeros(out_size - in_size, flat.dtype)])
        out = unflatten_vector(flat, out_struct)
        return jtu.tree_map(_cast, out, out_struct)

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


def _cast(x: Any, s: Any) -> Any:
    # From a complex to a real structure the identity keeps the real part (as
    # lineax 0.1.1 did).
    return cast_keeping_real(x, s.dtype)


def _is_square(op: IdentityLinearOperator) -> bool:
    return op.in_size() == op.out_size()


# The rectangular identity `eye(m, n)` is diagonal, triangular and has a unit
# diagonal, but is symmetric or definite only when square.
for _pred in (
    is_diagonal,
    is_tridiagonal,
    is_lower_triangular,
    is_upper_triangular,
    has_unit_diagonal,
):
    _pred.register(IdentityLinearOperator)(lambda op: True)
for _pred in (is_symmetric, is_positive_semidefinite):
    _pred.register(IdentityLinearOperator)(_is_square)
is_negative_semidefinite.register(IdentityLinearOperator)(lambda op: False)


def _dtype(operator: IdentityLinearOperator) -> Any:
    return result_dtype(operator.input_structure.value, operator.output_structure.value)


@diagonal.register(IdentityLinearOperator)
def _(operator):
    return jnp.ones(min(operator.in_size(), operator.out_size()), _dtype(operator))


@tridiagonal.register(IdentityLinearOperator)
def _(operator):
    dtype = _dtype(operator)
    n = min(operator.in_size(), operator.out_size())
    return jnp.ones(n, dtype), jnp.zeros(n - 1, dtype), jnp.zeros(n - 1, dtype)


@conj.register(IdentityLinearOperator)
@materialise.register(IdentityLinearOperator)
@linearise.register(IdentityLinearOperator)
def _(operator):
    return operator


is_cacheable.register(IdentityLinearOperator)(concrete_arrays)
register_stored(IdentityLinearOperator)
