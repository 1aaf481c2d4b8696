"""Small PyTree, structure and dtype helpers shared across the package."""

import functools
import math
import sys
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.extend.core
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax._src.core import ShardingTypeError as ShardingTypeError  # (not exported)
from jaxtyping import Array, ArrayLike, PyTree


# The instance dictionary of an Equinox module, read past `Module.__getattribute__`
# (a Python function: 0.3 us an attribute) and past a `__dict__` property (see
# `Solution`): where the hot path of an un-jitted solve reads or writes fields.
instance_dict: Callable[[Any], dict[str, Any]] = eqx.Module.__dict__["__dict__"].__get__


try:
    from jax._src.core import trace_state_clean as _trace_state_clean
except ImportError:  # pragma: no cover - a future JAX; see `no_active_trace`
    _trace_state_clean = None
try:  # Not public API (see `staging`).
    from jax._src.core import trace_ctx as _trace_ctx
    from jax._src.interpreters.partial_eval import DynamicJaxprTrace as _JaxprTrace
except ImportError:  # pragma: no cover - a future JAX
    _trace_ctx = _JaxprTrace = None


def no_active_trace() -> bool:
    """Whether this is plain eager Python, outside every JAX transformation.

    Tracer-free inputs do not show that: a constant operator and vector closed
    over inside `jax.jit`, `lax.scan`/`cond`/`while_loop`, `vmap`, `grad`,
    `jax.checkpoint` or a `custom_jvp` rule are concrete arrays, but the solve is
    being traced, so its result code cannot be read on the host. JAX (since its
    "stackless" tracing, 0.4.36) keeps the current trace in a context variable;
    `trace_state_clean()` is true exactly when that is the eval trace and no named
    axis is bound -- the test `jax.jit` itself makes before its C++ fast path.
    There is no public equivalent; without it, `False`: the answer that is always
    safe (the traced path of a solve, a closure conversion of a function).
    """
    return _trace_state_clean is not None and bool(_trace_state_clean())


class _Unknown:
    value = None


try:
    # What `trace_state_clean` reads (`trace_ctx.is_top_level()`): the current
    # trace and axis environment, in JAX's thread-local holders, against the eval
    # trace and the empty environment. Read inline by the hot path of an
    # un-jitted solve (`_linear_solve._run_flat`): `trace_state_clean()` is four
    # Python calls, 0.4 us of its 16 around a 10x10 solve.
    # `test_eager.test_inline_trace_test_agrees_with_jax` tests both agree.
    from jax._src.core import (
        axis_env_state as TRACE_AXES,
        eval_trace as EVAL_TRACE,
        top_axis_env as TOP_AXES,
        trace_state_strong_ref as TRACE,
    )
except ImportError:  # pragma: no cover - a future JAX: never "no trace"
    TRACE = TRACE_AXES = _Unknown()
    EVAL_TRACE = TOP_AXES = object()


def staging() -> bool:
    """Whether a trace being staged out to a jaxpr (`jit`, a lowering) is active.
    (Without JAX's private trace context, `True`.)"""
    if _trace_ctx is None or _JaxprTrace is None:  # pragma: no cover - a future JAX
        return True
    trace: Any = _trace_ctx.trace
    while trace is not None:
        if isinstance(trace, _JaxprTrace):
            return True
        trace = getattr(trace, "parent_trace", None)
    return False


def _compiled_unless(fn: Callable, inline: Callable[[], bool]) -> Callable:
    """`fn`, compiled by `eqx.filter_jit` (once per structure), or called as it is
    where `inline()` says so."""
    jitted = eqx.filter_jit(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if inline():
            return fn(*args, **kwargs)
        return jitted(*args, **kwargs)

    return wrapper


def jit_when_eager(fn: Callable) -> Callable:
    """`fn`, compiled (`eqx.filter_jit`, once per structure) where it runs eagerly,
    inline where a trace is being staged out.

    Run eagerly (un-jitted, also under an un-jitted `vmap` or `grad`), a function
    holding a loop was traced and compiled again at every call, its body a new
    closure each time; staged, a nested `jit` is lowered as a function of its own,
    traced again at every lowering, for nothing."""
    return _compiled_unless(fn, staging)


def jit_when_eagerly_transformed(fn: Callable) -> Callable:
    """`fn`, compiled (`eqx.filter_jit`, once per structure) where it runs under a
    transformation applied un-jitted (an un-jitted `vmap`: its arguments are
    tracers of an eager computation); inline where a trace is being staged out,
    and where nothing is traced at all (concrete arrays, which a function that
    branches on them in Python, as `branch_on_code` does, handles as NumPy would).

    For a function without loops whose static arguments may be a new object on
    every call: compiled there, it compiled once per new object (an un-jitted
    `jax.grad` through a `FunctionLinearOperator` transposes it into a new closure
    on every call: three compiles of a solve's error check, about 0.4 s, each
    time)."""
    return _compiled_unless(fn, lambda: staging() or no_active_trace())


def default_floating_dtype() -> Any:
    """The floating dtype JAX uses by default: float64 if x64 is enabled, else
    float32."""
    if jax.config.jax_enable_x64:  # pyright: ignore[reportAttributeAccessIssue]
        return jnp.float64
    else:
        return jnp.float32


def complex_to_real_dtype(dtype: Any) -> Any:
    """The real dtype of the same precision as `dtype`.

    **Arguments:**

    - `dtype`: a dtype, or an array (whose dtype is used).

    **Returns:**

    `float32` for `complex64`, `float64` for `complex128`, and `dtype` itself for
    real dtypes.
    """
    # A NumPy scalar type (`np.complex128`) has a `dtype` attribute too, a
    # descriptor rather than a dtype: it is itself the dtype-like argument.
    if not isinstance(dtype, type) and hasattr(dtype, "dtype"):
        dtype = dtype.dtype
    return jnp.finfo(dtype).dtype


def inexact_asarray(x: ArrayLike) -> Array:
    """Convert to a JAX array, promoting integer and boolean dtypes to the default
    floating dtype (a linear solve has no meaning over the integers)."""
    # Fast path: operators are constructed on every un-jitted call, so avoid
    # `jnp.asarray`'s overhead for what is almost always already right.
    if isinstance(x, jax.Array) and x.dtype.kind in "fc":
        return x
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.inexact):
        dtype = default_floating_dtype()
    if isinstance(x, jax.Array):
        return jnp.asarray(x, dtype=dtype)
    if isinstance(x, np.ndarray):
        return device_copy(x, dtype)
    return jnp.array(x, dtype=dtype, copy=True)


def device_copy(x: np.ndarray, dtype: Any = None) -> Array:
    """A JAX array of a copy of the NumPy array `x` (converted to `dtype`).

    Copied: on the CPU, `jnp.asarray(x)` of an aligned NumPy array may alias its
    memory, and an operator's "immutable" array, or the input a pending state
    or statistic of an un-jitted solve is computed from when read, then changed
    with the caller's buffer (a loop refilling one matrix). Copied and converted
    by NumPy, then put on the device as it is: `jnp.array(x, dtype, copy=True)`
    and `jnp.asarray` compile programs of their own (`convert_element_type`,
    `stage`), once per shape and dtype and again after every
    `jax.clear_caches()` (an un-jitted first solve of NumPy inputs: 3 -> 1
    compiles)."""
    return jax.device_put(np.array(x, dtype=dtype, copy=True))


def is_inexact_array(x: Any) -> bool:
    return eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.inexact)


def power_of_two_normaliser(largest: Array) -> Array:
    """Elementwise, the power of two `s` with `s · largest` in `[1, 2)`, for the
    largest magnitude `largest` (real, `>= 0`) of some entries: multiplying those
    entries by it is exact (no rounding, barring underflow of entries far below
    the largest), so a solve of the rescaled problem, scaled back, is the solve of
    the original one, bitwise, wherever neither over- nor underflows. It is `1`
    where `largest` is in `[1, 2)`. It is kept normal (XLA flushes subnormals to
    zero): the largest power of two of the dtype, `2^(2 bias)` (float32: `2^127`),
    where `largest` is zero or subnormal, and the smallest normal number where
    `largest` is at least `2^(2 bias - 1)` (float32: `2^126`; scaled into `[1,
    4)`) or not finite (inf stays inf, NaN stays NaN).

    Computed on the float's bits, in four operations: the exponent field `e` of
    `largest` (its mantissa masked off) is that of `2^(e - bias)`, and `2 bias -
    e` that of its reciprocal. (`log2`/`exp2` round, and a division and a clip
    cost more operations, in every solve's program.)"""
    info = jnp.finfo(largest.dtype)
    bits = np.dtype(f"uint{info.bits}")
    bias = (1 << (info.bits - 2 - info.nmant)) - 1
    mask = ((1 << (info.bits - 1 - info.nmant)) - 1) << info.nmant
    exponent = lax.bitcast_convert_type(largest, bits) & np.asarray(mask, bits)
    # (At most `2 bias - 1`: the reciprocal's exponent field at least 1, normal.)
    exponent = jnp.minimum(exponent, np.asarray((2 * bias - 1) << info.nmant, bits))
    reciprocal = np.asarray(2 * bias << info.nmant, bits) - exponent
    return lax.bitcast_convert_type(reciprocal, largest.dtype)


def strip_weak_dtype(tree: PyTree) -> PyTree:
    """Replace every `jax.ShapeDtypeStruct` in `tree` by one without `weak_type`, so
    that structures compare equal irrespective of how they were made."""
    return jtu.tree_map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, x.dtype)
            if type(x) is jax.ShapeDtypeStruct
            else x
        ),
        tree,
    )


def python_number(x: Any) -> Any:
    """The converter of static numeric parameters (a solver's tolerances, `rcond`,
    `conlim` and step counts, through `static_number`; a preconditioner's
    counts): a NumPy scalar or a concrete 0-d array becomes the Python number it
    holds; anything else is returned for the caller's checks.

    They are static (compared and hashed, read at trace time), so only Python
    numbers are kept; but `rtol=10 * jnp.finfo(jnp.float32).eps` (a NumPy
    float32), `jnp.float32(1e-5)` or `max_steps=np.prod(shape)` (a NumPy int64)
    are what users pass, and the published lineax accepted them.
    """
    if isinstance(x, np.generic) or (
        isinstance(x, (np.ndarray, jax.Array)) and np.ndim(x) == 0
    ):
        try:
            return x.item()
        except jax.errors.ConcretizationTypeError:  # a tracer: the checks reject it
            return x
    return x


def checked_count(value: Any, name: str, minimum: int, or_none: bool = False) -> int:
    """`value` (a Python or NumPy integer: see `python_number`) as a Python int; a
    ValueError naming `name` unless it is an int of at least `minimum` (0 or 1).
    `or_none` only says, in the message, that None was accepted too."""
    value = python_number(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "positive" if minimum > 0 else "nonnegative"
        none = "None or " if or_none else ""
        raise ValueError(f"`{name}` must be {none}a {kind} int, got {value!r}.")
    return value


def check_static_float(value: Any, name: str) -> None:
    """Raise a TypeError naming `name` unless `value` is a Python float or int (a
    static parameter, after `python_number`)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"`{name}` must be a number (it is static data: a traced value, inside "
            "`jit` or `vmap`, cannot be one; build the solver outside the "
            f"transformation), got {type(value).__name__}."
        )


def lineax_class_named(text: str, base: type, suffix: str = "") -> type | None:
    """The public lineax subclass of `base` that a string names (`"lu"` for `LU`,
    `"jacobi"` for `JacobiPreconditioner` with `suffix="Preconditioner"`), ignoring
    case, `_`, `-` and spaces; `None` if none does. For the messages of a string
    passed where an object was expected."""

    def key(name: str) -> str:
        return "".join(c for c in name.lower() if c not in "_- ")

    wanted = key(text)
    seen, todo = set(), [base]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub not in seen:
                seen.add(sub)
                todo.append(sub)
    public = sys.modules.get("lineax")
    for cls in sorted(seen, key=lambda c: c.__name__):
        name = cls.__name__
        # (Only what `lx.` exports: not a user's subclass, nor an internal one.)
        if getattr(public, name, None) is not cls or name.startswith("Abstract"):
            continue
        if wanted in (key(name), key(name.removesuffix(suffix)) if suffix else None):
            return cls
    return None


def structure_of(tree: PyTree, name: str = "structure") -> PyTree[jax.ShapeDtypeStruct]:
    """The structure (PyTree of `jax.ShapeDtypeStruct`) of a PyTree of arrays or of
    `jax.ShapeDtypeStruct`s.

    An integer or boolean dtype becomes the default floating dtype, as
    `inexact_asarray` converts such an array: a linear operator acts on a vector
    space, and a solution in an integer dtype was truncated (`[0, 0, 0]` for the
    `[0.5, 0.5, 0.5]` that the published lineax returns).

    Raises a `TypeError` naming `name` for any other kind of leaf.
    """
    return jtu.tree_map(functools.partial(_structure_leaf, name), tree)


# (Module-level helpers of functions that every solve calls, not closures: the
# test suite's runtime type checker wraps every function definition it runs, a
# nested one at each call of its parent, at about a millisecond a wrap; 5% of a
# test run went to wrapping those of `structure_of`, `select`,
# `stack_alike_leaves` and `varying_like`.)
def _floating_struct(shape, dtype) -> jax.ShapeDtypeStruct:
    """A structure of `shape`, in `dtype` if inexact, else the default float."""
    if not jnp.issubdtype(dtype, jnp.inexact):
        dtype = default_floating_dtype()
    return jax.ShapeDtypeStruct(shape, dtype)


def _structure_leaf(name: str, x: Any) -> jax.ShapeDtypeStruct:
    """The structure of a leaf `x` of `structure_of`'s tree named `name`."""
    if isinstance(x, jax.ShapeDtypeStruct):
        # Canonicalised as an array's dtype is: a structure written as
        # `ShapeDtypeStruct(x.shape, x.dtype)` for a NumPy float64 `x` declares
        # float64 that, with x64 disabled, no computation produces (`fn` and
        # the solvers return float32), so the Krylov solvers found the input
        # and output structures different, as the published lineax (which
        # traced them with `jax.eval_shape`) did not.
        return _floating_struct(x.shape, jax.dtypes.canonicalize_dtype(x.dtype))
    elif isinstance(x, (bool, int, float, complex)):
        # A Python (or NumPy float64/complex128) scalar: a 0-d structure with
        # the dtype `inexact_asarray` would give it, as the published lineax.
        return _floating_struct((), jnp.result_type(x))
    elif eqx.is_array_like(x):
        # (`result_type` canonicalises too.)
        return _floating_struct(jnp.shape(x), jnp.result_type(x))
    else:
        raise TypeError(
            f"`{name}` must be a PyTree of arrays or `jax.ShapeDtypeStruct`s, but "
            f"it has a leaf {x!r} of type {type(x).__name__}."
        )


# A size or a dimension: an int, or a symbolic dimension of a program exported
# with `jax.export.symbolic_shape` (which has no public type: JAX's own `DimSize`
# is `int | Any`).
Size = int | Any


def lowering_for_export(ctx: Any) -> bool:
    """Whether a lowering rule's context `ctx` lowers a program for `jax.export`.

    (JAX's lowering parameters are internal: where a later JAX no longer has the
    attribute, the lowering is the `jit` one, and `jax.export` refuses the program
    with its own message, as it did before lineax looked.)"""
    return bool(getattr(ctx.module_context.lowering_parameters, "for_export", False))


def select(pred: ArrayLike, x: ArrayLike, y: ArrayLike) -> Array:
    """`jnp.where(pred, x, y)` for a boolean `pred`, as one `select`.

    `jnp.where` is a `jax.jit` of its own, lowered as a nested function (and
    traced and lowered anew in every solve's lowering); a few of them in a
    dense solve cost about a millisecond of Python lowering each time. Same
    broadcasting and, for a Python scalar next to an array, the array's dtype.
    """
    # (JAX's promotion: a Python scalar is weakly typed, so next to an array of
    # its kind it takes the array's dtype.)
    dtype = jnp.result_type(x, y)
    xs, ys, ps = jnp.asarray(x, dtype), jnp.asarray(y, dtype), jnp.asarray(pred)
    shape = jnp.broadcast_shapes(ps.shape, xs.shape, ys.shape)
    return lax.select(
        _broadcast(ps, shape), _broadcast(xs, shape), _broadcast(ys, shape)
    )


def _broadcast(a: Array, shape: tuple[Size, ...]) -> Array:
    """`a` broadcast to `shape` by NumPy's rules (leading dimensions added). (Not a
    closure: see `_floating_struct`.)"""
    if a.shape == shape:
        return a
    dims = tuple(range(len(shape) - a.ndim, len(shape)))
    return lax.broadcast_in_dim(a, shape, dims)


def nan_where(pred: ArrayLike, x: Array) -> Array:
    """`x`, NaN where `pred` (broadcast against `x`): `jnp.where(pred, nan, x)`,
    computing no NaN where `pred` is false.

    A `select` from an array of NaNs computes that array whatever `pred` says, and
    `jax_debug_nans` reports every operation that outputs a NaN when evaluated
    outside `jit` (a solve under an un-jitted `jax.grad` or `jax.vmap`): every
    such successful solve raised `FloatingPointError`, where lineax 0.1.1 raised
    none. Here `sqrt(-pred)` is NaN where `pred` and `-0.0` elsewhere, and adding
    `-0.0` changes no value (not even the sign of a zero).
    """
    real = complex_to_real_dtype(x.dtype)
    marker = lax.sqrt(lax.neg(jnp.asarray(pred).astype(real)))
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        marker = lax.complex(marker, marker)
    if marker.shape != x.shape:
        dims = tuple(range(x.ndim - marker.ndim, x.ndim))
        marker = lax.broadcast_in_dim(marker, x.shape, dims)
    return lax.add(x, marker)


def hypot(x: ArrayLike, y: ArrayLike) -> Array:
    """`jnp.hypot(x, y)` for real `x`, `y`, the same operations without its three
    nested `jnp.where`s (see `select`): `sqrt(x^2 + y^2)` without overflow, inf
    if either is infinite."""
    x, y = jnp.abs(jnp.asarray(x)), jnp.abs(jnp.asarray(y))
    infinite = jnp.isposinf(x) | jnp.isposinf(y)
    big, small = jnp.maximum(x, y), jnp.minimum(x, y)
    zero = big == 0
    ratio = small / select(zero, 1, big)
    out = select(zero, big, big * jnp.sqrt(1 + ratio * ratio))
    return select(infinite, jnp.inf, out)


def diagonal(matrix: Array) -> Array:
    """The main diagonal of a 2-d array, as a strided slice of its entries.
    (`jnp.diagonal` lowers as a nested function holding a platform-dependent
    conditional and a gather.)"""
    m, n = matrix.shape
    k = min(m, n)
    if k == 0:
        return jnp.zeros((0,), matrix.dtype)
    flat = matrix.reshape(m * n)
    return lax.slice(flat, (0,), ((k - 1) * (n + 1) + 1,), (n + 1,))


def tree_all_finite(tree: PyTree) -> Array:
    """One boolean: whether every inexact array leaf of `tree` is finite.

    Each leaf becomes `x - x` (zero where finite, NaN elsewhere), and as few
    sums of them as possible are tested (see `_zero_if_finite`):

    - leaves of one shape and dtype are stacked: a tuple of 100 vectors (the
      solution of a block-diagonal solve) costs one reduction rather than 100,
      which took most of that solve's compile time;
    - an array whose shape ends another's of the same dtype (a solution `(n,)`
      and a matrix `(m, n)`) is folded into it by broadcasting: XLA:CPU compiles
      the sum of a small vector as three kernels of its own (about 30 ms of a
      dense n = 100 solve's compile time, measured), and folded into the
      matrix's it costs nothing more.

    (Stacking along a new axis and broadcasting keep the larger array's
    sharding, which ravelling and concatenating leaves would not.)

    The parts of a tuple `tree` (a solution, and the operator's arrays) are
    stacked each on its own, and folded into each other: under `vmap` over the
    right-hand sides, stacking the operator's unbatched diagonal with the
    batched solution copied it to the batch (a batch x 2 x n array, whose sum
    took 6x the time of the diagonal solve itself, measured on the CPU); the
    fold (`_folded_zero`) tests the unbatched part once."""
    return tree_finite_test(tree)[0]


def tree_finite_test(tree: PyTree, index: bool = False) -> tuple[Array, Array | None]:
    """`(tree_all_finite(tree), None)`; with `index`, where `tree`'s leaves make
    one float32 (or complex64) group of `tree_all_finite` (one reduction),
    `(finite, index)`: the test also as an int32 scalar, zero if every inexact
    array leaf of `tree` is finite and positive otherwise (`finite` is then
    `index == 0`).

    It is the bits of the reduction's sum of absolute values (`+0.0` if finite,
    else a NaN whose sign the absolute values cleared): a bitcast, where
    `isfinite` and a select of a code made a kernel of its own (XLA:CPU makes the
    bitcast a one-operation kernel, cheaper to compile: Cholesky, n = 100, XLA
    compile time -3%). An index of a conditional (see `branch_on_code`), whose
    error branch takes anything but zero; nonnegative, so that the largest over
    a batch or over devices is zero only if every one is."""
    zeros = [
        _zero_if_finite(big - big) if not folded else _folded_zero(big, *folded)
        for big, folded in _finiteness_groups(tree)
    ]
    if index and len(zeros) == 1 and zeros[0].dtype == jnp.float32:
        bits = lax.bitcast_convert_type(zeros[0], jnp.int32)
        return bits == 0, bits
    if not zeros:
        return jnp.array(True), None
    return functools.reduce(jnp.logical_and, [jnp.isfinite(z) for z in zeros]), None


def _finiteness_groups(tree: PyTree) -> list[tuple[Any, list[Any]]]:
    """The groups of `tree_all_finite`: a largest array, and the smaller arrays
    folded into it."""
    parts = tree if isinstance(tree, tuple) else (tree,)
    packed = []
    for part in parts:
        leaves = [x for x in jtu.tree_leaves(part) if is_inexact_array(x)]
        packed += stack_alike_leaves(leaves)[0]
    groups: list[tuple[Any, list[Any]]] = []
    for x in sorted(packed, key=jnp.ndim, reverse=True):
        for big, folded in groups:
            if big.dtype == x.dtype and big.shape[big.ndim - x.ndim :] == x.shape:
                folded.append(x)
                break
        else:
            groups.append((x, []))
    return groups


def stack_alike_leaves(tree: PyTree) -> tuple[list[Any], Callable[[list[Any]], PyTree]]:
    """The array leaves of `tree` as a list, those of one shape and dtype stacked
    into one array, and the function that undoes it. The compile time of a
    conditional and of a host callback grows with their number of operands: with
    the tuples of 100 vectors of a 100-block block-diagonal solve (solution,
    right-hand side, and the operator's action in the callback), the error
    branch of `throw=True` made the solve compile about 3x slower (8 s against
    2.8 s, measured side by side)."""
    leaves, treedef = jtu.tree_flatten(tree)
    groups: dict[Any, list[int]] = {}
    for i, leaf in enumerate(leaves):
        key = (jnp.shape(leaf), jnp.result_type(leaf)) if eqx.is_array(leaf) else i
        groups.setdefault(key, []).append(i)
    indices = list(groups.values())
    packed = [
        leaves[ix[0]] if len(ix) == 1 else jnp.stack([leaves[i] for i in ix])
        for ix in indices
    ]
    return packed, functools.partial(_unstack, treedef, len(leaves), indices)


def _unstack(
    treedef, num_leaves: int, indices: list[list[int]], packed: list
) -> PyTree:
    """The inverse of `stack_alike_leaves`."""
    out: list[Any] = [None] * num_leaves
    for stacked, ix in zip(packed, indices):
        if len(ix) == 1:
            out[ix[0]] = stacked
        else:
            for k, i in enumerate(ix):
                out[i] = stacked[k]
    return jtu.tree_unflatten(treedef, out)


def manual_axes() -> tuple:
    """The manual mesh axes of the enclosing `jax.shard_map`s (none outside)."""
    return tuple(jax.sharding.get_abstract_mesh().manual_axes)


def varying_axes(tree: PyTree) -> frozenset:
    """The manual mesh axes that any array (or `jax.ShapeDtypeStruct`) of `tree`
    varies over: inside a `jax.shard_map` with `check_vma=True` (its default),
    which types each value by them; else none."""
    axes = set()
    for leaf in jtu.tree_leaves(tree):
        if isinstance(leaf, jax.ShapeDtypeStruct):
            mat = leaf.manual_axis_type
        elif eqx.is_array(leaf):
            mat = getattr(jax.typeof(leaf), "manual_axis_type", None)
        else:
            continue
        axes.update(() if mat is None else mat.varying)
    return frozenset(axes)


def varying_like(x: PyTree, tree: PyTree) -> PyTree:
    """`x` with each array typed as varying over the manual mesh axes that `tree`
    varies over (see `varying_axes`); `x` itself outside `jax.shard_map`. Inside
    it, the branches of a `lax.cond` and the carry of a loop must keep one type: a
    constant varies over no axis, a value computed from a sharded input over the
    input's."""
    axes = varying_axes(tree)
    if not axes:
        return x

    def cast(leaf):
        if not eqx.is_array(leaf):
            return leaf
        missing = axes - varying_axes(leaf)
        if not missing:
            return leaf
        return lax.pcast(leaf, tuple(sorted(missing)), to="varying")

    return jtu.tree_map(cast, x)


def tree_sub(x: PyTree[Array], y: PyTree[Array]) -> PyTree[Array]:
    return jtu.tree_map(lambda xi, yi: xi - yi, x, y)


def _folded_zero_of(big: Array, *small: Array) -> Array:
    """`_zero_if_finite` of `big - big` with each of `small` folded in: zero if
    every entry of all of them is finite, else NaN.

    `big - big` is zero or NaN, so `(big - big) * x` is zero where both are
    finite (`0 * inf` and `0 * nan` are NaN): one multiplication, which XLA:CPU
    fuses into the reduction, where adding `x - x` took a kernel of its own for
    a vector (measured). (Not `big * 0`: XLA:CPU materialises the broadcast zero
    of a matrix's `x * 0` as an array of its own, a kernel more, measured.)"""
    zeros = big - big
    for x in small:
        zeros = zeros * jnp.broadcast_to(x, zeros.shape)
    return _zero_if_finite(zeros)


_folded_zero = jax.custom_batching.custom_vmap(_folded_zero_of)


@_folded_zero.def_vmap
def _folded_zero_vmap(axis_size, in_batched, big, *small):
    # Folding a batch of vectors (the solutions of `vmap` over right-hand sides)
    # into one matrix (the operator) would broadcast the matrix to the batch:
    # batch x n x n multiplications for an n x n solve of batch x n^2 work (3.7x
    # the time of `vmap(jnp.linalg.solve)`, measured on the CPU). The unbatched
    # parts are tested once, and each batched vector on its own.
    if in_batched[0]:
        axes = [0 if b else None for b in in_batched]
        # (The batch of matrices is the caller's: each is tested with its own
        # vectors, as unbatched.)
        return jax.vmap(_folded_zero_of, in_axes=axes)(big, *small), True
    unbatched = [x for x, b in zip(small, in_batched[1:]) if not b]
    total = _folded_zero(big, *unbatched)
    for x, b in zip(small, in_batched[1:]):
        if b:
            zero = x - x
            if jnp.iscomplexobj(zero):
                zero = jnp.real(zero) + jnp.imag(zero)
            total = total + jnp.sum(jnp.abs(zero), axis=tuple(range(1, zero.ndim)))
    return jnp.broadcast_to(total, (axis_size,)), True


def _zero_if_finite(zeros: Array) -> Array:
    """Zero if every entry of `zeros` (an `x - x`) is zero, else NaN (`inf - inf`
    is NaN): one sum, into which XLA fuses the product. XLA compiles
    `all(isfinite(x))` to a kernel for the test and another for the boolean
    reduction; this is one.

    (Not a `lax.reduce` with `acc + 0 * v` as its reducer: XLA's SPMD partitioner
    cannot turn a non-standard reducer into an all-reduce, so that fails on
    arrays sharded over several devices.)

    An array of fewer than `_SMALL_SUM` entries, one of whose dimensions is
    longer than `_WINDOW`, is summed broadcast along a new leading axis to at
    least that many: XLA:CPU sums such an array in two kernels of its own (a
    windowed partial sum, then the sum of the partial sums), about 35 ms of
    compile time for a vector of 100 (measured, jax 0.10.2), and a large one in
    one library call (its YNNPACK reduction), compiled in a few ms. (An array
    with no dimension longer than the window is summed in one kernel, cheaper
    to compile than the library call: 10 x 10, measured.) The broadcast adds at
    most `_SMALL_SUM` additions at run time, and keeps the array's sharding.
    (A complex array is summed as the sum of its real and imaginary parts,
    which XLA:CPU sums in the same way; it has no YNNPACK reduction of complex
    numbers.)

    It sums the absolute values: `+0.0`, or a NaN of sign bit zero (on x86 the
    NaN of `inf - inf` has its sign bit set), so that its bits are a
    nonnegative index (see `tree_finite_test`); XLA fuses the absolute value
    into the reduction."""
    if jnp.iscomplexobj(zeros):
        zeros = jnp.real(zeros) + jnp.imag(zeros)
    zeros = jnp.abs(zeros)
    if (
        isinstance(zeros.size, int)
        and zeros.size < _SMALL_SUM
        and max(zeros.shape, default=0) > _WINDOW
    ):
        # (Under `stop_gradient`: a `custom_vmap` cannot be linearised, and a
        # direct solver's `init`, which tests the matrix, may be differentiated.)
        return _broadcast_sum(lax.stop_gradient(zeros))
    return jnp.sum(zeros)


def _broadcast_sum_of(zeros: Array) -> Array:
    copies = -(-_SMALL_SUM // zeros.size)
    return jnp.sum(jnp.broadcast_to(zeros, (copies, *zeros.shape)))


_broadcast_sum = jax.custom_batching.custom_vmap(_broadcast_sum_of)


@_broadcast_sum.def_vmap
def _broadcast_sum_vmap(axis_size, in_batched, zeros):
    # The broadcast is for the compile time of one small array. Under `vmap` it
    # would copy each member to `_SMALL_SUM` entries: the finiteness test of the
    # tangent and cotangent solves of `vmap(jax.grad(...))` over 3000 right-hand
    # sides of n = 32 made 3000 x 4096 additions next to 3000 x 32^2 of the
    # solve (and each of a batch of 32 x 32 matrices was tested 4 times over).
    # The batch is large: each member is summed once.
    del axis_size
    if not in_batched[0]:
        return _broadcast_sum(zeros), False
    return jnp.sum(zeros, axis=tuple(range(1, zeros.ndim))), True


# The size from which XLA:CPU (jax 0.10.2) sums an array in one YNNPACK call;
# 2048 entries are still summed in three kernels (measured).
_SMALL_SUM = 4096
# The window of XLA:CPU's partial sums: a dimension up to this long is summed
# in one kernel.
_WINDOW = 32


def tree_is_complex(*structures: PyTree[jax.ShapeDtypeStruct]) -> bool:
    """Whether any leaf of the structures (or arrays) is complex: e.g.
    `tree_is_complex(operator.in_structure(), operator.out_structure())`."""
    return any(
        jnp.issubdtype(x.dtype, jnp.complexfloating)
        for x in jtu.tree_leaves(structures)
    )


def complex_into_real(x: Any, dtype: Any) -> bool:
    """Whether `x` (an array or a `ShapeDtypeStruct`) is complex and `dtype` real:
    the leaves that a cast to `dtype` would lose the imaginary part of."""
    return jnp.iscomplexobj(x) and not jnp.issubdtype(dtype, jnp.complexfloating)


def cast_keeping_real(x: Any, dtype: Any) -> Any:
    """`x.astype(dtype)`, taking the real part explicitly where a complex `x` goes
    to a real `dtype`: JAX's implicit cast does the same, but with a
    `DeprecationWarning` (to become an error)."""
    if complex_into_real(x, dtype):
        x = jnp.real(x)
    return x.astype(dtype)


def promoting_call(
    fn: Callable[[PyTree[Array]], PyTree[Array]],
    structure: PyTree[jax.ShapeDtypeStruct],
    vector: PyTree[Array],
) -> PyTree[Array]:
    """`fn(vector)`, for a linear `fn` on inputs of `structure` (an operator's
    `mv`), also where `vector` is complex at leaves that `structure` says are
    real: then `fn(Re v) + i fn(Im v)`, the complex leaves of `vector` in the
    first term only. That is the action of the operator's (promoted, complex)
    matrix, as NumPy multiplies a real-to-complex matrix by a complex vector and
    as a PyTree operator's blocks promote; a solver for square operators solves
    with that matrix, and the derivative of its solve applies the operator's
    tangent to the complex solution. An ordinary call is `fn(vector)` (a test
    of dtypes at trace time, nothing traced)."""
    structs, treedef = jtu.tree_flatten(structure)
    leaves = jtu.tree_leaves(vector)
    if jtu.tree_structure(vector) != treedef or not any(
        complex_into_real(x, s.dtype) for s, x in zip(structs, leaves)
    ):
        return fn(vector)
    re, im = [], []
    for s, x in zip(structs, leaves):
        if jnp.issubdtype(s.dtype, jnp.complexfloating):
            re.append(x)
            im.append(jnp.zeros(s.shape, s.dtype))
        else:
            re.append(jnp.real(x).astype(s.dtype))
            im.append(jnp.imag(x).astype(s.dtype))
    out_re = fn(jtu.tree_unflatten(treedef, re))
    out_im = fn(jtu.tree_unflatten(treedef, im))

    def combine(r, i):
        return r + 1j * i if jnp.iscomplexobj(r) else lax.complex(r, i)

    return jtu.tree_map(combine, out_re, out_im)


def tree_conj(tree: PyTree[Array], complex_: bool = True) -> PyTree[Array]:
    """The elementwise conjugate of `tree`; `tree` itself if not `complex_` (which
    saves the no-op `conj` of real leaves in a traced program)."""
    return jtu.tree_map(jnp.conj, tree) if complex_ else tree


def result_dtype(*trees: PyTree) -> Any:
    """The common inexact dtype of all leaves (arrays or `ShapeDtypeStruct`s)."""
    dtypes = [x.dtype for tree in trees for x in jtu.tree_leaves(tree)]
    if len(dtypes) == 0:
        return default_floating_dtype()
    # NumPy's promotion: explicit, so it is unaffected by strict dtype promotion.
    dtype = functools.reduce(np.promote_types, dtypes)
    if not jnp.issubdtype(dtype, jnp.inexact):
        dtype = default_floating_dtype()
    return dtype


def tree_size(structure: PyTree[jax.ShapeDtypeStruct]) -> Size:
    return sum(math.prod(x.shape) for x in jtu.tree_leaves(structure))


def describe(structure: PyTree[jax.ShapeDtypeStruct]) -> str:
    """A short human-readable description of a structure, for error messages."""
    leaves, treedef = jtu.tree_flatten(structure)
    parts = ", ".join(f"{jnp.dtype(x.dtype).name}{list(x.shape)}" for x in leaves)
    if treedef.num_leaves == 1 and jtu.treedef_is_leaf(treedef):
        return parts
    return f"{treedef} with leaves [{parts}]"


class Static(eqx.Module):
    """Holds a (possibly unhashable) PyTree of non-array data as a single static
    field, compared by value. Used to store structures (PyTrees of
    `jax.ShapeDtypeStruct`) inside operators without making them PyTree leaves."""

    _leaves: tuple = eqx.field(static=True)
    _treedef: Any = eqx.field(static=True)

    def __init__(self, value: PyTree):
        leaves, self._treedef = jtu.tree_flatten(value)
        self._leaves = tuple(leaves)

    @property
    def value(self) -> PyTree:
        return jtu.tree_unflatten(self._treedef, self._leaves)


class _Opaque:
    """A non-array leaf of a held operator, in a static field: compared by what it
    computes where that can be read (a jaxpr by its text), else as itself.

    Diffrax's implicit Runge-Kutta solvers re-linearise the vector field and
    `init` the root finder again at a later stage, and assert that the new state's
    static parts equal the old one's: each linearisation is a new jaxpr object,
    with the same text. Equal text is the same computation (the arrays it closes
    over are the held arrays, outside this leaf), so `jit`'s caches may share a
    compilation between the two."""

    __slots__ = ("obj", "_key")

    def __init__(self, obj: Any):
        self.obj = obj
        self._key = None

    def key(self) -> Any:
        if self._key is None:  # printing a large jaxpr takes milliseconds: once
            if isinstance(
                self.obj, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)
            ):
                self._key = ("jaxpr", str(self.obj))
            else:
                self._key = ("object", self.obj)
        return self._key

    def __eq__(self, other: object) -> bool:
        return type(other) is _Opaque and (
            self.obj is other.obj or self.key() == other.key()
        )

    def __hash__(self) -> int:
        return hash(self.key())


class HeldArrays(eqx.Module):
    """Holds a PyTree (an operator, in a solver state) with only its arrays as
    leaves: every other leaf (the jaxpr of a closure-converted function, a Python
    callable) is kept in a static field (see `_Opaque`).

    A solver state is a PyTree of arrays by the API contract, and clients rely on
    it: Optimistix's `Chord` and Diffrax's `VeryChord` keep the state of the
    first solve and pass it through `lax.stop_gradient`, which accepts arrays
    only. A Krylov solver's state is its operator, and the operator of a
    linearised function holds a jaxpr leaf."""

    arrays: PyTree
    rest: PyTree = eqx.field(static=True)

    def __init__(self, tree: PyTree):
        self.arrays, rest = eqx.partition(tree, eqx.is_array)
        self.rest = jtu.tree_map(_Opaque, rest)

    @property
    def value(self) -> PyTree:
        rest = jtu.tree_map(
            lambda x: x.obj, self.rest, is_leaf=lambda x: isinstance(x, _Opaque)
        )
        return eqx.combine(self.arrays, rest)


_EXPLICIT_AXES_NOTE = (
    "`linear_solve` was given arrays sharded over explicit mesh axes "
    "(`jax.sharding.AxisType.Explicit`, the default of `jax.make_mesh`), which "
    "its solvers do not support. Call it inside "
    "`jax.sharding.auto_axes(solve, out_sharding=...)`, or make the mesh with "
    "`axis_types=(jax.sharding.AxisType.Auto, ...)` (see the documentation, "
    '"Running on many devices").'
)


def note_explicit_axes(error: Exception, tree: PyTree) -> None:
    """Add a note saying what to do to JAX's `error` (a `ShardingTypeError`
    raised in a solve), if an array or abstract value of `tree` is sharded over
    an explicit mesh axis.

    On such axes (`jax.make_mesh`'s default) JAX types every operation by its
    sharding, and refuses an inner product of two sharded vectors, a
    factorisation of a sharded matrix, or a write of a sharded vector into a
    buffer, unless its output sharding is given: the solvers do all of these,
    and JAX's message points inside lineax."""
    # (Once: an eager solve passes through both places that add it.)
    notes = getattr(error, "__notes__", [])
    if _EXPLICIT_AXES_NOTE not in notes and _on_explicit_axes(tree):
        error.add_note(_EXPLICIT_AXES_NOTE)


def _on_explicit_axes(tree: PyTree) -> bool:
    for leaf in jtu.tree_leaves(tree):
        if isinstance(leaf, jax.core.ShapedArray):
            aval = leaf
        elif eqx.is_array(leaf):
            aval = jax.typeof(leaf)
        else:
            continue
        sharding = getattr(aval, "sharding", None)
        spec = getattr(sharding, "spec", None)
        if sharding is None or spec is None:
            continue
        mesh = sharding.mesh
        explicit = {
            name
            for name, kind in zip(mesh.axis_names, mesh.axis_types)
            if kind == jax.sharding.AxisType.Explicit
        }
        for entry in spec:
            names = entry if isinstance(entry, tuple) else (entry,)
            if explicit.intersection(names):
                return True
    return False
