"""`AbstractLinearOperator`, and the functions that dispatch on operator type.

Every operator-type-dispatching function (`materialise`, `linearise`, `diagonal`,
`tridiagonal`, `conj`, `scaled` (what `*`, `/` and unary `-` build) and the
structure predicates) is declared here, once, with a default for operator classes
that register nothing. Each operator's own file
registers its implementations beside the class, so adding an operator touches one
file.
"""

import abc
import dataclasses
import functools as ft
import math
import types
from collections.abc import Callable
from operator import itemgetter
from typing import Any, NoReturn

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, PyTree, Shaped

from .._misc import (
    describe,
    result_dtype,
    Size,
    strip_weak_dtype,
    tree_conj,
    tree_size,
)
from .._tags import (
    diagonal_tag,
    lower_triangular_tag,
    negative_semidefinite_tag,
    positive_semidefinite_tag,
    symmetric_tag,
    TAG_MEANINGS,
    tags_implying,
    tridiagonal_tag,
    unit_diagonal_tag,
    upper_triangular_tag,
)


# The tags that only a square operator can carry (see
# `AbstractLinearOperator.__check_init__`).
SQUARE_ONLY_TAGS = (symmetric_tag, positive_semidefinite_tag, negative_semidefinite_tag)


# The one import cycle of the package: `arithmetic.py` and `function.py` define
# subclasses of `AbstractLinearOperator`, so import this module, while the
# operator arithmetic (`a + b`, `a @ b`, ...) and the default `conj` below build
# their operators. Those import them when called.


class AbstractLinearOperator(eqx.Module):
    """The base class for all linear operators.

    A linear operator maps a PyTree of arrays (its input structure) to a PyTree of
    arrays (its output structure). Subclasses implement `mv`, `as_matrix`,
    `transpose`, `in_structure` and `out_structure`; everything else (solving,
    differentiation, arithmetic, `vmap`) then works.
    """

    def __check_init__(self):
        # `tags` is not a field of the base class, but every concrete operator that
        # has one should hold a frozenset.
        tags = getattr(self, "tags", frozenset())
        if not isinstance(tags, frozenset):
            raise TypeError("`tags` must be stored as a frozenset.")
        # Symmetry and definiteness are properties of square matrices only: such a
        # tag on a tall or wide operator is a mistake (a swapped shape, or a tag
        # meant for `A^T A`), which lineax 0.1.1 refused at construction too. (A
        # diagonal tag may mark a rectangular diagonal, as the rectangular identity
        # is one; two structures of one size, e.g. (2, 2) -> (4,), are square.)
        if not tags.isdisjoint(SQUARE_ONLY_TAGS) and self.in_size() != self.out_size():
            named = ", ".join(
                f"`lx.{tag!r}`" for tag in SQUARE_ONLY_TAGS if tag in tags
            )
            raise ValueError(
                f"`tags` holds {named}, which only a square operator can have, but "
                f"this {type(self).__name__} has input size {self.in_size()} and "
                f"output size {self.out_size()}. Remove the tag, or check the "
                "operator's shape (the matrix is (output size, input size))."
            )

    @abc.abstractmethod
    def mv(self, vector: PyTree[Array]) -> PyTree[Array]:
        """Compute a matrix-vector product `self @ vector`.

        **Arguments:**

        - `vector`: a PyTree of arrays with the structure of `self.in_structure()`.

        **Returns:**

        A PyTree of arrays with the structure of `self.out_structure()`.
        """

    @abc.abstractmethod
    def as_matrix(self) -> Shaped[Array, "out_size in_size"]:
        """Materialise this operator as a dense 2-D matrix of shape
        `(out_size, in_size)`, flattening input and output in PyTree-leaf order."""

    @abc.abstractmethod
    def transpose(self) -> "AbstractLinearOperator":
        """The transpose (not the conjugate transpose) of this operator."""

    @abc.abstractmethod
    def in_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        """The structure (PyTree of `jax.ShapeDtypeStruct`) of an input vector."""

    @abc.abstractmethod
    def out_structure(self) -> PyTree[jax.ShapeDtypeStruct]:
        """The structure (PyTree of `jax.ShapeDtypeStruct`) of an output vector."""

    # (`type(self).in_structure(self)`, not `self.in_structure()`: an Equinox
    # module binds each method it hands out as a new module, 45-60 us; these are
    # asked many times by the predicates and solver choice of every solve.)
    def in_size(self) -> Size:
        """The total number of elements of an input vector."""
        return tree_size(type(self).in_structure(self))

    def out_size(self) -> Size:
        """The total number of elements of an output vector."""
        return tree_size(type(self).out_structure(self))

    @property
    def T(self) -> "AbstractLinearOperator":
        """Equivalent to [`lineax.AbstractLinearOperator.transpose`][]."""
        return self.transpose()

    def __add__(self, other: "AbstractLinearOperator") -> "AbstractLinearOperator":
        from .arithmetic import AddLinearOperator

        if not isinstance(other, AbstractLinearOperator):
            _not_an_operator("+", other)
        return AddLinearOperator(self, other)

    def __sub__(self, other: "AbstractLinearOperator") -> "AbstractLinearOperator":
        from .arithmetic import AddLinearOperator, NegLinearOperator

        if not isinstance(other, AbstractLinearOperator):
            _not_an_operator("-", other)
        return AddLinearOperator(self, NegLinearOperator(other))

    def __mul__(self, other: ArrayLike) -> "AbstractLinearOperator":
        if isinstance(other, AbstractLinearOperator):
            raise TypeError(
                "`*` multiplies an operator by a scalar; use `@` to compose operators."
            )
        return scaled(self, "mul", other)

    def __rmul__(self, other: ArrayLike) -> "AbstractLinearOperator":
        return self.__mul__(other)

    def __truediv__(self, other: ArrayLike) -> "AbstractLinearOperator":
        if isinstance(other, AbstractLinearOperator):
            raise TypeError(
                "`/` divides an operator by a scalar. For the inverse of an operator "
                "use `lx.invert(operator)`, or `lx.linear_solve` to solve with it."
            )
        return scaled(self, "div", other)

    def __matmul__(self, other: "AbstractLinearOperator") -> "AbstractLinearOperator":
        from .arithmetic import ComposedLinearOperator

        if not isinstance(other, AbstractLinearOperator):
            _not_an_operator("@", other)
        return ComposedLinearOperator(self, other)

    def __neg__(self) -> "AbstractLinearOperator":
        return scaled(self, "neg")

    # Reached only when the left operand is not an operator (else its `__add__`
    # or `__matmul__` runs): say what was meant, as those do.
    def __radd__(self, other: Any):
        _not_an_operator("+", other)

    def __rsub__(self, other: Any):
        _not_an_operator("-", other)

    def __rmatmul__(self, other: Any):
        _not_an_operator("@", other)

    def __rtruediv__(self, other: Any):
        raise TypeError(
            "`s / operator` is not defined: for `s` times the inverse of an operator "
            "use `s * lx.invert(operator)`, or `lx.linear_solve` to solve with it."
        )


def _not_an_operator(op: str, other: Any) -> NoReturn:
    """Raise the TypeError for `operator {op} other` where `other` is not an
    operator, saying what was probably meant. (Raised here rather than returning
    `NotImplemented`, after which Python's message names only the types.)"""
    if op == "@":
        hint = (
            "to apply the operator to a vector use `operator.mv(vector)`; to "
            "compose with a matrix wrap it first, `lx.MatrixLinearOperator(matrix)`"
        )
    else:
        hint = (
            "to add a multiple of the identity use `operator "
            f"{op} s * lx.IdentityLinearOperator(operator.in_structure())`; a "
            "matrix, wrap it first: `lx.MatrixLinearOperator(matrix)`"
        )
    raise TypeError(
        f"`{op}` joins two linear operators, but one operand is of type "
        f"{type(other).__name__}: {hint}."
    )


def check_structures_equal(
    struct1: PyTree[jax.ShapeDtypeStruct],
    struct2: PyTree[jax.ShapeDtypeStruct],
    what: str,
    *,
    expected: bool = False,
) -> None:
    """Raise a ValueError saying `what` if two structures differ (weak types
    ignored). With `expected`, `struct2` is the structure required of `struct1`,
    and the message says so."""
    if strip_weak_dtype(struct1) != strip_weak_dtype(struct2):
        if expected:
            got = f"expected {describe(struct2)}, got {describe(struct1)}"
        else:
            got = f"got {describe(struct1)} and {describe(struct2)}"
        raise ValueError(f"{what}: {got}.")


def shape_mismatch(vector: Any, structure: PyTree[jax.ShapeDtypeStruct]) -> str | None:
    """`None` if `vector` has the PyTree structure and leaf shapes of `structure`,
    else what it has instead, for an error message (dtypes are not compared: an
    operator's `mv` casts them)."""
    leaves, treedef = jtu.tree_flatten(vector)
    if treedef == jtu.tree_structure(structure) and all(
        jnp.shape(x) == s.shape for x, s in zip(leaves, jtu.tree_leaves(structure))
    ):
        return None
    return f"{treedef} with shapes {[jnp.shape(x) for x in leaves]}"


def check_operator(
    operator: Any, name: str = "operator", who: str | None = None
) -> AbstractLinearOperator:
    """Raise a TypeError naming the argument `name` (of the function or class
    `who`) unless `operator` is a linear operator; return it."""
    if not isinstance(operator, AbstractLinearOperator):
        where = f"`{who}` expects `{name}` to be" if who else f"`{name}` must be"
        raise TypeError(
            f"{where} a `lineax.AbstractLinearOperator`, got {type(operator).__name__}."
        )
    return operator


def check_square(operator: AbstractLinearOperator, who: str, advice: str = "") -> None:
    """Raise a ValueError, saying that `who` needs it and then `advice`, unless
    `operator` is square."""
    in_size, out_size = sizes(operator)
    if in_size != out_size:
        raise ValueError(
            f"`{who}` needs a square operator, but the operator has input size "
            f"{in_size} and output size {out_size}." + (f" {advice}" if advice else "")
        )


def flatten_vector(vector: PyTree[ArrayLike], dtype: Any = None) -> Array:
    """Ravel and concatenate all leaves (in PyTree order) to one 1-D array."""
    leaves = jtu.tree_leaves(vector)
    if dtype is None:
        dtype = jnp.result_type(*leaves) if leaves else jnp.float32
    if len(leaves) == 1:
        # (`jnp.reshape` of a NumPy array, e.g. a constant under `jax.grad`, may
        # give a NumPy array: the result is always a JAX one.)
        return jnp.asarray(jnp.reshape(leaves[0], -1).astype(dtype))
    return jnp.concatenate([jnp.reshape(x, -1).astype(dtype) for x in leaves])


def unflatten_vector(
    flat: Array, structure: PyTree[jax.ShapeDtypeStruct], keep_dtype: bool = False
) -> PyTree[Array]:
    """Inverse of `flatten_vector`: split a 1-D array into leaves of `structure`.

    The leaves keep the dtype of `flat` unless `keep_dtype`, in which case they are
    cast to the structure's dtypes.
    """
    leaves, treedef = jtu.tree_flatten(structure)
    sizes = [math.prod(x.shape) for x in leaves]
    if len(leaves) == 1:
        pieces = [flat]
    else:
        pieces = jnp.split(flat, np.cumsum(sizes)[:-1])
    out = []
    for piece, leaf in zip(pieces, leaves):
        piece = piece.reshape(leaf.shape)
        if keep_dtype:
            piece = piece.astype(leaf.dtype)
        out.append(piece)
    return jtu.tree_unflatten(treedef, out)


def matrix_by_mv(operator: AbstractLinearOperator) -> Array:
    """Materialise any operator by mapping its `mv` over the columns of the
    identity (one batched matrix-vector product)."""
    in_struct = operator.in_structure()
    out_struct = operator.out_structure()
    in_dtype = result_dtype(in_struct)
    dtype = result_dtype(in_struct, out_struct)
    n = operator.in_size()

    def column(basis_vector):
        return flatten_vector(
            operator.mv(unflatten_vector(basis_vector, in_struct, keep_dtype=True)),
            dtype,
        )

    # vmap over columns, then transpose: rows of the result are output elements.
    return jax.vmap(column, out_axes=1)(jnp.eye(n, dtype=in_dtype))


#
# The dispatching functions. Defaults apply to operator classes that register
# nothing: they are correct but may be slow (materialising), and predicates say
# "no structure known".
#


_PREDICATE_DOC = """Whether an operator {holds}, decided at trace time from its type and
tags (never from its values).

It holds for an operator tagged {tags}, and for an operator whose type or whose
parts imply it (a [`lineax.DiagonalLinearOperator`][] is diagonal; the negation of
a positive semidefinite operator is negative semidefinite).

**Arguments:**

- `operator`: a linear operator.

**Returns:**

A Python `bool`. `False` means "not known", not "no". Extend it to your own
operator class with `@lineax.{name}.register(MyOperator)`.
"""

# The predicate of each tag of `TAG_MEANINGS`, in the table's order.
PREDICATE_OF_TAG: dict[Any, Any] = {}


def _predicate(tag: Any):
    """The predicate of `tag`, named and documented from its row of the table."""
    meaning = TAG_MEANINGS[tag]
    links = [f"[`lineax.{t!r}`][]" for t in tags_implying(tag)]
    if len(links) > 1:
        links = [f"with one of {', '.join(links[:-1])} or {links[-1]}"]

    def predicate(operator: AbstractLinearOperator) -> bool:
        check_operator(operator)
        # Known from the shape alone: a 1x1 operator is diagonal (so that
        # `AutoLinearSolver(well_posed=None)` gives it the pseudoinverse, as
        # documented for every 1x1 operator).
        return tag is diagonal_tag and is_one_by_one(operator)

    # Set on the function itself, before `singledispatch` copies them to its
    # wrapper: the docs site reads them through `__wrapped__`.
    predicate.__name__ = predicate.__qualname__ = meaning.predicate
    predicate.__doc__ = _PREDICATE_DOC.format(
        holds=meaning.holds, tags=links[0], name=meaning.predicate
    )
    PREDICATE_OF_TAG[tag] = dispatching = ft.singledispatch(predicate)
    dispatching.register = _checked_register(dispatching.register, meaning.predicate)
    return dispatching


def _checked_register(register: Callable, name: str) -> Callable:
    """`singledispatch`'s `register`, whose implementations from outside lineax
    raise a TypeError naming the predicate and the class when they return a traced
    array. A user's predicate that looked at the operator's values (`jnp.allclose(
    op.matrix, op.matrix.T)`) worked eagerly and failed under `jit` with JAX's
    `TracerBoolConversionError`, raised from lineax's `if`, naming neither.
    (lineax's own implementations are not wrapped: no extra call in a solve.)"""

    def checked(func: Callable) -> Callable:
        # (`__module__` is None for a function made by `exec`, as in a notebook
        # or the docs' snippets.)
        if (getattr(func, "__module__", None) or "").startswith("lineax."):
            return func

        @ft.wraps(func)
        def wrapper(operator):
            out = func(operator)
            if isinstance(out, jax.core.Tracer):
                raise TypeError(
                    f"`lineax.{name}` registered for {type(operator).__name__} "
                    "returned a traced JAX array. Predicates are decided at trace "
                    "time, from an operator's class and static fields, never from "
                    "its values (unknown under `jax.jit`): return a Python bool, "
                    "or tag the operator."
                )
            return out

        return wrapper

    def checked_register(cls: Any, func: Callable | None = None) -> Callable:
        if func is not None:
            return register(cls, checked(func))
        if isinstance(cls, (type, types.UnionType)):
            return lambda f: register(cls, checked(f))
        # `@register` on a function annotated with the operator class.
        return register(checked(cls))

    return checked_register


# Their docstrings are generated, so the docs site reads them from the running
# module (see `docs/_griffe_runtime_docs.py`).
is_symmetric = _predicate(symmetric_tag)
is_diagonal = _predicate(diagonal_tag)
is_tridiagonal = _predicate(tridiagonal_tag)
is_lower_triangular = _predicate(lower_triangular_tag)
is_upper_triangular = _predicate(upper_triangular_tag)
is_positive_semidefinite = _predicate(positive_semidefinite_tag)
is_negative_semidefinite = _predicate(negative_semidefinite_tag)
has_unit_diagonal = _predicate(unit_diagonal_tag)
assert list(PREDICATE_OF_TAG) == list(TAG_MEANINGS), "a tag has no predicate"


@ft.singledispatch
def materialise(operator: AbstractLinearOperator) -> AbstractLinearOperator:
    """An equivalent operator that holds its values as arrays, so that `mv` and
    `as_matrix` are cheap. Function and Jacobian operators become Matrix or PyTree
    operators; operators already holding arrays are returned unchanged.

    **Arguments:**

    - `operator`: a linear operator.

    **Returns:**

    A linear operator with the same structures, tags and action.
    """
    check_operator(operator)
    return operator


@ft.singledispatch
def linearise(operator: AbstractLinearOperator) -> AbstractLinearOperator:
    """Cache the linearisation of an operator, so that repeated `mv`s are cheap.

    For a [`lineax.JacobianLinearOperator`][] this computes the JVP's linearisation
    once (as `jax.linearize` does); other operators are returned unchanged or with
    their components linearised.

    **Arguments:**

    - `operator`: a linear operator.

    **Returns:**

    An equivalent linear operator.
    """
    check_operator(operator)
    return operator


@ft.singledispatch
def diagonal(operator: AbstractLinearOperator) -> Shaped[Array, " size"]:
    """The diagonal of an operator, as a 1-D array (of its flattened matrix).

    For matrix-free operators tagged diagonal this costs one matrix-vector product.

    **Arguments:**

    - `operator`: a linear operator.

    **Returns:**

    A 1-D array of length `min(out_size, in_size)`.
    """
    check_operator(operator)
    if is_diagonal(operator):
        return probe_diagonal(operator)
    if is_tridiagonal(operator) and operator.in_size() == operator.out_size():
        return probe_tridiagonal(operator)[0]
    return jnp.diagonal(operator.as_matrix())


@ft.singledispatch
def tridiagonal(
    operator: AbstractLinearOperator,
) -> tuple[Shaped[Array, " size"], Shaped[Array, " size-1"], Shaped[Array, " size-1"]]:
    """The three central bands of a square operator.

    For matrix-free operators tagged tridiagonal this costs three matrix-vector
    products (or one, if tagged diagonal).

    **Arguments:**

    - `operator`: a square linear operator.

    **Returns:**

    A 3-tuple `(diagonal, lower_diagonal, upper_diagonal)` of 1-D arrays of lengths
    `n`, `n - 1`, `n - 1`.
    """
    check_operator(operator)
    if is_diagonal(operator):
        check_square(operator, "tridiagonal")
        diag = probe_diagonal(operator)
        zeros = jnp.zeros(diag.shape[0] - 1, diag.dtype)
        return diag, zeros, zeros
    if is_tridiagonal(operator):
        return probe_tridiagonal(operator)
    matrix = operator.as_matrix()
    return bands_of_matrix(matrix)


@ft.singledispatch
def scaled(
    operator: AbstractLinearOperator, kind: str, scalar: Any = None
) -> AbstractLinearOperator:
    """`operator * scalar` (`kind="mul"`), `operator / scalar` (`"div"`) or
    `-operator` (`"neg"`), as the arithmetic operators build them.

    By default a [`lineax.MulLinearOperator`][], [`lineax.DivLinearOperator`][] or
    [`lineax.NegLinearOperator`][]. An operator type whose solve exploits its
    structure registers a result of its own type, so that scaling keeps that
    solve (`2 * kron(A, B)` is `kron(2 * A, B)`, solved factor by factor rather
    than densely).
    """
    from .arithmetic import DivLinearOperator, MulLinearOperator, NegLinearOperator

    if kind == "mul":
        return MulLinearOperator(operator, scalar)
    if kind == "div":
        return DivLinearOperator(operator, scalar)
    return NegLinearOperator(operator)


def scaled_dtype(dtype: Any, scalar: Any) -> np.dtype:
    """The dtype of arrays of `dtype` multiplied by `scalar`, as JAX promotes it.

    A Python number, or an array that was one (weakly typed, as the Python-number
    scalar of a scaled operator becomes when the operator passes through `jax.jit`
    or a loop carry), keeps the precision of `dtype` (`float32` times `2.0` is
    `float32`, times `1j` is `complex64`); other arrays promote. Decided with
    standard promotion: the callers cast explicitly, which strict promotion allows
    (it refuses a complex number with a real array implicitly).
    """
    with jax.numpy_dtype_promotion("standard"):
        return np.dtype(jnp.result_type(dtype, scalar))


def keeps_dtype(scalar: Any, dtype: Any) -> bool:
    """Whether multiplying (or dividing) arrays of `dtype` by `scalar` keeps that
    dtype (see `scaled_dtype`)."""
    return scaled_dtype(dtype, scalar) == np.dtype(dtype)


def scaled_wrapper(
    operator: AbstractLinearOperator, kind: str, scalar: Any = None
) -> AbstractLinearOperator:
    """What `scaled` builds by default: the scaling as a wrapper around `operator`."""
    return scaled.dispatch(AbstractLinearOperator)(operator, kind, scalar)


def scaled_tags(operator: AbstractLinearOperator, kind: str, scalar: Any = None):
    """The tags of `operator` that the scaling keeps (the sign of the scalar
    decides definiteness): those of the default wrapper."""
    return tags_of(scaled_wrapper(operator, kind, scalar))


def register_scaled(cls: type) -> Callable:
    """Decorator: register `fn(operator, kind, scalar)` as `scaled` for the
    structured operator class `cls`, where it builds an operator of that structure.
    It is called only where the scalar keeps the operator's dtype; otherwise (a
    complex scalar on a real operator) the result is the default wrapper, as the
    parts of a structured operator record and share their dtype."""

    def register(fn: Callable) -> Callable:
        @scaled.register(cls)
        def _(operator, kind, scalar=None):
            if kind != "neg":
                dtype = result_dtype(operator.in_structure(), operator.out_structure())
                if not keeps_dtype(scalar, dtype):
                    return scaled_wrapper(operator, kind, scalar)
            return fn(operator, kind, scalar)

        return fn

    return register


@ft.singledispatch
def conj(operator: AbstractLinearOperator) -> AbstractLinearOperator:
    """The elementwise complex conjugate of an operator: `conj(A) x = conj(A conj(x))`.

    **Arguments:**

    - `operator`: a linear operator.

    **Returns:**

    A linear operator with the same structures and tags.
    """
    check_operator(operator)
    from .function import FunctionLinearOperator  # the import cycle: see the top

    def fn(x):
        return tree_conj(operator.mv(tree_conj(x)))

    return FunctionLinearOperator(fn, operator.in_structure(), tags_of(operator))


@ft.singledispatch
def is_cacheable(operator: Any) -> bool:
    """Whether `linear_solve`, called outside of any JAX transformation, may run
    `operator` through one cached compiled function: every PyTree leaf is a concrete
    (not traced) array, and the static data compares by value, so that an equal
    operator built anew finds the same compiled function.

    `False` for anything that registers nothing, including non-operators. A
    Function or Jacobian operator is cacheable only where its function is
    closure-converted (`function.holds_its_jaxpr`): its jaxpr, the one leaf
    that is not an array, is then part of the cache's key, compared by
    identity, so that only that same operator finds the compiled function
    (`_compiled_linear_solve` compiles it from its second solve on: a new
    function per call would compile anew each time, slower than dispatching
    eagerly).
    """
    return False


@ft.singledispatch
def reads_every_leaf(operator: Any) -> bool:
    """Whether the action of `operator` reads every one of its inexact array leaves
    (a matrix, the diagonals of a tridiagonal operator, ...), so that they are
    finite exactly when the operator is: the finiteness test of a solve then
    examines them instead of the operator's action on a probe.

    A question about the operator's structure, never its values. `False` for
    anything that registers nothing: a Function or Jacobian operator may hold
    arrays it never reads (an unused `±inf` bound in its `args`).
    """
    return False


@ft.singledispatch
def matrix_is_stored(operator: Any) -> bool:
    """Whether the matrix of `operator` is its stored values put in place (a
    matrix, the bands of a diagonal or tridiagonal operator, blocks of such),
    with no arithmetic, so that it is finite exactly when they are.

    A question about the operator's structure, never its values. `False` for
    anything that registers nothing: a sum, a product, a scaling or a Kronecker
    product computes its matrix, which can overflow to inf from finite parts
    (`[[1e200, 1e200], [0, 1]] @ diag(1e200, 1)`), and a direct solver's
    factorisation of a matrix holding inf can give a finite, wrong solution.
    """
    return False


def _yes(operator: Any) -> bool:
    return True


@ft.singledispatch
def holds_values(operator: AbstractLinearOperator) -> bool:
    """Whether the diagonal (and matrix) of `operator` are read from stored arrays
    or a few probes, rather than computed by materialising it. The default is
    "no" (a Function or Jacobian operator, or an operator class lineax does not
    know), except for operators tagged diagonal or tridiagonal, whose bands cost
    one or three matrix-vector products."""
    return is_diagonal(operator) or is_tridiagonal(operator)


@ft.singledispatch
def has_cheap_diagonal(operator: AbstractLinearOperator) -> bool:
    """Whether `lx.diagonal(operator)` reads stored values (a sparse matrix's
    diagonal does, though its dense matrix would be costly)."""
    return holds_values(operator)


def register_stored(cls: type) -> None:
    """Declare that the operators of class `cls` store their values (a matrix,
    diagonals, ...): their action reads every array leaf (`reads_every_leaf`),
    their diagonal and matrix are read, not computed (`holds_values`), and their
    matrix is those values put in place (`matrix_is_stored`)."""
    reads_every_leaf.register(cls)(_yes)
    holds_values.register(cls)(_yes)
    matrix_is_stored.register(cls)(_yes)


def register_flat(cls: type) -> None:
    """Declare that an operator of class `cls` (exactly: not a subclass) whose
    dynamic fields each hold a concrete JAX array is, as a PyTree, those arrays
    and the values of its static fields (as Equinox flattens a module), and that
    it is cacheable (`is_cacheable`) as such. `linear_solve`, called un-jitted,
    then reads the fields itself (`FLAT_FIELDS`) and keys its compiled solve by
    the class and the static values, without flattening the operator or
    building a PyTree structure (3 of the 11 us around a 10x10 solve's compiled
    call)."""
    fields = dataclasses.fields(cls)
    static = tuple(f.name for f in fields if f.metadata.get("static", False))
    arrays = tuple(f.name for f in fields if f.name not in static)
    if not arrays or not static:
        raise ValueError(f"{cls.__name__} needs array and static fields.")
    FLAT_FIELDS[cls] = (
        itemgetter(*arrays),
        itemgetter(*static),
        len(fields),
        len(arrays),
    )


# The classes declared by `register_flat`, each with: a function of an
# instance's `__dict__` returning its array fields (in the order of the fields,
# Equinox's flatten's: the one array itself if it has one, else their tuple),
# one returning its static values (likewise), its number of fields (an
# instance with more entries in its `__dict__`, the wrapper fields of
# `eqx.module_update_wrapper`, has them in its PyTree structure too: it is
# flattened as any other), and its number of array fields.
FLAT_FIELDS: dict[type, tuple[Callable, Callable, int, int]] = {}


# The operator classes whose PyTree structure holds data that is derived on the
# host from concrete arrays, and that a copy made under tracing lacks (a sparse
# operator's layout, from its indices), each with the function that stands for
# such an operator in the signature of a solver's state (see `_check_state` in
# `_linear_solve.py`): the state that `init` made eagerly is checked against
# `init` traced.
STATE_SIGNATURES: dict[type, Callable[[Any], Any]] = {}


# The Python numbers that scale an operator as static data (`2.0 * operator`):
# their sign decides its definiteness tags. (Not `bool`: a flag is no scale.)
PYTHON_NUMBERS = (int, float, complex)


def has_no_precision(leaf: Any) -> bool:
    """Whether `leaf` is a Python number, or an array that was one (weakly typed):
    it has no precision of its own and takes the operator's, as in JAX
    (`jnp.float32(2.0) * 1.0` is float32), wherever a vector or guess is cast."""
    return type(leaf) in PYTHON_NUMBERS or getattr(leaf, "weak_type", False)


def concrete_arrays(tree: PyTree) -> bool:
    """Whether every leaf of `tree` is a JAX or NumPy array that is not traced."""
    return all(
        isinstance(x, (jax.Array, np.ndarray)) and not isinstance(x, jax.core.Tracer)
        for x in jtu.tree_leaves(tree)
    )


def tags_of(operator: AbstractLinearOperator) -> frozenset:
    """The tags that the predicates establish for `operator`, as a frozenset (used
    to carry structure over to derived operators)."""
    return frozenset(tag for tag, pred in PREDICATE_OF_TAG.items() if pred(operator))


def bands_of_matrix(matrix: Array) -> tuple[Array, Array, Array]:
    return (
        jnp.diagonal(matrix, 0),
        jnp.diagonal(matrix, -1),
        jnp.diagonal(matrix, 1),
    )


def _ones_like_structure(structure: PyTree[jax.ShapeDtypeStruct]) -> PyTree[Array]:
    return jtu.tree_map(lambda s: jnp.ones(s.shape, s.dtype), structure)


def probe_diagonal(operator: AbstractLinearOperator) -> Array:
    """The diagonal of an operator known to be diagonal, from one `mv` of ones.

    A rectangular one (a matrix-free operator tagged diagonal, as the rectangular
    identity is) has its diagonal in the first `min(out_size, in_size)` entries,
    and zeros beyond: `lx.diagonal` of one raised a `ValueError` ("needs a square
    operator") that its documentation does not allow."""
    out = flatten_vector(operator.mv(_ones_like_structure(operator.in_structure())))
    n = min(operator.in_size(), operator.out_size())
    return out if out.shape[0] == n else out[:n]


def probe_tridiagonal(operator: AbstractLinearOperator) -> tuple[Array, Array, Array]:
    """The bands of an operator known to be tridiagonal, from three `mv`s.

    Probing with `e_0 + e_3 + e_6 + ...` (and its shifts by one and two) hits each
    column of a tridiagonal matrix with exactly one probe, and the three rows it
    touches are disjoint from those of the next probed column.
    """
    check_square(operator, "tridiagonal")
    n = operator.in_size()
    in_struct = operator.in_structure()
    in_dtype = result_dtype(in_struct)
    index = np.arange(n)
    probes = np.stack([(index % 3) == k for k in range(3)]).astype(np.float64)

    def apply(probe):
        out = operator.mv(
            unflatten_vector(jnp.asarray(probe, in_dtype), in_struct, True)
        )
        return flatten_vector(out)

    # One batched mv rather than three separate ones.
    outs = jax.vmap(apply)(probes)  # outs[k, i] = sum_j A[i, j] probe_k[j]
    # Column j was probed by probe j % 3; A[i, j] is nonzero for |i - j| <= 1.
    column = index % 3
    diag = outs[column, index]
    lower = outs[column[:-1], index[1:]]  # A[j + 1, j]
    upper = outs[column[1:], index[:-1]]  # A[j, j + 1]
    return diag, lower, upper


def has_tags(operator: Any, *tags: Any) -> bool:
    """Whether `operator.tags` contains any of `tags`."""
    op_tags = getattr(operator, "tags", frozenset())
    return any(tag in op_tags for tag in tags)


def holds_by_tags(operator: Any, tag: Any) -> bool:
    """Whether `operator.tags` makes the predicate of `tag` true (by holding `tag`
    or a tag implying it, as `TAG_MEANINGS` says)."""
    if not has_tags(operator, *tags_implying(tag)):
        return False
    # A rectangular operator tagged diagonal is not symmetric, although
    # `diagonal_tag` implies `symmetric_tag` (as the rectangular identity is not).
    return tag not in SQUARE_ONLY_TAGS or operator.in_size() == operator.out_size()


def register_tag_predicates(cls: type) -> None:
    """Register the predicates of an operator class whose structure is given solely
    by a `tags` field."""
    for tag, predicate in PREDICATE_OF_TAG.items():
        predicate.register(cls)(ft.partial(_by_tags_or_size, tag=tag))


def register_structure(cls: type, *tags: Any) -> None:
    """Register the predicates of an operator class that has, by its type, the
    structure of `tags` (and whatever they imply), and no other (except that a 1x1
    one is diagonal)."""
    for tag, predicate in PREDICATE_OF_TAG.items():
        holds = any(t in tags for t in tags_implying(tag))
        if tag is diagonal_tag and not holds:
            # A 1x1 `TridiagonalLinearOperator` is diagonal, so that
            # `AutoLinearSolver(well_posed=None)` gives it the pseudoinverse (zero
            # for a zero entry) as for every 1x1 operator, and as lineax 0.1.1 did;
            # `Tridiagonal` reported a zero entry as singular.
            predicate.register(cls)(is_one_by_one)
        else:
            predicate.register(cls)(lambda operator, holds=holds: holds)


def _by_tags_or_size(operator: AbstractLinearOperator, tag: Any) -> bool:
    # A 1x1 operator is diagonal whatever its tags.
    return holds_by_tags(operator, tag) or (
        tag is diagonal_tag and is_one_by_one(operator)
    )


def sizes(operator: AbstractLinearOperator) -> tuple[Size, Size]:
    """`(operator.in_size(), operator.out_size())`, without binding either method
    (see `AbstractLinearOperator.in_size`): for the solver choice and the checks
    that every solve makes, outside of `jit` on every call."""
    cls = type(operator)
    return cls.in_size(operator), cls.out_size(operator)


def is_one_by_one(operator: AbstractLinearOperator) -> bool:
    """Whether `operator` maps one number to one number (and so is diagonal)."""
    return sizes(operator) == (1, 1)
