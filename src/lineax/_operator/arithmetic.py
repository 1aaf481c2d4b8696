"""Sums, scalings, negations and compositions of operators."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from .._misc import complex_into_real
from .base import (
    AbstractLinearOperator,
    check_operator,
    check_structures_equal,
    concrete_arrays,
    conj,
    diagonal,
    has_cheap_diagonal,
    has_unit_diagonal,
    holds_values,
    is_cacheable,
    is_diagonal,
    is_lower_triangular,
    is_negative_semidefinite,
    is_one_by_one,
    is_positive_semidefinite,
    is_symmetric,
    is_tridiagonal,
    is_upper_triangular,
    linearise,
    materialise,
    matrix_is_stored,
    PYTHON_NUMBERS,
    reads_every_leaf,
    scaled_dtype,
    tridiagonal,
)


def _check_scalar(scalar: Any) -> None:
    if isinstance(scalar, AbstractLinearOperator):
        raise TypeError("`scalar` must be a scalar, not an operator.")
    if isinstance(scalar, (bool, int, float, complex)):
        return
    if not eqx.is_array_like(scalar) or isinstance(scalar, (str, bytes)):
        raise TypeError(
            "`scalar` must be a number or a 0-d array, got "
            f"{type(scalar).__name__}: {scalar!r}."
        )
    if jnp.ndim(scalar) != 0:
        raise ValueError(
            f"`scalar` must be a scalar (0-d array), but has shape {jnp.shape(scalar)}."
        )


def _scale(tree, scalar, op):
    """Apply `op(leaf, scalar)` to each leaf, promoting dtypes explicitly (so that
    strict dtype promotion is respected, and a complex scalar is never cast to a
    real dtype) and as JAX would: a weakly typed scalar keeps the leaf's precision
    (see `scaled_dtype`)."""
    if type(scalar) in (int, float):
        # (A complex number promotes a real leaf, and JAX types a NumPy scalar such
        # as `np.float64(2.0)` strongly, which strict promotion refuses implicitly:
        # those are cast below.)
        return jtu.tree_map(lambda x: op(x, scalar), tree)

    def leaf(x):
        dtype = scaled_dtype(x.dtype, scalar)
        return op(x.astype(dtype), jnp.asarray(scalar).astype(dtype))

    return jtu.tree_map(leaf, tree)


def _scaled_structure(structure, scalar):
    """The structure of an operator scaled by `scalar`: each leaf's dtype as the
    scaling promotes it (see `scaled_dtype`). A complex scalar makes a real operator
    complex on both sides: its `mv` returns complex values, and a solver reads from
    the structures whether to conjugate (`lx.Normal`'s `Aᴴ A`) and of what dtype its
    iterates are."""
    return jtu.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, scaled_dtype(s.dtype, scalar)),
        structure,
    )


def _scaled_mv(operator: AbstractLinearOperator, vector):
    """`operator.mv(vector)` for a vector of the scaled structure, whose dtypes may be
    wider than the operator's own: a complex vector for a real operator is applied
    by parts (`A (x + iy) = A x + i A y`), and a wider real one cast down."""
    structure = operator.in_structure()

    def cast(tree):
        return jtu.tree_map(
            lambda x, s: x if x.dtype == s.dtype else x.astype(s.dtype), tree, structure
        )

    by_parts = any(
        complex_into_real(x, s.dtype)
        for x, s in zip(jtu.tree_leaves(vector), jtu.tree_leaves(structure))
    )
    if not by_parts:
        return operator.mv(cast(vector))
    real = operator.mv(cast(jtu.tree_map(jnp.real, vector)))
    imag = operator.mv(cast(jtu.tree_map(jnp.imag, vector)))

    def combine(a, b):
        # (A leaf of a mixed-dtype operator may be complex already.)
        dtype = np.promote_types(a.dtype, np.complex64)
        return a.astype(dtype) + 1j * b.astype(dtype)

    return jtu.tree_map(combine, real, imag)


def _check_addable(structure1, structure2, what: str) -> None:
    """Raise a ValueError saying `what` unless the structures are equal up to
    real versus complex dtypes of one precision (a real operator plus
    `operator * 1j`, which lineax 0.1.1 solved as complex); other dtype
    mismatches stay errors, as there."""

    def real_parts(structure):
        return jtu.tree_map(
            lambda s: jax.ShapeDtypeStruct(
                s.shape,
                jnp.finfo(s.dtype).dtype
                if jnp.issubdtype(s.dtype, jnp.inexact)
                else s.dtype,
            ),
            structure,
        )

    if real_parts(structure1) != real_parts(structure2):
        check_structures_equal(structure1, structure2, what)  # (raises)


def _promoted_structure(structure1, structure2):
    """The structure of the sum of operators of these structures (equal up to real
    versus complex, see `_check_addable`): each leaf's dtype promoted, as adding
    their outputs promotes it."""
    if structure1 == structure2:
        return structure1
    return jtu.tree_map(
        lambda s1, s2: jax.ShapeDtypeStruct(s1.shape, _promote(s1.dtype, s2.dtype)),
        structure1,
        structure2,
    )


def _promote(dtype1, dtype2) -> np.dtype:
    # Standard promotion, decided here and cast to explicitly, which strict
    # promotion allows (it refuses real with complex implicitly).
    with jax.numpy_dtype_promotion("standard"):
        return np.dtype(jnp.promote_types(dtype1, dtype2))


def _add(a: Any, b: Any) -> Any:
    # Promoted explicitly where the dtypes differ: strict dtype promotion refuses
    # real + complex.
    if a.dtype != b.dtype:
        dtype = _promote(a.dtype, b.dtype)
        a, b = a.astype(dtype), b.astype(dtype)
    return a + b


class AddLinearOperator(AbstractLinearOperator):
    """The sum of two operators with the same input and output structures; made by
    `operator1 + operator2`. A real and a complex dtype of one precision may meet
    (`A + B * 1j`, with `A`, `B` real): the sum is complex.

    **Arguments:**

    - `operator1`, `operator2`: linear operators.
    """

    operator1: AbstractLinearOperator
    operator2: AbstractLinearOperator

    def __check_init__(self):
        check_operator(self.operator1, "operator1")
        check_operator(self.operator2, "operator2")
        # A real and a complex dtype of one precision may meet (a real operator
        # plus `operator * 1j`): the sum is complex.
        _check_addable(
            self.operator1.in_structure(),
            self.operator2.in_structure(),
            "Cannot add operators with different input structures",
        )
        _check_addable(
            self.operator1.out_structure(),
            self.operator2.out_structure(),
            "Cannot add operators with different output structures",
        )

    def mv(self, vector):
        return jtu.tree_map(
            _add, _scaled_mv(self.operator1, vector), _scaled_mv(self.operator2, vector)
        )

    def as_matrix(self):
        return _add(self.operator1.as_matrix(), self.operator2.as_matrix())

    def transpose(self):
        return AddLinearOperator(self.operator1.transpose(), self.operator2.transpose())

    def in_structure(self):
        return _promoted_structure(
            self.operator1.in_structure(), self.operator2.in_structure()
        )

    def out_structure(self):
        return _promoted_structure(
            self.operator1.out_structure(), self.operator2.out_structure()
        )


class MulLinearOperator(AbstractLinearOperator):
    """An operator multiplied by a scalar; made by `operator * scalar` or
    `scalar * operator`.

    **Arguments:**

    - `operator`: a linear operator.
    - `scalar`: a scalar array, or a Python number (kept static).
    """

    operator: AbstractLinearOperator
    scalar: Any

    def __check_init__(self):
        check_operator(self.operator, "operator")
        _check_scalar(self.scalar)

    def mv(self, vector):
        out = _scaled_mv(self.operator, vector)
        return _scale(out, self.scalar, lambda x, s: x * s)

    def as_matrix(self):
        matrix = self.operator.as_matrix()
        return _scale(matrix, self.scalar, lambda x, s: x * s)

    def transpose(self):
        return MulLinearOperator(self.operator.transpose(), self.scalar)

    def in_structure(self):
        return _scaled_structure(self.operator.in_structure(), self.scalar)

    def out_structure(self):
        return _scaled_structure(self.operator.out_structure(), self.scalar)


class DivLinearOperator(AbstractLinearOperator):
    """An operator divided by a scalar; made by `operator / scalar`.

    **Arguments:**

    - `operator`: a linear operator.
    - `scalar`: a scalar array, or a Python number (kept static).
    """

    operator: AbstractLinearOperator
    scalar: Any

    def __check_init__(self):
        check_operator(self.operator, "operator")
        _check_scalar(self.scalar)

    def mv(self, vector):
        out = _scaled_mv(self.operator, vector)
        return _scale(out, self.scalar, lambda x, s: x / s)

    def as_matrix(self):
        return _scale(self.operator.as_matrix(), self.scalar, lambda x, s: x / s)

    def transpose(self):
        return DivLinearOperator(self.operator.transpose(), self.scalar)

    def in_structure(self):
        return _scaled_structure(self.operator.in_structure(), self.scalar)

    def out_structure(self):
        return _scaled_structure(self.operator.out_structure(), self.scalar)


class NegLinearOperator(AbstractLinearOperator):
    """The negation of an operator; made by `-operator`.

    **Arguments:**

    - `operator`: a linear operator.
    """

    operator: AbstractLinearOperator

    def __check_init__(self):
        check_operator(self.operator, "operator")

    def mv(self, vector):
        return jtu.tree_map(jnp.negative, self.operator.mv(vector))

    def as_matrix(self):
        return -self.operator.as_matrix()

    def transpose(self):
        return NegLinearOperator(self.operator.transpose())

    def in_structure(self):
        return self.operator.in_structure()

    def out_structure(self):
        return self.operator.out_structure()


class ComposedLinearOperator(AbstractLinearOperator):
    """The composition `operator1 @ operator2`: `mv(x) = operator1.mv(operator2.mv(x))`.

    **Arguments:**

    - `operator1`: applied second; its input structure must equal the output
        structure of `operator2`.
    - `operator2`: applied first.
    """

    operator1: AbstractLinearOperator
    operator2: AbstractLinearOperator

    def __check_init__(self):
        check_operator(self.operator1, "operator1")
        check_operator(self.operator2, "operator2")
        check_structures_equal(
            self.operator1.in_structure(),
            self.operator2.out_structure(),
            "Cannot compose `operator1 @ operator2`: the input structure of "
            "`operator1` must equal the output structure of `operator2`",
        )

    def mv(self, vector):
        return self.operator1.mv(self.operator2.mv(vector))

    def as_matrix(self):
        return jnp.matmul(
            self.operator1.as_matrix(),
            self.operator2.as_matrix(),
            precision=jax.lax.Precision.HIGHEST,
        )

    def transpose(self):
        return ComposedLinearOperator(
            self.operator2.transpose(), self.operator1.transpose()
        )

    def in_structure(self):
        return self.operator2.in_structure()

    def out_structure(self):
        return self.operator1.out_structure()


#
# Structure of the results of arithmetic, decided from the parts.
#


def _both(pred):
    return lambda op: pred(op.operator1) and pred(op.operator2)


for _pred in (
    is_symmetric,
    is_diagonal,
    is_tridiagonal,
    is_lower_triangular,
    is_upper_triangular,
    is_positive_semidefinite,
    is_negative_semidefinite,
):
    _pred.register(AddLinearOperator)(_both(_pred))
has_unit_diagonal.register(AddLinearOperator)(lambda op: False)

# Scaling keeps sparsity patterns and symmetry; definiteness depends on the sign
# of the scalar, unknown at trace time (unless it is a static Python number).
for _cls in (MulLinearOperator, DivLinearOperator):
    for _pred in (
        is_symmetric,
        is_diagonal,
        is_tridiagonal,
        is_lower_triangular,
        is_upper_triangular,
    ):
        _pred.register(_cls)(lambda op, p=_pred: p(op.operator))
    has_unit_diagonal.register(_cls)(lambda op: False)


def _static_sign(scalar: Any) -> int:
    # Only a Python number is static (a NumPy scalar is an array leaf, traced in
    # the solve, as in `_scale`). `np.float64`, a `float` subclass, passed an
    # `isinstance` test here and gave NumPy bools, whose `-` raised a TypeError.
    if type(scalar) in (int, float):
        return (scalar > 0) - (scalar < 0)
    return 0


for _cls in (MulLinearOperator, DivLinearOperator):
    is_positive_semidefinite.register(_cls)(
        lambda op: (
            (_static_sign(op.scalar) > 0 and is_positive_semidefinite(op.operator))
            or (_static_sign(op.scalar) < 0 and is_negative_semidefinite(op.operator))
        )
    )
    is_negative_semidefinite.register(_cls)(
        lambda op: (
            (_static_sign(op.scalar) > 0 and is_negative_semidefinite(op.operator))
            or (_static_sign(op.scalar) < 0 and is_positive_semidefinite(op.operator))
        )
    )

for _pred in (
    is_symmetric,
    is_diagonal,
    is_tridiagonal,
    is_lower_triangular,
    is_upper_triangular,
):
    _pred.register(NegLinearOperator)(lambda op, p=_pred: p(op.operator))
is_positive_semidefinite.register(NegLinearOperator)(
    lambda op: is_negative_semidefinite(op.operator)
)
is_negative_semidefinite.register(NegLinearOperator)(
    lambda op: is_positive_semidefinite(op.operator)
)
has_unit_diagonal.register(NegLinearOperator)(lambda op: False)

# Products of diagonal/triangular matrices of the same kind keep that kind.
for _pred in (is_lower_triangular, is_upper_triangular):
    _pred.register(ComposedLinearOperator)(_both(_pred))
# A 1x1 product (`(1, k) @ (k, 1)`) is diagonal whatever its factors.
is_diagonal.register(ComposedLinearOperator)(
    lambda op: _both(is_diagonal)(op) or is_one_by_one(op)
)
# A product of unit-diagonal matrices has a unit diagonal only if both are
# triangular of the same kind (or diagonal), and only where the inner dimension
# reaches: entry `i` of the diagonal of the `m×k` times `k×n` product is
# `L₁[i, i] L₂[i, i]` for `i < k`, and zero beyond. (`eye(5, 3) @ eye(3, 5)` is
# `diag(1, 1, 1, 0, 0)`: claimed unit diagonal, a singular product was solved
# by `lx.Triangular` as if its diagonal were ones.)
has_unit_diagonal.register(ComposedLinearOperator)(
    lambda op: (
        _both(has_unit_diagonal)(op)
        and (_both(is_lower_triangular)(op) or _both(is_upper_triangular)(op))
        and op.operator1.in_size() >= min(op.out_size(), op.in_size())
    )
)
is_tridiagonal.register(ComposedLinearOperator)(
    lambda op: (
        (is_diagonal(op.operator1) and is_tridiagonal(op.operator2))
        or (is_tridiagonal(op.operator1) and is_diagonal(op.operator2))
    )
)
# (Square only: a rectangular identity or diagonal composed with a diagonal is
# diagonal, not symmetric.)
is_symmetric.register(ComposedLinearOperator)(
    lambda op: (
        is_diagonal(op.operator1)
        and is_diagonal(op.operator2)
        and op.in_size() == op.out_size()
    )
)
for _pred in (is_positive_semidefinite, is_negative_semidefinite):
    _pred.register(ComposedLinearOperator)(lambda op: False)


@materialise.register(AddLinearOperator)
@materialise.register(ComposedLinearOperator)
def _(operator):
    return type(operator)(
        materialise(operator.operator1), materialise(operator.operator2)
    )


@linearise.register(AddLinearOperator)
@linearise.register(ComposedLinearOperator)
def _(operator):
    return type(operator)(linearise(operator.operator1), linearise(operator.operator2))


@conj.register(AddLinearOperator)
@conj.register(ComposedLinearOperator)
def _(operator):
    return type(operator)(conj(operator.operator1), conj(operator.operator2))


@materialise.register(MulLinearOperator)
@materialise.register(DivLinearOperator)
def _(operator):
    return type(operator)(materialise(operator.operator), operator.scalar)


@linearise.register(MulLinearOperator)
@linearise.register(DivLinearOperator)
def _(operator):
    return type(operator)(linearise(operator.operator), operator.scalar)


@conj.register(MulLinearOperator)
@conj.register(DivLinearOperator)
def _(operator):
    scalar = operator.scalar
    if not isinstance(scalar, (int, float)):
        scalar = jnp.conj(scalar)
    return type(operator)(conj(operator.operator), scalar)


@materialise.register(NegLinearOperator)
def _(operator):
    return NegLinearOperator(materialise(operator.operator))


@linearise.register(NegLinearOperator)
def _(operator):
    return NegLinearOperator(linearise(operator.operator))


@conj.register(NegLinearOperator)
def _(operator):
    return NegLinearOperator(conj(operator.operator))


# (With `_add`: the parts of `A + B * 1j` are real and complex, which strict
# dtype promotion refuses to add implicitly.)
@diagonal.register(AddLinearOperator)
def _(operator):
    return _add(diagonal(operator.operator1), diagonal(operator.operator2))


@diagonal.register(MulLinearOperator)
def _(operator):
    return _scale(diagonal(operator.operator), operator.scalar, lambda x, s: x * s)


@diagonal.register(DivLinearOperator)
def _(operator):
    return _scale(diagonal(operator.operator), operator.scalar, lambda x, s: x / s)


@diagonal.register(NegLinearOperator)
def _(operator):
    return -diagonal(operator.operator)


@tridiagonal.register(AddLinearOperator)
def _(operator):
    (d1, l1, u1) = tridiagonal(operator.operator1)
    (d2, l2, u2) = tridiagonal(operator.operator2)
    return _add(d1, d2), _add(l1, l2), _add(u1, u2)


@tridiagonal.register(MulLinearOperator)
def _(operator):
    d, lower, upper = tridiagonal(operator.operator)
    mul = lambda x: _scale(x, operator.scalar, lambda a, s: a * s)
    return mul(d), mul(lower), mul(upper)


@tridiagonal.register(DivLinearOperator)
def _(operator):
    d, lower, upper = tridiagonal(operator.operator)
    div = lambda x: _scale(x, operator.scalar, lambda a, s: a / s)
    return div(d), div(lower), div(upper)


@tridiagonal.register(NegLinearOperator)
def _(operator):
    d, lower, upper = tridiagonal(operator.operator)
    return -d, -lower, -upper


# A Python-number scalar is read at trace time (its sign decides definiteness), so
# it must not become an argument of the compiled function: only array scalars do.
is_cacheable.register(AddLinearOperator)(_both(is_cacheable))
is_cacheable.register(ComposedLinearOperator)(_both(is_cacheable))
is_cacheable.register(NegLinearOperator)(lambda op: is_cacheable(op.operator))
for _cls in (MulLinearOperator, DivLinearOperator):
    is_cacheable.register(_cls)(
        # (A Python number too: the cache keys it by value, see
        # `_linear_solve._without_statics`.)
        lambda op: (
            (type(op.scalar) in PYTHON_NUMBERS or concrete_arrays(op.scalar))
            and is_cacheable(op.operator)
        )
    )
reads_every_leaf.register(AddLinearOperator)(_both(reads_every_leaf))
reads_every_leaf.register(ComposedLinearOperator)(_both(reads_every_leaf))
holds_values.register(AddLinearOperator)(_both(holds_values))
# (`diagonal` of a sum or a scaled operator is read from its parts: cheap when
# theirs are, e.g. a sparse Laplacian plus a diagonal reaction term.)
has_cheap_diagonal.register(AddLinearOperator)(_both(has_cheap_diagonal))
# (A scaled operator reads its scalar.)
for _cls in (NegLinearOperator, MulLinearOperator, DivLinearOperator):
    reads_every_leaf.register(_cls)(lambda op: reads_every_leaf(op.operator))
    holds_values.register(_cls)(lambda op: holds_values(op.operator))
    has_cheap_diagonal.register(_cls)(lambda op: has_cheap_diagonal(op.operator))
# (Negation is exact; a product with a scalar, a sum and a composition compute
# their matrix, which may overflow: `matrix_is_stored` stays `False` for them.)
matrix_is_stored.register(NegLinearOperator)(lambda op: matrix_is_stored(op.operator))
