"""`KroneckerLinearOperator`: the Kronecker product `A ⊗ B ⊗ ...` of operators,
applied by reshaping (the product is never formed)."""

import functools as ft
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from .._misc import describe, result_dtype
from .base import (
    AbstractLinearOperator,
    conj,
    diagonal,
    flatten_vector,
    has_cheap_diagonal,
    has_unit_diagonal,
    holds_values,
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
    reads_every_leaf,
    register_scaled,
    scaled,
    unflatten_vector,
)


def apply_along_axis(
    fn: Any, x: Array, axis: int, out_size: int, has_aux: bool = False
) -> Any:
    """Apply `fn`, a map of flat vectors, along one axis of `x`, batched over the
    others: `(..., n, ...) -> (..., out_size, ...)`. With `has_aux`, `fn` returns
    `(out, aux)` and the batched `aux` is returned too.

    Shared by the product's `mv` (with a factor's `mv`) and the Kronecker solve
    (with a factor's solve).
    """
    moved = jnp.moveaxis(x, axis, -1)
    batch_shape = moved.shape[:-1]
    # (The batch size written out: `-1` is ambiguous when a dimension is 0.)
    flat = moved.reshape(math.prod(batch_shape), moved.shape[-1])
    out = jax.vmap(fn)(flat)
    out, aux = out if has_aux else (out, None)
    out = jnp.moveaxis(out.reshape(batch_shape + (out_size,)), -1, axis)
    return (out, aux) if has_aux else out


def flat_mv(operator: AbstractLinearOperator, x: Any) -> Any:
    """`operator.mv` on a flat vector, whatever the operator's structures."""
    vector = unflatten_vector(x, operator.in_structure(), keep_dtype=True)
    return flatten_vector(operator.mv(vector), x.dtype)


class KroneckerLinearOperator(AbstractLinearOperator):
    """The Kronecker product `A ⊗ B ⊗ ...` of two or more operators, acting on 1-D
    vectors.

    The product of an `m₁×n₁` and an `m₂×n₂` operator is an `m₁m₂ × n₁n₂`
    operator. `mv` reshapes the vector to `(n₁, n₂, ...)` and applies each factor
    along its own axis (row-major, as `numpy.kron`), so it costs
    `O(n₁n₂(m₁ + m₂))` for dense factors, and the product is never formed.

    Structure follows from the factors: the product of symmetric, diagonal,
    triangular or positive semidefinite factors is so too. Solve it with
    [`lineax.Kronecker`][] (which [`lineax.AutoLinearSolver`][] picks): one
    factorisation per factor.

    **Arguments:**

    - `*operators`: two or more linear operators, all of one dtype. A factor may
        have PyTree-valued input and output (its flattened matrix is used).
    """

    operators: tuple[AbstractLinearOperator, ...]

    def __init__(self, *operators: AbstractLinearOperator):
        if len(operators) == 1 and isinstance(operators[0], (list, tuple)):
            raise TypeError(
                "`KroneckerLinearOperator` takes its factors as separate arguments, "
                f"got one {type(operators[0]).__name__}: write "
                "`lx.KroneckerLinearOperator(*operators)`."
            )
        if len(operators) < 2:
            raise ValueError(
                "`KroneckerLinearOperator` needs at least two operators, got "
                f"{len(operators)}."
            )
        for i, op in enumerate(operators):
            if not isinstance(op, AbstractLinearOperator):
                raise TypeError(
                    f"`operators[{i}]` must be a `lineax.AbstractLinearOperator` "
                    f"(e.g. `lx.MatrixLinearOperator(a)`), got {type(op).__name__}."
                )
        dtypes = [
            result_dtype(op.in_structure(), op.out_structure()) for op in operators
        ]
        if len(set(dtypes)) != 1:
            structures = ", ".join(describe(op.in_structure()) for op in operators)
            raise ValueError(
                "The factors of a `KroneckerLinearOperator` must have one dtype; got "
                f"factors with inputs {structures}. Cast them first (e.g. "
                "`lx.MatrixLinearOperator(a.astype(jnp.complex128))`)."
            )
        self.operators = tuple(operators)

    def _dtype(self):
        op = self.operators[0]
        return result_dtype(op.in_structure(), op.out_structure())

    def mv(self, vector):
        sizes = tuple(op.in_size() for op in self.operators)
        if jnp.shape(vector) != (math.prod(sizes),):
            # (A vector of the wrong shape but the right size, such as a matrix
            # `(n₁, n₂)`, was reshaped and multiplied silently.)
            raise ValueError(
                f"`vector` has shape {jnp.shape(vector)}, but this "
                "`KroneckerLinearOperator` takes vectors of shape "
                f"{(math.prod(sizes),)}."
            )
        x = jnp.asarray(vector).reshape(sizes)
        for axis, op in enumerate(self.operators):
            x = apply_along_axis(ft.partial(flat_mv, op), x, axis, op.out_size())
        return x.reshape(-1)

    def as_matrix(self):
        matrix = self.operators[0].as_matrix()
        for op in self.operators[1:]:
            matrix = jnp.kron(matrix, op.as_matrix())
        return matrix

    def transpose(self):
        return KroneckerLinearOperator(*(op.transpose() for op in self.operators))

    def in_structure(self):
        size = int(np.prod([op.in_size() for op in self.operators]))
        return jax.ShapeDtypeStruct((size,), self._dtype())

    def out_structure(self):
        size = int(np.prod([op.out_size() for op in self.operators]))
        return jax.ShapeDtypeStruct((size,), self._dtype())


def _all(predicate):
    return lambda op: all(predicate(factor) for factor in op.operators)


def _square(op: KroneckerLinearOperator) -> bool:
    return all(f.in_size() == f.out_size() for f in op.operators)


# The Kronecker product of matrices of one kind (symmetric, diagonal, lower or
# upper triangular, positive semidefinite) is of that kind (Horn and Johnson,
# "Topics in Matrix Analysis", section 4.2).
for _pred in (
    is_symmetric,
    is_diagonal,
    is_lower_triangular,
    is_upper_triangular,
    is_positive_semidefinite,
):
    _pred.register(KroneckerLinearOperator)(
        lambda op, p=_pred: _square(op) and _all(p)(op)
    )


@is_negative_semidefinite.register(KroneckerLinearOperator)
def _(operator):
    # Eigenvalues multiply: exactly one negative semidefinite factor, the rest
    # positive semidefinite.
    negative = [is_negative_semidefinite(f) for f in operator.operators]
    positive = [is_positive_semidefinite(f) for f in operator.operators]
    return (
        _square(operator)
        and sum(negative) == 1
        and all(n or p for n, p in zip(negative, positive))
    )


@is_tridiagonal.register(KroneckerLinearOperator)
def _(operator):
    # `D ⊗ T` is block diagonal with tridiagonal blocks; `T ⊗ D` puts the bands
    # `size(D)` apart, which is not tridiagonal.
    *leading, last = operator.operators
    return (
        _square(operator)
        and all(is_diagonal(f) for f in leading)
        and is_tridiagonal(last)
    )


@has_unit_diagonal.register(KroneckerLinearOperator)
def _(operator):
    return _square(operator) and _all(has_unit_diagonal)(operator)


@diagonal.register(KroneckerLinearOperator)
def _(operator):
    if not _square(operator):
        return jnp.diagonal(operator.as_matrix())
    out = diagonal(operator.operators[0])
    for op in operator.operators[1:]:
        out = jnp.kron(out, diagonal(op))
    return out


@register_scaled(KroneckerLinearOperator)
def _(operator, kind, scalar=None):
    # `s (A ⊗ B) = (s A) ⊗ B`: a Kronecker product still, solved factor by factor.
    first, *rest = operator.operators
    return KroneckerLinearOperator(scaled(first, kind, scalar), *rest)


@materialise.register(KroneckerLinearOperator)
def _(operator):
    return KroneckerLinearOperator(*(materialise(op) for op in operator.operators))


@linearise.register(KroneckerLinearOperator)
def _(operator):
    return KroneckerLinearOperator(*(linearise(op) for op in operator.operators))


@conj.register(KroneckerLinearOperator)
def _(operator):
    return KroneckerLinearOperator(*(conj(op) for op in operator.operators))


is_cacheable.register(KroneckerLinearOperator)(_all(is_cacheable))
reads_every_leaf.register(KroneckerLinearOperator)(_all(reads_every_leaf))
holds_values.register(KroneckerLinearOperator)(_all(holds_values))


@has_cheap_diagonal.register(KroneckerLinearOperator)
def _(operator):
    # The diagonal of square factors is the Kronecker product of theirs; otherwise
    # it is read from the matrix.
    if _square(operator):
        return _all(has_cheap_diagonal)(operator)
    return holds_values(operator)
