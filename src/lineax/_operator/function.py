"""`FunctionLinearOperator`: a linear function as an operator."""

import functools
import types
import weakref
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
from jaxtyping import PyTree

from .._misc import (
    manual_axes,
    no_active_trace,
    promoting_call,
    Static,
    strip_weak_dtype,
    structure_of,
    tree_is_complex,
    varying_like,
)
from .._tags import as_tags, symmetric_tag, tags_implying, transpose_tags
from ._arguments import check_not_operator, output_structure_of
from .base import (
    AbstractLinearOperator,
    concrete_arrays,
    is_cacheable,
    materialise,
    matrix_by_mv,
    register_tag_predicates,
)
from .matrix import MatrixLinearOperator
from .pytree import PyTreeLinearOperator, with_input_structure


try:  # Equinox's closure-converted function (not public API): see `holds_its_jaxpr`.
    from equinox._ad import _ClosureConvert, _TrivialClosureConvert
    from jax._src import linear_util as _lu
    from jax._src.interpreters import partial_eval as _pe
except ImportError:  # pragma: no cover - a future Equinox or JAX: solved op by op
    _ClosureConvert = _TrivialClosureConvert = _lu = _pe = None


def holds_its_jaxpr(fn: Any) -> bool:
    """Whether `fn` is a closure-converted function whose computation is its jaxpr
    (a leaf compared by identity) applied to its `consts` (leaves: the arrays it
    closed over, a NumPy array by a view of its memory), all concrete: so that a
    solve compiled for this jaxpr, with the consts as inputs, computes what `fn`
    computes on every call, reading the closed-over arrays afresh.

    Not a function that `eqx.filter_closure_convert` kept as it was because it
    closes over nothing (its `_TrivialClosureConvert`): it reads globals, which
    a compiled solve would read once, at its trace (`retraced` makes one of it
    on each solve). Nor a raw function (`closure_convert=False`), whose closure
    a compiled solve would bake in."""
    return (
        _ClosureConvert is not None
        and type(fn) is _ClosureConvert
        and concrete_arrays(fn.consts)
    )


def reads_globals(fn: Any) -> bool:
    """Whether `fn` is a function that `eqx.filter_closure_convert` kept as it was
    because it closes over nothing (a module-level `def` or `lambda`): what it
    computes depends on the globals it reads, at each call (see `retraced`)."""
    return _TrivialClosureConvert is not None and type(fn) is _TrivialClosureConvert


def retraced(fn: Any) -> Any:
    """`fn` (see `reads_globals`) traced now, as a closure-converted function whose
    consts are the current values of the globals it reads, and whose jaxpr is
    the one first traced for the same computation (so that a solve compiled for
    it, keyed on the jaxpr's identity, is found again); `None` where the trace
    holds what cannot be compared soundly (see `_computation_key`), or fails.

    A compiled solve keyed on `fn` itself would read its globals once, at its
    trace: a global NumPy array mutated in place, or a global rebound, would be
    read stale (as `jax.jit` and lineax 0.1.1 read them). Traced afresh on each
    call, they are read as an op-by-op solve reads them. (The trace is not
    `jax.make_jaxpr`, which caches on `fn`'s identity and so is stale too.) It
    costs what one call of `fn` costs to trace, 0.2-1.5 ms (a matrix product, a
    stencil of two `jnp.roll`s), against 7-17 ms for a solve op by op."""
    in_leaves, in_treedef = fn.in_dynamic_struct
    in_static = jtu.tree_unflatten(fn.in_static[1], fn.in_static[0])
    outs = []

    def flat(*leaves):
        args, kwargs = eqx.combine(jtu.tree_unflatten(in_treedef, leaves), in_static)
        out_dynamic, out_static = eqx.partition(fn.fn(*args, **kwargs), eqx.is_array)
        out_leaves, out_treedef = jtu.tree_flatten(out_dynamic)
        outs.append((out_treedef, jtu.tree_flatten(out_static)))
        return out_leaves

    avals = [jax.core.ShapedArray(s.shape, s.dtype) for s in in_leaves]
    try:
        debug = _DEBUG_INFO.get(fn.fn)
        if debug is None:
            # (Cached: it inspects `fn`'s signature, about 50 us a call.)
            debug = _DEBUG_INFO[fn.fn] = jax.api_util.debug_info(  # pyright: ignore
                "lineax", fn.fn, (), {}
            )
        jaxpr, out_avals, consts = _pe.trace_to_jaxpr_dynamic(  # pyright: ignore
            _lu.wrap_init(flat, debug_info=debug),  # pyright: ignore
            avals,
        )
    except Exception:  # (Raised again, as it was, by the solve op by op.)
        return None
    out_treedef, out_static = outs[0]
    out_struct = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in out_avals]
    key = _computation_key(jaxpr)
    if key is None:
        return None
    key = (
        key,
        tuple((jnp.shape(c), jnp.result_type(c)) for c in consts),
        fn.in_dynamic_struct[1],
        tuple(in_leaves),
        fn.in_static[1],
        tuple(fn.in_static[0]),
        out_treedef,
        tuple(out_struct),
        out_static[1],
        tuple(out_static[0]),
    )
    try:
        canonical = _CANONICAL.get(key)
    except TypeError:  # unhashable static data
        return None
    if canonical is None:
        if len(_CANONICAL) >= 256:
            _CANONICAL.clear()
        converted = _ClosureConvert(  # pyright: ignore
            jaxpr,
            consts,
            fn.in_dynamic_struct,
            (out_struct, out_treedef),
            fn.in_static,
            out_static,
        )
        _CANONICAL[key] = (jaxpr, jtu.tree_structure(converted))
        return converted
    # (Rebuilt from its structure: `_ClosureConvert`'s `__init__`, with its
    # checks, is a tenth of the time of this function.)
    jaxpr, treedef = canonical
    return jtu.tree_unflatten(treedef, [jaxpr, *consts])


# The first jaxpr traced for each computation (see `retraced`), with the
# structure of its `_ClosureConvert`; a plain dict, emptied when full: the
# compiled solves in use hold their own jaxprs in their keys.
_CANONICAL: dict = {}
_DEBUG_INFO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _computation_key(jaxpr: Any) -> tuple | None:
    """A hashable description of `jaxpr` equal to another's only where the two
    compute the same function of their consts and inputs: each equation's
    primitive, its parameters (compared by `==`; nested jaxprs described in
    turn) and its operands, as numbered variables or literal values with their
    types. `None` where a parameter is a function (a `custom_jvp` rule, a
    callback): compared by identity, a fresh one per trace would compile anew
    per call, and printed or compared by name, two of one name would be
    confused; such a function stays op by op. (Not the printed jaxpr: it
    rounds no literal, but it is 0.1-1 ms to print, and omits some parameters.)
    """
    numbers: dict = {}

    def operand(v):
        if isinstance(v, jax.extend.core.Literal):
            value = np.asarray(v.val)
            if value.size != 1:
                raise _Unsound
            # By its bytes, not `==`: -0.0 == 0.0 (and hash alike), yet
            # `atan2(-0.0, -1.0)` is -pi; and NaN != NaN, which would key a
            # function holding a NaN literal anew on every solve (never found
            # again, never compiled).
            return ("literal", value.dtype, value.tobytes(), v.aval)
        return numbers[v]

    def define(v):
        numbers[v] = (len(numbers), v.aval)
        return numbers[v]

    def describe(jaxpr):
        if isinstance(jaxpr, jax.extend.core.ClosedJaxpr):
            if jaxpr.consts:
                raise _Unsound
            jaxpr = jaxpr.jaxpr
        outer = dict(numbers)
        numbers.clear()
        out = [tuple(define(v) for v in (*jaxpr.constvars, *jaxpr.invars))]
        for eqn in jaxpr.eqns:
            params = []
            for name, value in eqn.params.items():
                if isinstance(
                    value, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)
                ):
                    value = describe(value)
                elif isinstance(value, tuple) and any(
                    isinstance(x, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr))
                    for x in value
                ):
                    # (`custom_linear_solve`'s jaxprs hold `None` for a
                    # transpose solve not given: kept as it is.)
                    value = tuple(
                        describe(x)
                        if isinstance(
                            x, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr)
                        )
                        else x
                        for x in value
                    )
                elif isinstance(value, _FUNCTIONS):
                    raise _Unsound
                params.append((name, value))
            inputs = tuple(operand(v) for v in eqn.invars)
            out.append(
                (
                    eqn.primitive,
                    tuple(params),
                    inputs,
                    tuple(define(v) for v in eqn.outvars),
                    frozenset(eqn.effects),
                )
            )
        out.append(tuple(operand(v) for v in jaxpr.outvars))
        numbers.clear()
        numbers.update(outer)
        return tuple(out)

    try:
        key = describe(jaxpr)
        hash(key)
    except Exception:  # (`_Unsound`, unhashable, or a parameter not foreseen)
        # Op by op, as before: a function's solve is never failed by its key.
        return None
    return key


# Parameters that are functions (see `_computation_key`); not every callable: a
# `jax.sharding.Mesh`, which a nested `jit` holds, compares by value.
_FUNCTIONS = (
    types.FunctionType,
    types.MethodType,
    types.BuiltinFunctionType,
    functools.partial,
    *(() if _lu is None else (_lu.WrappedFun,)),
)


class _Unsound(Exception):
    pass


def closure_converted(fn: Callable, closure_convert: bool, *example: Any) -> Callable:
    """`fn` closure-converted for arguments like `example` (the arrays it closes
    over become explicit inputs) if `closure_convert`, or if it closes over traced
    arrays all the same.

    A traced array left in a closure escapes its trace when a solve calls `fn`
    inside the `linear_solve` primitive (the Krylov solvers, the finiteness check
    of a failed solve), which JAX reports as "No constant handler for type
    DynamicJaxprTracer". With `closure_convert=False` the user promises there are
    none; converting where the promise does not hold makes it work rather than
    fail. (lineax 0.1.1's direct solvers never called `fn` there.)
    """
    if not closure_convert and no_active_trace():
        # Outside every transformation there is no live tracer to close over: no
        # trace of `fn` (which the flag exists to avoid; about 0.7 ms a call).
        return fn
    if not closure_convert:
        # A callable Module's own arrays are PyTree leaves of the operator, which
        # every transformation sees: only other traced values need converting.
        # Traced with its arrays as inputs, those are the traced constants left
        # (one also reached through a closure included: telling them apart by
        # identity let that reference escape the solve).
        dynamic, static = eqx.partition(fn, eqx.is_array)
        own_inputs = eqx.filter_closure_convert(
            lambda d, *args: eqx.combine(d, static)(*args), dynamic, *example
        )
        consts = jtu.tree_leaves(getattr(own_inputs, "consts", ()))
        if not any(isinstance(c, jax.core.Tracer) for c in consts):
            return fn
    return _without_attached_consts(eqx.filter_closure_convert(fn, *example))


def _without_attached_consts(converted: Any) -> Any:
    """`converted` (a closure-converted function) with a jaxpr that holds no
    values of its own: its consts are only in its `consts` leaves.

    From JAX 0.12 a jaxpr carries its constants (`ClosedJaxpr` is `Jaxpr`, and
    `closed.jaxpr` is `closed` itself), so the jaxpr that `eqx.filter_closure_
    convert` keeps as a leaf holds the arrays it closed over too. That jaxpr is
    static data of the `linear_solve` primitive (a parameter of its equation), and
    a traced array it held outlived its trace: `jax.checking_leaks()` reported
    the leak under `jit` and `grad` of a solve with a `FunctionLinearOperator`
    closing over a traced array. (`eval_jaxpr` pairs the consts given with the
    jaxpr's leading inputs either way; JAX 0.10's jaxpr holds none.)"""
    jaxpr: Any = getattr(converted, "jaxpr", None)
    if not getattr(jaxpr, "consts", None) or not hasattr(jaxpr, "with_consts"):
        return converted
    return eqx.tree_at(lambda c: c.jaxpr, converted, jaxpr.with_consts([]))


def in_context(structure: PyTree[jax.ShapeDtypeStruct]) -> PyTree[jax.ShapeDtypeStruct]:
    """`structure` as `fn` is closure-converted at and called with inside a
    `jax.shard_map`: unsharded over the manual mesh in context (as every traced
    value there is), and varying over all of its axes (with `check_vma=True`);
    `structure` itself elsewhere.

    A closure-converted `fn` accepts only inputs of the sharding it was converted
    at, and replays the casts to varying it recorded: converted at a struct of
    no sharding, or at one varying over fewer axes than the vectors of a solve,
    every solve with a `FunctionLinearOperator` made inside `shard_map` failed
    ("Closure-converted function called with different dynamic arguments", or
    "pvary is a invariant->variant collective"). Varying over every axis, the
    input is as varying as any vector can be; `mv` casts each vector to it (a
    cast of the type only)."""
    axes = manual_axes()
    if not axes:
        return structure

    def leaf(s):
        # (Made by tracing, so that it has what a traced value there has; with
        # `check_vma=False` the cast does nothing.)
        return jax.eval_shape(
            lambda: lax.pcast(jnp.zeros(s.shape, s.dtype), axes, to="varying")
        )

    return jtu.tree_map(leaf, structure)


def _declared_output_structure(fn: Callable) -> PyTree[jax.ShapeDtypeStruct] | None:
    """The output structure that `fn`'s own type declares (by a method
    `__lineax_output_structure__`, which may return `None`), else `None`.

    For lineax's own functions whose output structure is known without tracing
    them: [`lineax.invert`][]'s solve, whose trace by `eqx.filter_eval_shape`
    was half the time of an un-jitted `lx.invert` (about 13 of 24 ms, 10 x 10
    LU; 0.1.1 took 6 ms for all of it). (Looked up on the type, not on `fn`: an
    Equinox module binds its methods as new modules, tens of microseconds.)"""
    declared = getattr(type(fn), "__lineax_output_structure__", None)
    return None if declared is None else declared(fn)


class FunctionLinearOperator(AbstractLinearOperator):
    """Wraps a *linear* function `fn` as a linear operator.

    The function is never materialised unless asked (`as_matrix`, `materialise`),
    so this is the usual way to use matrix-free iterative solvers. The transpose is
    obtained with `jax.linear_transpose`.

    **Arguments:**

    - `fn`: a linear function of one argument, taking a PyTree with the structure
        `input_structure`. It is not checked for linearity: a nonlinear `fn` gives
        meaningless results (and usually an error from `jax.linear_transpose` when
        transposing).
    - `input_structure`: a PyTree of `jax.ShapeDtypeStruct`s (or of arrays) giving
        the structure of the input.
    - `tags`: a tag or iterable of tags.
    - `closure_convert`: whether to closure-convert `fn`, turning arrays it closes
        over into explicit inputs. This is needed to differentiate a solve with
        respect to values that `fn` closes over (and lets `jax.jit` see them). Set
        to `False` only if `fn` closes over no JAX arrays that may be traced.
    """

    fn: Callable
    input_structure: Static = eqx.field(static=True)
    output_structure: Static = eqx.field(static=True)
    tags: frozenset = eqx.field(static=True)

    def __init__(
        self,
        fn: Callable,
        input_structure: PyTree[Any],
        tags: Any = (),
        closure_convert: bool = True,
    ):
        if not callable(fn):
            raise TypeError(f"`fn` must be callable, got {type(fn).__name__}.")
        check_not_operator(input_structure, "input_structure")
        in_struct = in_context(structure_of(input_structure, "input_structure"))
        fn = closure_converted(fn, closure_convert, in_struct)
        out_struct = _declared_output_structure(fn)
        if out_struct is None:
            out_struct = output_structure_of(
                fn,
                (in_struct,),
                "Calling `fn` on an input of structure `input_structure` failed; "
                "check that `input_structure` describes the input that `fn` "
                "expects.",
            )
        self.fn = fn
        self.input_structure = Static(in_struct)
        self.output_structure = Static(strip_weak_dtype(out_struct))
        self.tags = as_tags(tags)

    def mv(self, vector):
        # (The field, not `self.in_structure()`: an Equinox module's method is
        # bound as a new module on each access, which flattens `self`, e.g. the
        # matrix, state and options of `lx.invert`'s operator: about 60 us of
        # an un-jitted `mv`.)
        structure = self.input_structure.value
        # (Inside `jax.shard_map`: see `in_context`. Elsewhere `vector` itself.)
        vector = varying_like(vector, structure)
        return promoting_call(self.fn, structure, vector)

    def as_matrix(self):
        return matrix_by_mv(self)

    def transpose(self):
        if transpose_is_self(self):
            return self
        transpose_fn = jax.linear_transpose(self.fn, self.in_structure())

        def _transpose(vector):
            (out,) = transpose_fn(vector)
            return out

        try:
            return FunctionLinearOperator(
                _transpose, self.out_structure(), transpose_tags(self.tags)
            )
        except Exception as e:
            # `jax.linear_transpose` of a nonlinear `fn` fails deep inside JAX (an
            # `AssertionError` about accumulators, say), e.g. in reverse mode
            # through a solve whose preconditioner varies with its input.
            raise ValueError(
                "Cannot transpose this `FunctionLinearOperator`: "
                "`jax.linear_transpose` of its `fn` failed, which happens when "
                "`fn` is not linear in its input. Reverse-mode differentiation "
                "needs the transpose (also of a `preconditioner`): use a linear "
                "`fn`, or `lx.materialise` a linear operator first."
            ) from e

    def in_structure(self):
        return self.input_structure.value

    def out_structure(self):
        return self.output_structure.value


register_tag_predicates(FunctionLinearOperator)
# A solve of an operator built once and solved many times un-jitted runs compiled
# (lineax 0.1.1's `eqx.filter_jit` did so too), keyed on the identity of its
# jaxpr; see `_compiled_linear_solve` for when that starts.
is_cacheable.register(FunctionLinearOperator)(lambda op: holds_its_jaxpr(op.fn))


def transpose_is_self(operator: Any) -> bool:
    """Whether the transpose of an operator holding `tags` is the operator itself:
    tagged symmetric (or with a tag implying it: positive or negative
    semidefinite, diagonal), real, and mapping one structure to itself (a
    symmetric tag on a map between two structures of one size says that its
    matrix is symmetric, but its transpose still swaps the structures).

    (With only `positive_semidefinite_tag`, the transpose of a function built on
    `jax.pure_callback`, which `jax.linear_transpose` cannot transpose, failed:
    every LSMR and `Normal` solve of it and every gradient of its solves, which
    lineax 0.1.1 made.)"""
    return (
        any(tag in operator.tags for tag in tags_implying(symmetric_tag))
        and not tree_is_complex(operator.in_structure())
        and strip_weak_dtype(operator.in_structure())
        == strip_weak_dtype(operator.out_structure())
    )


def real_to_complex(
    in_struct: PyTree[jax.ShapeDtypeStruct], out_struct: PyTree[jax.ShapeDtypeStruct]
) -> bool:
    """Whether a function maps real arrays only to some complex ones, so that its
    VJPs (projected onto the real inputs) lose the imaginary part of its Jacobian."""
    return not tree_is_complex(in_struct) and tree_is_complex(out_struct)


def _jacobian_tree(fn, x, in_struct, out_struct, jac):
    n_in = sum(leaf.size for leaf in jtu.tree_leaves(in_struct))
    n_out = sum(leaf.size for leaf in jtu.tree_leaves(out_struct))
    holomorphic = tree_is_complex(in_struct)
    if jac == "fwd" or (jac is None and n_in <= n_out):
        return jax.jacfwd(fn, holomorphic=holomorphic)(x)
    if real_to_complex(in_struct, out_struct):
        # A VJP into real inputs keeps only the real part of the pairing with a
        # complex cotangent, so `jacrev` refuses complex outputs (and its
        # `holomorphic=True` needs complex inputs): differentiate the real and
        # imaginary parts of the output, each a real function.
        re, im = (
            jax.jacrev(lambda y, part=part: jtu.tree_map(part, fn(y)))(x)
            for part in (jnp.real, jnp.imag)
        )
        # (`out_struct` is a prefix of the Jacobian's tree: one subtree per output.)
        return jtu.tree_map(
            lambda s, r, i: (
                jtu.tree_map(jax.lax.complex, r, i) if tree_is_complex(s) else r
            ),
            out_struct,
            re,
            im,
        )
    return jax.jacrev(fn, holomorphic=holomorphic)(x)


def jacobian_operator(
    fn: Callable,
    x: PyTree,
    in_struct: PyTree[jax.ShapeDtypeStruct],
    out_struct: PyTree[jax.ShapeDtypeStruct],
    tags: frozenset,
    jac: Any,
) -> AbstractLinearOperator:
    """The materialised Jacobian of `fn` at `x`, as a Matrix operator when input and
    output are single 1-D arrays, else as a PyTree operator."""
    in_leaves = jtu.tree_leaves(in_struct)
    out_leaves = jtu.tree_leaves(out_struct)
    if len({jnp.dtype(leaf.dtype) for leaf in in_leaves + out_leaves}) > 1:
        # `jax.jacfwd` (`jax.jacrev`) builds its basis in the common dtype of the
        # inputs (outputs), which strict dtype promotion refuses for a mix such as
        # float32 and float64 (each leaf's block keeps its own dtype regardless).
        with jax.numpy_dtype_promotion("standard"):
            jac_tree = _jacobian_tree(fn, x, in_struct, out_struct, jac)
    else:
        jac_tree = _jacobian_tree(fn, x, in_struct, out_struct, jac)
    single = (
        len(in_leaves) == 1
        and len(out_leaves) == 1
        and jtu.treedef_is_leaf(jtu.tree_structure(in_struct))
        and jtu.treedef_is_leaf(jtu.tree_structure(out_struct))
    )
    if single and in_leaves[0].ndim == 1 and out_leaves[0].ndim == 1:
        return MatrixLinearOperator(jac_tree, tags)
    # The Jacobian's blocks have the dtypes of the outputs they map into: an input
    # leaf of another dtype (a float32 input of a float64 function) would be
    # inferred with the wrong one.
    return with_input_structure(
        PyTreeLinearOperator(jac_tree, out_struct, tags), in_struct
    )


@materialise.register(FunctionLinearOperator)
def _(operator):
    in_struct = operator.in_structure()
    zeros = jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), in_struct)
    return jacobian_operator(
        operator.fn, zeros, in_struct, operator.out_structure(), operator.tags, None
    )
